"""Run a quantizer for a few training steps on 2 gloo processes and on 1 process.

Each rank sees its shard of every global batch; the single process sees the whole batch.
A quantizer whose out-of-gradient state is synced correctly ends bitwise identical on both
ranks and, to float tolerance, equal to the single-process run.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

from src.utils.torch_communicator import TorchDistributedCommunicator

WORLD_SIZE = 2

BuildFn = Callable[[], nn.Module]
BatchFn = Callable[[int], Tensor]  # step -> global batch (batch-first)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_steps(quantizer: nn.Module, batches: list[Tensor]) -> dict[str, Tensor]:
    """Forward+backward on each batch in training mode; returns the final state dict."""
    quantizer.train()
    for batch in batches:
        x = batch.clone().requires_grad_(True)
        output = quantizer(x)
        loss = output[0].float().square().mean()
        extra = getattr(output, "loss", None)
        if isinstance(extra, Tensor):
            loss = loss + extra.float().sum()
        loss.backward()
    return {k: v.detach().clone() for k, v in quantizer.state_dict().items()}


def _worker(
    rank: int,
    port: int,
    build: BuildFn,
    batch: BatchFn,
    steps: int,
    out: str,
    early: bool,
    sync: bool,
) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    torch.manual_seed(0)
    quantizer = build() if early else None  # built before the process group exists
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE
    )
    try:
        if quantizer is None:
            quantizer = build()
        if sync:
            quantizer.set_communicator(TorchDistributedCommunicator())
        torch.manual_seed(1)  # same stream on every rank and in the single-process run
        shards = [batch(step).chunk(WORLD_SIZE)[rank] for step in range(steps)]
        torch.save(train_steps(quantizer, shards), Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_distributed(
    build: BuildFn,
    batch: BatchFn,
    steps: int,
    tmp_path: Path,
    build_before_group: bool = False,
    sync: bool = True,
) -> list[dict[str, Tensor]]:
    """State dicts of both ranks after `steps` steps on 2 gloo processes.

    `sync=False` leaves the quantizer without a communicator: the control case that shows
    the comparison would catch ranks drifting apart.
    """
    mp.start_processes(
        _worker,
        args=(_free_port(), build, batch, steps, str(tmp_path), build_before_group, sync),
        nprocs=WORLD_SIZE,
        start_method="spawn",
    )
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD_SIZE)]


def run_single(build: BuildFn, batch: BatchFn, steps: int) -> dict[str, Tensor]:
    """State dict after the same steps on one process that sees every global batch."""
    torch.manual_seed(0)
    quantizer = build()
    torch.manual_seed(1)
    return train_steps(quantizer, [batch(step) for step in range(steps)])
