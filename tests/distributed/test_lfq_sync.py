"""LFQ on 2 gloo ranks: the batch entropy's average code probabilities are summed over ranks
differentiably, so SGD on the projections (gradients averaged as DDP does) follows the same
path as one process that sees the whole batch."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from src.quantizers import LFQ
from tests.distributed.harness import (
    Case,
    assert_ranks_agree_and_match,
    run_cases,
    run_single_case,
    train_with_sgd,
)

STEPS = 4


def global_batch(step: int) -> Tensor:
    """(8, 24, 16): the two ranks' shards come from different distributions, so each rank's
    own batch entropy differs from that of the union."""
    generator = torch.Generator().manual_seed(300 + step)
    x = torch.randn(8, 24, 16, generator=generator)
    x[4:] = x[4:] * 0.5 + 1.0
    return x


def build_lfq() -> LFQ:
    return LFQ(
        dim=16,
        codebook_size=2**6,
        entropy_loss_weight=1.0,
        commitment_loss_weight=0.1,
        inv_temperature=1.0,
    )


class Unsynced(nn.Module):
    """The same LFQ, deaf to the communicator: each rank's entropy sees only its shard."""

    def __init__(self) -> None:
        super().__init__()
        self.lfq = build_lfq()

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        return self.lfq(x)

    def set_communicator(self, communicator: object) -> None:
        pass


CASES = {
    "lfq": Case(build_lfq, global_batch, STEPS, train_with_sgd),
    "unsynced": Case(Unsynced, global_batch, STEPS, train_with_sgd),
}


@pytest.fixture(scope="module")
def synced(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Tensor]]]:
    return run_cases(CASES, tmp_path_factory.mktemp("lfq_sync"))


def test_lfq_entropy_training_equals_single_process(synced) -> None:
    ranks, single = synced["lfq"], run_single_case(CASES["lfq"])
    assert_ranks_agree_and_match(ranks, single)
    torch.manual_seed(0)
    initial = build_lfq().state_dict()
    moved = (ranks[0]["project_in.weight"] - initial["project_in.weight"]).abs().max()
    assert moved > 1e-2, "SGD barely moved the projection: the comparison would be vacuous"


def test_control_local_entropy_departs_from_single_process(synced) -> None:
    """Without the all-reduce the ranks' averaged gradients differ from the union's."""
    ranks, single = synced["unsynced"], run_single_case(CASES["unsynced"])
    assert torch.equal(ranks[0]["lfq.project_in.weight"], ranks[1]["lfq.project_in.weight"])
    gap = (ranks[0]["lfq.project_in.weight"] - single["lfq.project_in.weight"]).abs().max()
    assert gap > 1e-3
