"""Cosine dead-code refills on 2 gloo ranks whose shards hold different numbers of zero tokens:
the ranks agree, equal one process on the whole batch, and every code stays unit-norm."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from src.quantizers import ResidualVQ, VectorQuantize
from tests.distributed.harness import (
    Case,
    assert_ranks_agree_and_match,
    run_cases,
    run_single_case,
    train_steps_with_history,
)

STEPS = 4
THRESHOLD = 1.5  # not an integer: only revival sets a cluster size to exactly this
COSINE = {"use_cosine_sim": True, "kmeans_init": True, "threshold_ema_dead_code": THRESHOLD}


def zero_heavy_batch(step: int) -> Tensor:
    """(8, 32, 16) clustered tokens; rank 0's sequences (0-3) keep 3 nonzero tokens each,
    rank 1's (4-7) keep 20, so most of rank 0's pool cannot refill a cosine code."""
    generator = torch.Generator().manual_seed(300 + step)
    centres = torch.randn(8, 16, generator=generator) * 3
    batch = centres[torch.randint(0, 8, (8, 32), generator=generator)]
    batch = batch + 0.1 * torch.randn(8, 32, 16, generator=generator)
    batch[:4, 3:] = 0.0
    batch[4:, 20:] = 0.0
    return batch


def build_vq() -> VectorQuantize:
    return VectorQuantize(dim=16, codebook_size=32, decay=0.8, **COSINE)


def build_heads_vq() -> VectorQuantize:
    """Two 8-wide heads of a 16-wide token: no projection, so zero tokens stay zero latents."""
    return VectorQuantize(
        dim=16,
        codebook_size=32,
        codebook_dim=8,
        heads=2,
        separate_codebook_per_head=True,
        decay=0.8,
        **COSINE,
    )


def build_shared_rvq() -> ResidualVQ:
    """One codebook pooled over 3 depths: the union's refill flags go segment by segment."""
    return ResidualVQ(dim=16, num_quantizers=3, codebook_size=32, shared_codebook=True, **COSINE)


CASES = {
    name: Case(build, zero_heavy_batch, STEPS, train_steps_with_history)
    for name, build in [("vq", build_vq), ("heads", build_heads_vq), ("shared", build_shared_rvq)]
}


@pytest.fixture(scope="module")
def synced(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Tensor]]]:
    """Every case on 2 gloo ranks, in one process group."""
    return run_cases(CASES, tmp_path_factory.mktemp("cosine_refill_sync"))


@pytest.mark.parametrize("name", sorted(CASES))
def test_ranks_agree_equal_single_process_and_codes_stay_unit(synced, name: str) -> None:
    ranks = synced[name]
    assert_ranks_agree_and_match(ranks, run_single_case(CASES[name]))
    state = ranks[0]
    revived = 0
    for step in range(STEPS):
        for key in [k for k in state if k.startswith(f"step{step}/") and k.endswith("embed")]:
            codes = state[key].reshape(-1, state[key].shape[-1])
            assert torch.isfinite(codes).all()
            torch.testing.assert_close(codes.norm(dim=-1), torch.ones(codes.shape[0]))
            revived += int((state[key.replace("embed", "cluster_size")] == THRESHOLD).sum())
    assert revived > 0, "no dead code was revived: the case does not test refills"
