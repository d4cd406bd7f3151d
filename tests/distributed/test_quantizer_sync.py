"""Quantizer state stays identical across ranks and equals a single process on the union."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from src.quantizers import VectorQuantize
from tests.distributed.harness import run_distributed, run_single

STEPS = 4


def global_batch(step: int) -> Tensor:
    generator = torch.Generator().manual_seed(100 + step)
    centres = torch.randn(8, 16, generator=generator) * 3
    picks = torch.randint(0, 8, (8, 32), generator=generator)
    return centres[picks] + 0.1 * torch.randn(8, 32, 16, generator=generator)


def build_ema_vq() -> VectorQuantize:
    return VectorQuantize(dim=16, codebook_size=32, decay=0.8)


def assert_states_match(ranks: list[dict[str, Tensor]], single: dict[str, Tensor]) -> None:
    for name, value in ranks[0].items():
        assert torch.equal(value, ranks[1][name]), f"{name} differs between ranks"
        torch.testing.assert_close(value, single[name], rtol=1e-5, atol=1e-5, msg=name)


def test_ema_vq_ranks_agree_and_equal_single_process(tmp_path: Path) -> None:
    ranks = run_distributed(build_ema_vq, global_batch, STEPS, tmp_path)
    single = run_single(build_ema_vq, global_batch, STEPS)
    assert_states_match(ranks, single)


def test_without_a_communicator_ranks_drift_apart(tmp_path: Path) -> None:
    ranks = run_distributed(build_ema_vq, global_batch, STEPS, tmp_path, sync=False)
    assert not torch.equal(ranks[0]["embed"], ranks[1]["embed"])


def test_quantizer_built_before_process_group_still_syncs(tmp_path: Path) -> None:
    ranks = run_distributed(build_ema_vq, global_batch, STEPS, tmp_path, build_before_group=True)
    assert_states_match(ranks, run_single(build_ema_vq, global_batch, STEPS))
