"""StrategyCommunicator against a fake Lightning strategy that behaves as DDPStrategy does:
`reduce` works in place, `all_gather` stacks, `broadcast` returns the source rank's object."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.strategies import SingleDeviceStrategy
from torch import Tensor

from src.models.strategy_communicator import StrategyCommunicator
from src.quantizers.communicator import Communicator


class FakeStrategy:
    """Two or more ranks whose tensors are known up front; this process is `global_rank`."""

    def __init__(self, rank_tensors: list[Tensor], global_rank: int = 0) -> None:
        self.rank_tensors = rank_tensors
        self.global_rank = global_rank
        self.world_size = len(rank_tensors)
        self.calls: list[str] = []

    def _others(self) -> list[Tensor]:
        return [t for r, t in enumerate(self.rank_tensors) if r != self.global_rank]

    def reduce(self, tensor: Tensor, group: object = None, reduce_op: str = "mean") -> Tensor:
        """In place, as Lightning's `_sync_ddp`; only the op names Lightning reads."""
        self.calls.append(f"reduce:{reduce_op}")
        if reduce_op not in ("sum", "mean"):
            raise ValueError(f"unknown reduce_op {reduce_op!r}")
        for other in self._others():
            tensor.add_(other)
        return tensor.div_(self.world_size) if reduce_op == "mean" else tensor

    def all_gather(self, tensor: Tensor, group: object = None, sync_grads: bool = False) -> Tensor:
        self.calls.append("all_gather")
        parts = list(self.rank_tensors)
        parts[self.global_rank] = tensor
        return torch.stack(parts)

    def broadcast(self, obj: Tensor, src: int = 0) -> Tensor:
        """The source rank's tensor, where that rank held it (here: on the CPU)."""
        self.calls.append(f"broadcast:{src}")
        return self.rank_tensors[src].clone()


class NoCollectives:
    """One process: any collective call is an error."""

    global_rank = 0
    world_size = 1

    def reduce(self, *args: object, **kwargs: object) -> Tensor:
        raise AssertionError("a single process called strategy.reduce")

    def all_gather(self, *args: object, **kwargs: object) -> Tensor:
        raise AssertionError("a single process called strategy.all_gather")

    def broadcast(self, *args: object, **kwargs: object) -> Tensor:
        raise AssertionError("a single process called strategy.broadcast")


RANK0 = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
RANK1 = torch.tensor([[10.0, 20.0], [30.0, 40.0]])


def _two_ranks(rank: int = 1) -> tuple[StrategyCommunicator, FakeStrategy]:
    strategy = FakeStrategy([RANK0.clone(), RANK1.clone()], global_rank=rank)
    return StrategyCommunicator(strategy), strategy


def test_it_is_a_communicator_with_the_strategys_rank_and_size() -> None:
    communicator, _ = _two_ranks(rank=1)
    assert isinstance(communicator, Communicator)
    assert (communicator.rank, communicator.world_size) == (1, 2)


@pytest.mark.parametrize(
    ("op", "expected"), [("sum", RANK0 + RANK1), ("mean", (RANK0 + RANK1) / 2)]
)
def test_all_reduce_gives_the_value_and_leaves_the_input_unchanged(op: str, expected) -> None:
    communicator, strategy = _two_ranks(rank=1)
    mine = RANK1.clone()
    result = communicator.all_reduce(mine, op)
    torch.testing.assert_close(result, expected, rtol=0, atol=0)
    assert torch.equal(mine, RANK1), "the in-place reduce reached the caller's tensor"
    assert result.data_ptr() != mine.data_ptr()
    assert strategy.calls == [f"reduce:{op}"]


def test_all_gather_stacks_every_rank_in_rank_order() -> None:
    communicator, _ = _two_ranks(rank=1)
    gathered = communicator.all_gather(RANK1.clone())
    assert gathered.shape == (2, *RANK1.shape)
    assert torch.equal(gathered[0], RANK0) and torch.equal(gathered[1], RANK1)


def test_broadcast_returns_the_source_value_on_the_callers_device() -> None:
    communicator, strategy = _two_ranks(rank=1)
    assert torch.equal(communicator.broadcast(RANK1.clone(), src=0), RANK0)
    # the source's tensor arrives where the source held it (cpu); the caller's is on `meta`
    result = communicator.broadcast(torch.empty(2, 2, device="meta"), src=0)
    assert result.device.type == "meta" and result.shape == RANK0.shape
    assert strategy.calls == ["broadcast:0", "broadcast:0"]


@pytest.mark.parametrize(
    "strategy", [NoCollectives(), SingleDeviceStrategy(device="cpu")], ids=["fake", "lightning"]
)
def test_one_process_short_cuts_every_collective(strategy: object) -> None:
    communicator = StrategyCommunicator(strategy)
    tensor = RANK0.clone()
    assert (communicator.rank, communicator.world_size) == (0, 1)
    assert communicator.all_reduce(tensor, "sum") is tensor
    assert communicator.all_reduce(tensor, "mean") is tensor
    assert communicator.broadcast(tensor, src=0) is tensor
    gathered = communicator.all_gather(tensor)
    assert gathered.shape == (1, 2, 2) and torch.equal(gathered[0], tensor)
