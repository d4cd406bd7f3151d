"""PSNR and SSIM under DDP: torchmetrics reduces their states over ranks, so two ranks with
uneven shards report the per-image means of the whole gathered set."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from src.models.image_tokenizer import per_image_psnr, per_image_ssim
from tests.distributed.harness import WORLD_SIZE, exit_worker, store_url

SHARD_SIZES = (3, 6)  # uneven: the last batch of an epoch need not split evenly


def shard(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank 0 reconstructs well, rank 1 badly: a rank-local mean is far from the global one."""
    generator = torch.Generator().manual_seed(rank)
    target = torch.rand(SHARD_SIZES[rank], 1, 16, 16, generator=generator)
    noise = torch.randn(target.shape, generator=generator) * (0.01 if rank == 0 else 0.3)
    return (target + noise).clamp(0, 1), target


def _worker(rank: int, init_method: str, out: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=WORLD_SIZE)
    try:
        psnr, ssim = per_image_psnr(), per_image_ssim()
        prediction, target = shard(rank)
        for metric in (psnr, ssim):  # two updates per rank, as two batches
            metric.update(prediction[:2], target[:2])
            metric.update(prediction[2:], target[2:])
        values = {"psnr": psnr.compute(), "ssim": ssim.compute()}
        torch.save(values, Path(out) / f"metrics{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()
    exit_worker()


def test_psnr_and_ssim_under_ddp_equal_the_gathered_values(tmp_path: Path) -> None:
    mp.start_processes(
        _worker, args=(store_url(tmp_path), str(tmp_path)), nprocs=WORLD_SIZE, start_method="spawn"
    )
    psnr, ssim = per_image_psnr(), per_image_ssim()
    shards = [shard(rank) for rank in range(WORLD_SIZE)]
    prediction = torch.cat([p for p, _ in shards])
    target = torch.cat([t for _, t in shards])
    psnr.update(prediction, target)
    ssim.update(prediction, target)
    expected = {"psnr": psnr.compute(), "ssim": ssim.compute()}
    alone = per_image_psnr()
    alone.update(*shards[0])
    assert abs(alone.compute() - expected["psnr"]) > 3.0  # an unsynced rank would be caught
    for rank in range(WORLD_SIZE):
        got = torch.load(tmp_path / f"metrics{rank}.pt", weights_only=True)
        for name, value in expected.items():
            torch.testing.assert_close(got[name], value, msg=f"rank {rank}: {name}")
