"""Benchmark cases of the VectorQuantize family (imported by scripts/bench_quantizers.py).

Each case runs ours and vector-quantize-pytorch 1.32.0 with the same keywords on the same
input, forward+backward in training mode (EMA updates included). The "floor" row times one
(N x d) @ (d x K) matmul plus argmin for the K=8192 case: what a nearest-code search cannot
beat on this machine.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from scripts.bench_common import Case

DIM = 256


def _ours(class_name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        module = importlib.import_module("src.quantizers")
        if not hasattr(module, class_name):  # another family's class not written yet
            raise _MissingError(f"src.quantizers.{class_name} does not exist yet")
        return getattr(module, class_name)(**kwargs)

    return build


def _reference(class_name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        module = importlib.import_module("vector_quantize_pytorch")
        return getattr(module, class_name)(**kwargs)

    return build


class _MissingError(RuntimeError):
    """Raised by a builder whose class is not available; the case is then skipped."""


class MatmulArgminFloor(nn.Module):
    """One full (N x d) @ (d x K) matmul and argmin, without autograd: the search floor."""

    def __init__(self, dim: int, codebook_size: int) -> None:
        super().__init__()
        self.register_buffer("codebook_t", torch.randn(dim, codebook_size))

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return (x.reshape(-1, x.shape[-1]) @ self.codebook_t).argmin(dim=-1)


def _floor_objective(output: object, x: Tensor) -> Tensor:
    return x.sum() * 0.0  # nothing to backpropagate; keeps the driver's step uniform


def _sequence(batch: int, dim: int = DIM) -> Callable[[], Tensor]:
    return lambda: torch.randn(batch, 1024, dim)


def _available(build: Callable[[], nn.Module]) -> str:
    try:
        build()
    except _MissingError as missing:
        return str(missing)
    return ""


def cases() -> list[Case]:
    vq = "VectorQuantize"
    rows = [
        Case(
            "vq K=1024",
            8 * 1024,
            _sequence(8),
            _ours(vq, dim=DIM, codebook_size=1024),
            _reference(vq, dim=DIM, codebook_size=1024),
        ),
        Case(
            "vq K=8192",
            8 * 1024,
            _sequence(8),
            _ours(vq, dim=DIM, codebook_size=8192),
            _reference(vq, dim=DIM, codebook_size=8192),
        ),
        Case(
            "vq K=8192 floor: matmul+argmin",
            8 * 1024,
            _sequence(8),
            lambda: MatmulArgminFloor(DIM, 8192),
            None,
            objective=_floor_objective,
            notes="one (8192 x 256) @ (256 x 8192) matmul + argmin, no backward",
        ),
        Case(
            "vq cosine+dead-code K=1024",
            8 * 1024,
            _sequence(8),
            _ours(vq, dim=DIM, codebook_size=1024, use_cosine_sim=True, threshold_ema_dead_code=2),
            _reference(
                vq, dim=DIM, codebook_size=1024, use_cosine_sim=True, threshold_ema_dead_code=2
            ),
        ),
    ]
    rvq_ours = _ours("ResidualVQ", dim=DIM, num_quantizers=8, codebook_size=1024)
    missing = _available(rvq_ours)
    if missing:
        print(f"# skipped case 'rvq 8x K=1024': {missing}")
    else:
        rows.append(
            Case(
                "rvq 8x K=1024",
                8 * 1024,
                _sequence(8),
                rvq_ours,
                _reference("ResidualVQ", dim=DIM, num_quantizers=8, codebook_size=1024),
            )
        )
    big = {"dim": 64, "codebook_size": 65536}
    rows += [
        Case(
            "vq K=65536 d=64 32x1024",
            32 * 1024,
            _sequence(32, 64),
            _ours(vq, **big),
            _reference(vq, **big),
            steps=2,
            reference_skip_reason="skipped: its (N, K) distances and one-hot need ~24 GiB",
        ),
        Case(
            "vq K=65536 d=64 4x1024",
            4 * 1024,
            _sequence(4, 64),
            _ours(vq, **big),
            _reference(vq, **big),
            steps=2,
            notes="same codebook as the row above on 1/8 of the tokens, so the reference fits",
        ),
    ]
    return rows
