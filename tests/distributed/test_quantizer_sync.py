"""VectorQuantize state stays identical across ranks and equals a single process on the union.

Rank 0's shard and rank 1's shard of every global batch come from different clusters, so
k-means or dead-code revival that looked only at rank 0's tokens would miss half the data.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from src.quantizers import VectorQuantize
from src.quantizers.communicator import Communicator
from tests.distributed.harness import (
    Case,
    assert_ranks_agree_and_match,
    run_cases,
    run_distributed,
    run_single,
    run_single_case,
    train_steps_with_history,
)

STEPS = 4
# EMA cluster size under which a code is revived; a revived code's size is set to it. Not an
# integer, so a code whose EMA merely stays put (count == size) cannot look revived.
THRESHOLD = 1.5


def global_batch(step: int) -> Tensor:
    """(8, 32, 16): sequences 0-3 (rank 0's shard) and 4-7 (rank 1's) from different centres."""
    generator = torch.Generator().manual_seed(100 + step)
    centres = torch.randn(2, 8, 16, generator=generator) * 3
    picks = torch.randint(0, 8, (2, 4, 32), generator=generator)
    halves = [centres[h][picks[h]] for h in range(2)]
    return torch.cat(halves) + 0.1 * torch.randn(8, 32, 16, generator=generator)


def masked_batch(step: int) -> Tensor:
    """As `global_batch`, with 5 tokens of each rank-0 sequence and 20 of each rank-1 sequence
    zeroed (masked out by `MaskZeroTokens`): the ranks hold different numbers of tokens."""
    batch = global_batch(step)
    batch[:4, -5:] = 0.0
    batch[4:, -20:] = 0.0
    return batch


class MaskZeroTokens(nn.Module):
    """Runs a VectorQuantize with all-zero tokens masked out."""

    def __init__(self, vq: VectorQuantize) -> None:
        super().__init__()
        self.vq = vq

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        return self.vq(x, mask=x.abs().sum(-1) > 0)

    def set_communicator(self, communicator: Communicator) -> None:
        self.vq.set_communicator(communicator)


def build_ema_vq() -> VectorQuantize:
    return VectorQuantize(dim=16, codebook_size=32, decay=0.8)


def build_kmeans_dead_vq() -> VectorQuantize:
    return VectorQuantize(
        dim=16, codebook_size=32, decay=0.8, kmeans_init=True, threshold_ema_dead_code=THRESHOLD
    )


def build_masked_heads_vq() -> MaskZeroTokens:
    vq = VectorQuantize(
        dim=16,
        codebook_size=16,
        codebook_dim=8,
        heads=2,
        separate_codebook_per_head=True,
        decay=0.8,
        kmeans_init=True,
        threshold_ema_dead_code=THRESHOLD,
    )
    return MaskZeroTokens(vq)


CASES = {
    "ema": Case(build_ema_vq, global_batch, STEPS),
    "kmeans_dead": Case(build_kmeans_dead_vq, global_batch, STEPS, train_steps_with_history),
    "masked_heads": Case(build_masked_heads_vq, masked_batch, STEPS, train_steps_with_history),
}


@pytest.fixture(scope="module")
def synced(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Tensor]]]:
    """Every case on 2 gloo ranks, in one process group."""
    return run_cases(CASES, tmp_path_factory.mktemp("vq_sync"))


@pytest.mark.parametrize("name", sorted(CASES))
def test_ranks_agree_and_equal_single_process(synced, name: str) -> None:
    assert_ranks_agree_and_match(synced[name], run_single_case(CASES[name]))


def test_kmeans_init_runs_once_on_the_union_of_ranks(synced) -> None:
    state = synced["kmeans_dead"][0]
    assert bool(state["step0/initted"])
    # every token of the first batch, rank 1's included, lies near a code (noise std 0.1,
    # clusters about 4 apart): k-means saw both shards
    tokens = global_batch(0).reshape(-1, 16)
    nearest = torch.cdist(tokens, state["step0/embed"]).min(dim=1).values
    assert nearest[: tokens.shape[0] // 2].max() < 1.0, "rank 0's clusters have no code"
    assert nearest[tokens.shape[0] // 2 :].max() < 1.0, "rank 1's clusters have no code"


def _revived_rows(state: dict[str, Tensor], step: int, prefix: str = "") -> Tensor:
    """Codebook rows that dead-code revival set in this step (their size is the threshold)."""
    size = state[f"step{step}/{prefix}cluster_size"]
    embed = state[f"step{step}/{prefix}embed"]
    return embed[size == THRESHOLD]


def test_dead_codes_are_revived_from_both_ranks_tokens(synced) -> None:
    state = synced["kmeans_dead"][0]
    from_rank = [0, 0]
    for step in range(STEPS):
        tokens = global_batch(step).reshape(2, -1, 16)  # (rank, tokens, dim)
        for row in _revived_rows(state, step):
            owners = [r for r in range(2) if (tokens[r] == row).all(dim=-1).any()]
            assert len(owners) == 1, "a revived code is not one of the step's tokens"
            from_rank[owners[0]] += 1
    assert from_rank[0] > 0 and from_rank[1] > 0, f"revived codes per rank: {from_rank}"


def test_separate_head_books_with_uneven_masks_revive_codes(synced) -> None:
    state = synced["masked_heads"][0]
    assert bool(state["step0/vq.initted"])
    revived = sum(len(_revived_rows(state, s, "vq.")) for s in range(STEPS))
    assert revived > 0


def test_without_a_communicator_ranks_drift_apart(tmp_path: Path) -> None:
    ranks = run_distributed(build_ema_vq, global_batch, STEPS, tmp_path, sync=False)
    assert not torch.equal(ranks[0]["embed"], ranks[1]["embed"])


def test_quantizer_built_before_process_group_still_syncs(tmp_path: Path) -> None:
    build, batch = build_kmeans_dead_vq, global_batch
    ranks = run_distributed(build, batch, STEPS, tmp_path, build_before_group=True)
    assert_ranks_agree_and_match(ranks, run_single(build, batch, STEPS))
