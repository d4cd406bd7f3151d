"""Residual VQ on 2 gloo ranks, with quantize dropout, k-means init and dead-code revival: the
kept depth, the codebooks (a shared one pooled over depths included) agree across ranks and
equal one process that sees the whole batch."""

from __future__ import annotations

import re

import pytest
import torch
from torch import Tensor, nn

from src.quantizers import GroupedResidualVQ, ResidualVQ
from src.quantizers.communicator import Communicator
from tests.distributed.harness import (
    Case,
    assert_ranks_agree_and_match,
    run_cases,
    run_single_case,
    train_steps_with_history,
    train_with_sgd,
)

STEPS = 4
THRESHOLD = 1.5  # not an integer: only revival sets a cluster size to exactly this
VQ_KWARGS = {"quantize_dropout": True, "kmeans_init": True, "threshold_ema_dead_code": THRESHOLD}


def global_batch(step: int) -> Tensor:
    """(8, 32, 16): sequences 0-3 (rank 0's shard) and 4-7 (rank 1's) from different centres."""
    generator = torch.Generator().manual_seed(200 + step)
    centres = torch.randn(2, 8, 16, generator=generator) * 3
    picks = torch.randint(0, 8, (2, 4, 32), generator=generator)
    halves = [centres[h][picks[h]] for h in range(2)]
    return torch.cat(halves) + 0.3 * torch.randn(8, 32, 16, generator=generator)


def build_rvq() -> ResidualVQ:
    return ResidualVQ(dim=16, num_quantizers=4, codebook_size=16, **VQ_KWARGS)


def build_shared_rvq() -> ResidualVQ:
    return ResidualVQ(dim=16, num_quantizers=4, codebook_size=32, shared_codebook=True, **VQ_KWARGS)


def build_grvq() -> GroupedResidualVQ:
    return GroupedResidualVQ(dim=16, groups=2, num_quantizers=3, codebook_size=16, **VQ_KWARGS)


def train_recording_depths(
    quantizer: nn.Module, batches: list[Tensor], communicator: Communicator
) -> dict[str, Tensor]:
    """Per-step states, plus how many depths each step kept (`kept_depths`)."""
    kept: list[Tensor] = []

    def record(module: nn.Module, args: tuple, output: tuple) -> None:
        kept.append((output[1] >= 0).flatten(0, -2).any(0).sum())

    handle = quantizer.register_forward_hook(record)
    try:
        result = train_steps_with_history(quantizer, batches, communicator)
    finally:
        handle.remove()
    return {**result, "kept_depths": torch.stack(kept)}


def build_sizes_rvq() -> ResidualVQ:
    """A codebook size per depth (the reference's `codebook_size=(...)`)."""
    return ResidualVQ(dim=16, codebook_size=(8, 16, 16, 32), **VQ_KWARGS)


def build_qinco() -> ResidualVQ:
    """Implicit neural codebooks: codebooks and MLPs learn by gradient (no EMA)."""
    return ResidualVQ(
        dim=16,
        num_quantizers=3,
        codebook_size=16,
        implicit_neural_codebook=True,
        quantize_dropout=True,
        kmeans_init=True,
        mlp_kwargs={"depth": 1},
    )


CASES = {
    name: Case(build, global_batch, STEPS, train_recording_depths)
    for name, build in [
        ("rvq", build_rvq),
        ("shared", build_shared_rvq),
        ("grvq", build_grvq),
        ("sizes", build_sizes_rvq),
    ]
}
SGD_CASES = {"qinco": Case(build_qinco, global_batch, STEPS, train_with_sgd)}


@pytest.fixture(scope="module")
def synced(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Tensor]]]:
    """Every case on 2 gloo ranks, in one process group."""
    return run_cases(CASES, tmp_path_factory.mktemp("rvq_sync"))


@pytest.mark.parametrize("name", sorted(CASES))
def test_ranks_agree_and_equal_single_process(synced, name: str) -> None:
    ranks = synced[name]
    assert_ranks_agree_and_match(ranks, run_single_case(CASES[name]))
    # the comparison covers k-means and revival: every layer that ran was seeded by k-means,
    # and some codes were revived
    final = ranks[0]
    deepest = int(final["kept_depths"].max())
    initted = {
        key: bool(value)
        for key, value in final.items()
        if key.startswith(f"step{STEPS - 1}/") and key.endswith("initted")
    }
    ran = {key: flag for key, flag in initted.items() if _layer(key) < deepest}
    assert ran and all(ran.values()), initted
    sizes = [v for k, v in final.items() if k.endswith("cluster_size")]
    assert sum(int((size == THRESHOLD).sum()) for size in sizes) > 0


def test_implicit_neural_codebooks_train_alike_on_two_ranks(tmp_path) -> None:
    """QINCo under DDP: SGD on the codebooks and MLPs with rank-averaged gradients, k-means
    seeded on every rank's tokens, quantize dropout depth agreed: the ranks agree and equal
    one process on the whole batch; training moved the MLPs."""
    ranks = run_cases(SGD_CASES, tmp_path)["qinco"]
    assert_ranks_agree_and_match(ranks, run_single_case(SGD_CASES["qinco"]))
    torch.manual_seed(0)
    initial = build_qinco().state_dict()
    final = ranks[0]
    assert not torch.equal(final["mlps.0.proj_in.weight"], initial["mlps.0.proj_in.weight"])
    assert all(bool(v) for k, v in final.items() if k.endswith("initted"))


def _layer(state_key: str) -> int:
    """The depth of a state-dict key such as `step3/groups.1.stack.layers.2.initted`."""
    return int(re.search(r"layers\.(\d+)\.", state_key).group(1))


def test_quantize_dropout_varied_the_depth(synced) -> None:
    """Some steps dropped layers, so the comparison above exercised the synced depth."""
    for name in CASES:
        depths = synced[name][0]["kept_depths"]
        assert len(set(depths.tolist())) > 1, f"{name}: depths {depths.tolist()}"
