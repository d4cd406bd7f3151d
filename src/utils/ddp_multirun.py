"""Hydra multiruns under Lightning's subprocess DDP: each job starts its own ranks, in its own
directory, and leaves no process group behind.

Lightning starts ranks 1.. of a DDP run by running the command line again (`sys.argv`) with
the run directory appended (`hydra.run.dir=<HydraConfig run.dir>`). In a multirun that command
line is the whole sweep, so every child would start a sweep of its own: it would write a
second sweep directory (another timestamp), and its later jobs would meet the parent's only by
luck. `ddp_job_scope` makes the command line, while a job runs, that of this job alone (run
mode, this job's overrides, this job's directory), and afterwards ends the process group and
removes the launch variables Lightning set, so the next job starts its ranks afresh.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, read_write

# what Lightning's subprocess launcher sets in the launching process's environment
LAUNCH_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


def job_command(hydra_cfg: DictConfig) -> list[str]:
    """Overrides that rerun this multirun job alone, in run mode."""
    hydra_overrides = [o for o in hydra_cfg.overrides.hydra if not o.startswith("hydra.mode=")]
    return [*hydra_overrides, *hydra_cfg.overrides.task]


@contextmanager
def ddp_job_scope() -> Iterator[None]:
    """Run one Hydra job (wrap the training call in `main`) so DDP ranks started for it run
    only it, and end its process group when it is done.

    In a multirun job of the launching process (no `LOCAL_RANK` yet: not a DDP child, not
    torchrun or SLURM) the command line and Hydra's run directory point at this job while it
    runs. In every process a finished job ends with a barrier (all ranks done) and the
    process group is destroyed, so the next job of a sweep initialises its own.
    """
    launcher = HydraConfig.initialized() and "LOCAL_RANK" not in os.environ
    hydra_cfg = HydraConfig.get() if launcher else None
    retarget = hydra_cfg is not None and hydra_cfg.mode == RunMode.MULTIRUN
    absent = [name for name in LAUNCH_VARIABLES if name not in os.environ] if launcher else []
    argv, run_dir = sys.argv, None
    if retarget:
        run_dir = OmegaConf.to_container(hydra_cfg.run, resolve=False)["dir"]
        sys.argv = [argv[0], *job_command(hydra_cfg)]
        with read_write(hydra_cfg.run):
            hydra_cfg.run.dir = hydra_cfg.runtime.output_dir
    finished = False
    try:
        yield
        finished = True
    finally:
        if retarget:
            sys.argv = argv
            with read_write(hydra_cfg.run):
                hydra_cfg.run.dir = run_dir
        if dist.is_available() and dist.is_initialized():
            if finished:
                dist.barrier()
            dist.destroy_process_group()
        for name in absent:
            os.environ.pop(name, None)
