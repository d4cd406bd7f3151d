"""The prior's epoch metrics under DDP: 2 gloo ranks, each on its shard of the batch, report the
expert loads, expert utilization, router entropy, z-loss and NLL of one process on the union."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from src.models.prior import CodePrior
from tests.distributed.harness import WORLD_SIZE, exit_worker, store_url

NET = {
    "hidden_size": 32,
    "intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "max_position_embeddings": 64,
}
SYNCED = ["load", "expert_utilization", "router_entropy", "z_loss"]


def build() -> CodePrior:
    torch.manual_seed(0)
    return CodePrior(NET, codebook_sizes=[16, 4], grid=[3, 3], num_classes=10).eval()


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """8 sequences; rank 0 gets codes from the low half of slot 0, rank 1 the high half, so the
    ranks route differently."""
    gen = torch.Generator().manual_seed(5)
    low = torch.randint(0, 8, (4, 3, 3), generator=gen)
    high = torch.randint(8, 16, (4, 3, 3), generator=gen)
    slot1 = torch.randint(0, 4, (8, 3, 3), generator=gen)
    codes = torch.stack([torch.cat([low, high]), slot1], -1)
    return codes, torch.arange(8) % 10


def epoch_values(prior: CodePrior, codes: torch.Tensor, labels: torch.Tensor) -> dict:
    with torch.no_grad():
        prior.shared_step((codes, labels), "val")
    metrics = prior.metrics_for("val")
    values = dict(metrics["moe"].compute())
    values.update(metrics["nll"].compute())
    return values


def _worker(rank: int, init_method: str, out: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=WORLD_SIZE)
    try:
        codes, labels = batch()
        part = slice(4 * rank, 4 * rank + 4)
        prior = build()
        torch.save(epoch_values(prior, codes[part], labels[part]), Path(out) / f"r{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()
    exit_worker()


def test_expert_statistics_of_two_ranks_equal_one_process_on_the_union(tmp_path: Path) -> None:
    mp.start_processes(
        _worker, args=(store_url(tmp_path), str(tmp_path)), nprocs=WORLD_SIZE, start_method="spawn"
    )
    torch.set_num_threads(1)
    expected = epoch_values(build(), *batch())
    for rank in range(WORLD_SIZE):
        got = torch.load(tmp_path / f"r{rank}.pt", weights_only=True)
        for name in [*SYNCED, "nll", "bits_per_sample"]:
            torch.testing.assert_close(got[name], expected[name], msg=f"rank {rank}: {name}")
    # the control: rank 0's shard alone routes differently from the union
    codes, labels = batch()
    alone = epoch_values(build(), codes[:4], labels[:4])
    assert (alone["load"] - expected["load"]).abs().max() > 1e-3
