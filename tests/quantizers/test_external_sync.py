"""vector-quantize-pytorch modules under `quantizer=external` on 2 gloo ranks, built before the
process group exists (as train.py builds the model before Lightning creates it): the library
then leaves its own torch.distributed sync off, and the wrapper's `set_communicator` routes its
codebook hooks through the communicator. EMA, k-means init and dead-code revival end equal on
both ranks and equal to one process that sees every global batch; the control (the same
wrapper whose communicator never arrives) shows the comparison failing without the wiring.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from src.quantizers import ExternalQuantizer
from src.quantizers.communicator import Communicator
from tests.distributed.harness import (
    Case,
    assert_ranks_agree_and_match,
    run_cases,
    run_single_case,
    train_steps_with_history,
)

STEPS = 3


def global_batch(step: int) -> Tensor:
    """(8, 32, 16): sequences 0-3 (rank 0's shard) and 4-7 (rank 1's) from different centres,
    so state learned from rank 0's tokens alone would differ from the union's."""
    generator = torch.Generator().manual_seed(200 + step)
    centres = torch.randn(2, 8, 16, generator=generator) * 3
    picks = torch.randint(0, 8, (2, 4, 32), generator=generator)
    halves = [centres[h][picks[h]] for h in range(2)]
    return torch.cat(halves) + 0.1 * torch.randn(8, 32, 16, generator=generator)


def build_ema_vq() -> ExternalQuantizer:
    return ExternalQuantizer(
        "vector_quantize_pytorch.VectorQuantize", 16, codebook_size=32, decay=0.8
    )


def build_kmeans_dead_vq() -> ExternalQuantizer:
    return ExternalQuantizer(
        "vector_quantize_pytorch.VectorQuantize",
        16,
        codebook_size=32,
        decay=0.8,
        kmeans_init=True,
        threshold_ema_dead_code=1.5,
    )


def build_kmeans_rvq() -> ExternalQuantizer:
    return ExternalQuantizer(
        "vector_quantize_pytorch.ResidualVQ",
        16,
        num_quantizers=2,
        codebook_size=16,
        decay=0.8,
        kmeans_init=True,
    )


class NeverSynced(nn.Module):
    """The control: the same wrapper, with the communicator dropped on the floor."""

    def __init__(self) -> None:
        super().__init__()
        self.quantizer = build_kmeans_dead_vq()

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        return self.quantizer(x)

    def set_communicator(self, communicator: Communicator) -> None:
        pass


CASES = {
    "ema": Case(build_ema_vq, global_batch, STEPS, train_steps_with_history),
    "kmeans_dead": Case(build_kmeans_dead_vq, global_batch, STEPS, train_steps_with_history),
    "kmeans_rvq": Case(build_kmeans_rvq, global_batch, STEPS, train_steps_with_history),
    "control": Case(NeverSynced, global_batch, STEPS, train_steps_with_history),
}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Tensor]]]:
    return run_cases(CASES, tmp_path_factory.mktemp("external_sync"), build_before_group=True)


@pytest.mark.parametrize("name", ["ema", "kmeans_dead", "kmeans_rvq"])
def test_library_state_is_synced_through_the_communicator(ranks, name: str) -> None:
    single = run_single_case(CASES[name])
    assert_ranks_agree_and_match(ranks[name], single)
    if name == "kmeans_dead":  # the case exercised what it is named for
        assert bool(single["step0/module._codebook.initted"])
        revived = single[f"step{STEPS - 1}/module._codebook.cluster_size"] == 1.5
        assert revived.any(), "no code was revived: the dead-code path went untested"


def test_without_the_communicator_ranks_drift_apart(ranks) -> None:
    single = run_single_case(CASES["control"])
    state = "step0/quantizer.module._codebook.embed"
    assert not torch.equal(ranks["control"][0][state], ranks["control"][1][state])
    with pytest.raises(AssertionError):
        assert_ranks_agree_and_match(ranks["control"], single)
