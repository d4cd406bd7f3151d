"""How quantizers talk to other ranks without importing torch.distributed or Lightning.

The LightningModule installs an adapter over `trainer.strategy` (see
`src/models/strategy_communicator.py`); without one every quantizer runs single-process.
"""

from __future__ import annotations

from typing import Literal, Protocol, runtime_checkable

import torch
from torch import nn

ReduceOp = Literal["sum", "mean"]


@runtime_checkable
class Communicator(Protocol):
    """The collective operations a quantizer may need. All calls are made by every rank."""

    @property
    def rank(self) -> int: ...

    @property
    def world_size(self) -> int: ...

    def all_reduce(self, tensor: torch.Tensor, op: ReduceOp = "sum") -> torch.Tensor:
        """Return the reduction of `tensor` over ranks (a new tensor; input untouched)."""
        ...

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Return a tensor of shape (world_size, *tensor.shape) holding every rank's tensor."""
        ...

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Return rank `src`'s tensor on every rank."""
        ...


class SingleProcess:
    """The default communicator: one process, every collective is the identity."""

    rank = 0
    world_size = 1

    def all_reduce(self, tensor: torch.Tensor, op: ReduceOp = "sum") -> torch.Tensor:
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.unsqueeze(0)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        return tensor


SINGLE_PROCESS = SingleProcess()


class Distributable(nn.Module):
    """Mixin base for quantizers holding state learned outside gradients (EMA, k-means, ...).

    `communicator` is looked up at call time, so a quantizer built before the process group
    exists syncs as soon as one is installed with `set_communicator`.
    """

    def __init__(self) -> None:
        super().__init__()
        self._communicator: Communicator = SINGLE_PROCESS

    @property
    def communicator(self) -> Communicator:
        return self._communicator

    def set_communicator(self, communicator: Communicator) -> None:
        self._communicator = communicator


def install_communicator(module: nn.Module, communicator: Communicator) -> int:
    """Hand `communicator` to every submodule that accepts one; returns how many did."""
    count = 0
    for sub in module.modules():
        setter = getattr(sub, "set_communicator", None)
        if callable(setter):
            setter(communicator)
            count += 1
    return count
