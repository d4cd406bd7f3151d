"""Collectives built on a `Communicator` (no torch.distributed): a differentiable all-reduce
and an all-gather of tensors whose length differs between ranks.

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


def gather_lengths(length: int, communicator: Communicator, device: torch.device) -> list[int]:
    """Every rank's `length` (e.g. its number of valid tokens), in rank order."""
    mine = torch.tensor([length], dtype=torch.int64, device=device)
    return [int(n) for n in communicator.all_gather(mine).reshape(-1).tolist()]


def all_gather_varying(
    tensor: Tensor, communicator: Communicator, dim: int, lengths: list[int] | None = None
) -> Tensor:
    """Every rank's `tensor` concatenated along `dim` in rank order (no gradient).

    The ranks' lengths along `dim` may differ (masks keep different numbers of tokens); the
    rest of the shape must agree. Each rank pads to the longest, the padded tensors are
    gathered, and the padding is dropped again. `lengths` (from `gather_lengths`) saves a
    collective when the caller already has them.
    """
    dim = dim % tensor.ndim
    if lengths is None:
        lengths = gather_lengths(tensor.shape[dim], communicator, tensor.device)
    longest = max(lengths)
    pad_shape = list(tensor.shape)
    pad_shape[dim] = longest - tensor.shape[dim]
    padded = torch.cat([tensor.detach(), tensor.new_zeros(pad_shape)], dim=dim)
    gathered = communicator.all_gather(padded.contiguous())
    parts = [gathered[r].narrow(dim, 0, n) for r, n in enumerate(lengths)]
    return torch.cat(parts, dim=dim)
