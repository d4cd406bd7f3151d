"""Codebook usage under DDP: counts summed over ranks equal the usage of the gathered indices."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from src.metrics import CodebookUsage
from tests.distributed.harness import WORLD_SIZE, exit_worker, store_url

CODEBOOK_SIZE, NUM_CODEBOOKS = 16, 2


def shard_indices(rank: int) -> torch.Tensor:
    """Rank-specific indices: rank 0 uses low codes, rank 1 high codes, -1 marks dropped ones."""
    generator = torch.Generator().manual_seed(rank)
    low = 0 if rank == 0 else CODEBOOK_SIZE // 2
    indices = torch.randint(
        low, low + CODEBOOK_SIZE // 2 - 2, (50, NUM_CODEBOOKS), generator=generator
    )
    indices[::7, 1] = -1
    return indices


def _worker(rank: int, init_method: str, out: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=WORLD_SIZE)
    try:
        metric = CodebookUsage(CODEBOOK_SIZE, NUM_CODEBOOKS)
        metric.update(shard_indices(rank))
        torch.save(metric.compute(), Path(out) / f"usage{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()
    exit_worker()


def test_usage_under_ddp_equals_usage_of_gathered_indices(tmp_path: Path) -> None:
    mp.start_processes(
        _worker, args=(store_url(tmp_path), str(tmp_path)), nprocs=WORLD_SIZE, start_method="spawn"
    )
    reference = CodebookUsage(CODEBOOK_SIZE, NUM_CODEBOOKS)
    reference.update(torch.cat([shard_indices(r) for r in range(WORLD_SIZE)]))
    expected = reference.compute()
    for rank in range(WORLD_SIZE):
        got = torch.load(tmp_path / f"usage{rank}.pt", weights_only=True)
        for name, value in expected.items():
            torch.testing.assert_close(got[name], value, msg=f"rank {rank}: {name}")
    # each rank alone sees at most half of the codes; the synced value must see more
    assert expected["utilization"] > 0.5
