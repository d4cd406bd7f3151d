"""Benchmark cases of the scalar family: FSQ, LFQ / BSQ, ResidualLFQ, LatentQuantize.

Imported by scripts/bench_quantizers.py. The reference LFQ with the entropy loss builds a
(tokens x 2^d) distance matrix: at 2^16 codes and 8 x 1024 tokens that is ~100 s and ~17 GB a
step here, more than this shared machine can give, so its throughput is measured on 1 x 1024
tokens instead (it scales linearly with tokens) and quoted in the 8 x 1024 row.
"""

from __future__ import annotations

import importlib

import torch

from scripts.bench_common import Case
from src.quantizers import FSQ, LFQ
from src.quantizers.residual_lfq import ResidualLFQ


def _reference(name: str):
    return getattr(importlib.import_module("vector_quantize_pytorch"), name)


# measured once on this machine: `python scripts/bench_quantizers.py --only "LFQ 2^16 (1x1024"`
REFERENCE_LFQ16_NOTE = (
    "not run: tokens x 2^16 distance matrix (~17 GB); see the 1x1024-token row for its throughput"
)


def _lfq16(tokens: int) -> tuple:
    kwargs = {"codebook_size": 2**16, "dim": 16, "entropy_loss_weight": 0.1}
    return (
        lambda: LFQ(**kwargs),
        lambda: _reference("LFQ")(**kwargs),
        lambda: torch.randn(tokens // 1024, 1024, 16),
    )


def _latent_quantize_case() -> Case | None:
    try:
        module = importlib.import_module("src.quantizers.latent_quantize")
    except ModuleNotFoundError:
        return None
    kwargs = {"levels": [5, 5, 8], "dim": 16}
    return Case(
        name="LatentQuantize [5,5,8] dim 16 (8x32x32 map)",
        tokens=8 * 1024,
        # a channel-first map: the reference reads every input as (batch, dim, ...)
        make_input=lambda: torch.randn(8, 16, 32, 32),
        ours=lambda: module.LatentQuantize(**kwargs),
        reference=lambda: _reference("LatentQuantize")(**kwargs),
    )


def cases() -> list[Case]:
    ours16, ref16, input16 = _lfq16(8 * 1024)
    ours16_small, ref16_small, input16_small = _lfq16(1024)
    result = [
        Case(
            name="FSQ [8,5,5,5] (8x1024)",
            tokens=8 * 1024,
            make_input=lambda: torch.randn(8, 1024, 4),
            ours=lambda: FSQ(levels=[8, 5, 5, 5]),
            reference=lambda: _reference("FSQ")(levels=[8, 5, 5, 5]),
        ),
        Case(
            name="LFQ 2^16 entropy loss (8x1024)",
            tokens=8 * 1024,
            make_input=input16,
            ours=ours16,
            reference=ref16,
            reference_skip_reason=REFERENCE_LFQ16_NOTE,
        ),
        Case(
            name="LFQ 2^16 entropy loss (1x1024)",
            tokens=1024,
            make_input=input16_small,
            ours=ours16_small,
            reference=ref16_small,
            steps=1,
            notes="reference measured once, one step",
        ),
        Case(
            name="LFQ 2^18 entropy loss (8x1024)",
            tokens=8 * 1024,
            make_input=lambda: torch.randn(8, 1024, 18),
            ours=lambda: LFQ(codebook_size=2**18, dim=18, entropy_loss_weight=0.1),
            reference_skip_reason="not run: tokens x 2^18 distance matrix (~70 GB)",
            reference=lambda: _reference("LFQ")(codebook_size=2**18, dim=18),
        ),
        Case(
            name="BSQ 2^32 entropy loss (8x1024)",
            tokens=8 * 1024,
            make_input=lambda: torch.randn(8, 1024, 32),
            ours=lambda: LFQ(codebook_size=2**32, dim=32, spherical=True),
            reference_skip_reason="not run: its 2^32 x 32 codebook buffer alone is 512 GiB",
            reference=lambda: _reference("LFQ")(codebook_size=2**32, dim=32, spherical=True),
        ),
        Case(
            name="ResidualLFQ 8x256 dim 256 (1x1024)",
            tokens=1024,
            make_input=lambda: torch.randn(1, 1024, 256),
            ours=lambda: ResidualLFQ(dim=256, codebook_size=256, num_quantizers=8),
            reference=lambda: _reference("ResidualLFQ")(
                dim=256, codebook_size=256, num_quantizers=8
            ),
        ),
    ]
    latent = _latent_quantize_case()
    if latent is not None:
        result.append(latent)
    return result
