"""The quantizers' `Communicator` built on a Lightning strategy (DDP, DDP-spawn, FSDP, ...)."""

from __future__ import annotations

from typing import Any

import torch

from src.quantizers.communicator import ReduceOp


class StrategyCommunicator:
    """Routes quantizer collectives through `trainer.strategy`, whatever strategy that is."""

    def __init__(self, strategy: Any) -> None:
        self.strategy = strategy

    @property
    def rank(self) -> int:
        return int(self.strategy.global_rank)

    @property
    def world_size(self) -> int:
        return int(self.strategy.world_size)

    def all_reduce(self, tensor: torch.Tensor, op: ReduceOp = "sum") -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        # Lightning's DDP reduce works in place; keep the caller's tensor intact.
        return self.strategy.reduce(tensor.clone(), reduce_op=op)

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return tensor.unsqueeze(0)
        return self.strategy.all_gather(tensor)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        return self.strategy.broadcast(tensor, src=src).to(tensor.device)
