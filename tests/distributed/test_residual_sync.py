"""Residual VQ on 2 gloo ranks: the shared codebook's pooled EMA step and the quantize-dropout
depth agree across ranks and equal one process that sees the whole batch."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from src.quantizers import GroupedResidualVQ, ResidualVQ
from tests.distributed.harness import run_distributed, run_single

STEPS = 4


def global_batch(step: int) -> Tensor:
    generator = torch.Generator().manual_seed(200 + step)
    centres = torch.randn(8, 16, generator=generator) * 3
    picks = torch.randint(0, 8, (8, 32), generator=generator)
    return centres[picks] + 0.3 * torch.randn(8, 32, 16, generator=generator)


def build_shared_rvq() -> ResidualVQ:
    return ResidualVQ(
        dim=16, num_quantizers=4, codebook_size=32, shared_codebook=True, quantize_dropout=True
    )


def build_grvq() -> GroupedResidualVQ:
    return GroupedResidualVQ(
        dim=16, groups=2, num_quantizers=3, codebook_size=16, quantize_dropout=True
    )


def _assert_match(ranks: list[dict[str, Tensor]], single: dict[str, Tensor]) -> None:
    for name, value in ranks[0].items():
        assert torch.equal(value, ranks[1][name]), f"{name} differs between ranks"
        torch.testing.assert_close(value, single[name], rtol=1e-5, atol=1e-5, msg=name)


def test_shared_codebook_rvq_ranks_agree_and_equal_single_process(tmp_path: Path) -> None:
    ranks = run_distributed(build_shared_rvq, global_batch, STEPS, tmp_path)
    _assert_match(ranks, run_single(build_shared_rvq, global_batch, STEPS))


def test_grouped_rvq_ranks_agree_and_equal_single_process(tmp_path: Path) -> None:
    ranks = run_distributed(build_grvq, global_batch, STEPS, tmp_path)
    _assert_match(ranks, run_single(build_grvq, global_batch, STEPS))
