"""A quantizer `Communicator` over a plain `torch.distributed` process group.

For code that runs quantizers outside Lightning (custom loops, tests); inside Lightning the
tokenizers use `src.models.strategy_communicator.StrategyCommunicator` instead.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from src.quantizers.communicator import ReduceOp

_OPS = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM}


class TorchDistributedCommunicator:
    """Collectives on the default process group; every call is made by every rank."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "TorchDistributedCommunicator needs an initialised process group "
                "(torch.distributed.init_process_group) first"
            )
        self.group = group

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.group)

    def all_reduce(self, tensor: torch.Tensor, op: ReduceOp = "sum") -> torch.Tensor:
        result = tensor.detach().clone()
        dist.all_reduce(result, op=_OPS[op], group=self.group)
        return result / self.world_size if op == "mean" else result

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.detach().contiguous(), group=self.group)
        return torch.stack(parts)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        result = tensor.detach().clone().contiguous()
        dist.broadcast(result, src=src, group=self.group)
        return result
