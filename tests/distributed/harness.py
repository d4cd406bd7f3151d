"""Run quantizers for a few training steps on 2 gloo processes and on 1 process.

Each rank sees its shard of every global batch; the single process sees the whole batch.
A quantizer whose out-of-gradient state is synced correctly ends bitwise identical on both
ranks and, to float tolerance, equal to the single-process run. Several cases can share one
process group (`run_cases`), since starting the two processes costs seconds.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

from src.quantizers.communicator import SINGLE_PROCESS, Communicator
from src.utils.torch_communicator import TorchDistributedCommunicator

WORLD_SIZE = 2

BuildFn = Callable[[], nn.Module]
BatchFn = Callable[[int], Tensor]  # step -> global batch (batch-first)
# (quantizer, this process's batches, communicator) -> tensors to compare, e.g. the state dict
TrainFn = Callable[[nn.Module, list[Tensor], Communicator], dict[str, Tensor]]


def store_url(directory: Path) -> str:
    """A new file store for one process group. A TCP store would need a free port and has
    rank 0 host it on a thread that, left running at interpreter exit, now and then aborts
    that process (SIGABRT, "terminate called without an active exception")."""
    return f"file://{directory}/process_group_{uuid.uuid4().hex}"


def _loss(output: tuple) -> Tensor:
    """Mean square of the quantized output plus the quantizer's own loss, if any."""
    loss = output[0].float().square().mean()
    extra = output[2] if len(output) > 2 else None
    if isinstance(extra, Tensor):
        loss = loss + extra.float().sum()
    return loss


def _state(quantizer: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in quantizer.state_dict().items()}


def train_steps(
    quantizer: nn.Module, batches: list[Tensor], communicator: Communicator = SINGLE_PROCESS
) -> dict[str, Tensor]:
    """Forward+backward on each batch in training mode; returns the final state dict."""
    quantizer.train()
    for batch in batches:
        _loss(quantizer(batch.clone().requires_grad_(True))).backward()
    return _state(quantizer)


def train_steps_with_history(
    quantizer: nn.Module, batches: list[Tensor], communicator: Communicator = SINGLE_PROCESS
) -> dict[str, Tensor]:
    """As `train_steps`, but keeps the state after every step as `step<i>/<name>`."""
    quantizer.train()
    states: dict[str, Tensor] = {}
    for step, batch in enumerate(batches):
        _loss(quantizer(batch.clone().requires_grad_(True))).backward()
        states.update({f"step{step}/{k}": v for k, v in _state(quantizer).items()})
    return states


def train_with_sgd(
    quantizer: nn.Module, batches: list[Tensor], communicator: Communicator = SINGLE_PROCESS
) -> dict[str, Tensor]:
    """SGD steps on the quantizer's own parameters, gradients averaged over ranks as DDP does;
    returns the final state dict (parameters included)."""
    quantizer.train()
    optimizer = torch.optim.SGD(quantizer.parameters(), lr=0.5)
    for batch in batches:
        optimizer.zero_grad()
        _loss(quantizer(batch.clone())).backward()
        for param in quantizer.parameters():
            if param.grad is not None and communicator.world_size > 1:
                param.grad.copy_(communicator.all_reduce(param.grad, "mean"))
        optimizer.step()
    return _state(quantizer)


@dataclass(frozen=True)
class Case:
    """One quantizer, its global batches and how to train it."""

    build: BuildFn
    batch: BatchFn
    steps: int
    train: TrainFn = train_steps


def _worker(
    rank: int, init_method: str, cases: Mapping[str, Case], out: str, early: bool, sync: bool
) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    built: dict[str, nn.Module] = {}
    for name, case in cases.items() if early else ():  # built before the process group exists
        torch.manual_seed(0)
        built[name] = case.build()
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=WORLD_SIZE)
    try:
        communicator = TorchDistributedCommunicator()
        for name, case in cases.items():
            if name not in built:
                torch.manual_seed(0)
                built[name] = case.build()
            quantizer = built[name]
            if sync:
                quantizer.set_communicator(communicator)
            torch.manual_seed(1)  # same stream on every rank and in the single-process run
            shards = [case.batch(step).chunk(WORLD_SIZE)[rank] for step in range(case.steps)]
            result = case.train(quantizer, shards, communicator)
            torch.save(result, Path(out) / f"{name}.rank{rank}.pt")
        dist.barrier()  # neither rank tears the group down while the other still uses it
    finally:
        dist.destroy_process_group()
    exit_worker()


def exit_worker() -> NoReturn:
    """End a worker whose results are saved and whose group is destroyed, skipping the
    interpreter's teardown: now and then a gloo thread still joinable there aborts the rank
    (SIGABRT, "terminate called without an active exception") after its work is done."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_cases(
    cases: Mapping[str, Case],
    tmp_path: Path,
    build_before_group: bool = False,
    sync: bool = True,
) -> dict[str, list[dict[str, Tensor]]]:
    """For each case, what its train function returned on each of 2 gloo ranks.

    `sync=False` leaves the quantizers without a communicator: the control case that shows
    the comparison would catch ranks drifting apart.
    """
    mp.start_processes(
        _worker,
        args=(store_url(tmp_path), dict(cases), str(tmp_path), build_before_group, sync),
        nprocs=WORLD_SIZE,
        start_method="spawn",
    )
    return {
        name: [
            torch.load(tmp_path / f"{name}.rank{r}.pt", weights_only=True)
            for r in range(WORLD_SIZE)
        ]
        for name in cases
    }


def run_distributed(
    build: BuildFn,
    batch: BatchFn,
    steps: int,
    tmp_path: Path,
    build_before_group: bool = False,
    sync: bool = True,
) -> list[dict[str, Tensor]]:
    """State dicts of both ranks after `steps` steps on 2 gloo processes (one case)."""
    cases = {"case": Case(build, batch, steps)}
    return run_cases(cases, tmp_path, build_before_group, sync)["case"]


def run_single_case(case: Case) -> dict[str, Tensor]:
    """What the case's train function returns on one process that sees every global batch."""
    torch.manual_seed(0)
    quantizer = case.build()
    torch.manual_seed(1)
    return case.train(quantizer, [case.batch(step) for step in range(case.steps)], SINGLE_PROCESS)


def run_single(build: BuildFn, batch: BatchFn, steps: int) -> dict[str, Tensor]:
    """State dict after the same steps on one process that sees every global batch."""
    return run_single_case(Case(build, batch, steps))


def assert_ranks_agree_and_match(
    ranks: list[dict[str, Tensor]], single: dict[str, Tensor], tol: float = 1e-5
) -> None:
    """Bitwise equal on every rank, and equal to the single process to float tolerance.

    The absolute tolerance scales with the tensor's largest entry: EMA sums of hundreds of
    tokens, added in another order than on one process, round at that scale.
    """
    assert ranks[0].keys() == single.keys()
    for name, value in ranks[0].items():
        assert torch.equal(value, ranks[1][name]), f"{name} differs between ranks"
        expected = single[name]
        scale = expected.abs().max().item() if expected.is_floating_point() else 0.0
        atol = tol * max(1.0, scale)
        torch.testing.assert_close(value, expected, rtol=tol, atol=atol, msg=name)
