"""Collectives that gradients can flow through, built on a `Communicator` (no torch.distributed).

`differentiable_all_reduce_sum(t, comm)` returns the sum of `t` over ranks. Every rank's loss
depends on every rank's `t`, so the gradient reaching rank r's `t` is the sum over ranks of
the gradients with respect to the reduced tensor: the backward is itself an all-reduce sum.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from src.quantizers.communicator import Communicator


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, tensor: Tensor, communicator: Communicator) -> Tensor:
        ctx.communicator = communicator
        return communicator.all_reduce(tensor, "sum")

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return ctx.communicator.all_reduce(grad.contiguous(), "sum"), None


def differentiable_all_reduce_sum(tensor: Tensor, communicator: Communicator) -> Tensor:
    """Sum of `tensor` over ranks; the identity (and no autograd node) on a single process."""
    if communicator.world_size == 1:
        return tensor
    return _AllReduceSum.apply(tensor, communicator)
