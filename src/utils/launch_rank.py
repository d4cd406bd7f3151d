"""Whether this process is rank 0 of its launch, read from the launcher's environment.

Under torchrun (RANK, LOCAL_RANK), SLURM (SLURM_PROCID) and Lightning's own DDP launcher (ranks
1.. get LOCAL_RANK, other nodes NODE_RANK) every rank runs Hydra itself, before any process
group exists. Only rank 0 writes the run's records: the resolvers here turn Hydra's
`.hydra` record and `train.log` off on the other ranks (configs/hydra/default.yaml).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

# Global ranks, in Lightning's order (lightning.fabric.utilities.rank_zero._get_rank):
# SLURM_PROCID may be set where SLURM does not start the processes, so LOCAL_RANK comes first.
GLOBAL_RANK_VARIABLES = ("RANK",)
LOCAL_RANK_VARIABLE = "LOCAL_RANK"
NODE_RANK_VARIABLES = ("NODE_RANK", "GROUP_RANK")
SCHEDULER_RANK_VARIABLES = ("SLURM_PROCID", "JSM_NAMESPACE_RANK")


def _read(environ: Mapping[str, str], name: str) -> int | None:
    value = environ.get(name, "").strip()
    return int(value) if value else None


def _node_rank(environ: Mapping[str, str]) -> int:
    for name in NODE_RANK_VARIABLES:
        value = _read(environ, name)
        if value is not None:
            return value
    return 0


def is_launch_rank_zero(environ: Mapping[str, str] | None = None) -> bool:
    """True unless the environment names this process a rank other than global rank 0."""
    env = os.environ if environ is None else environ
    for name in GLOBAL_RANK_VARIABLES:
        rank = _read(env, name)
        if rank is not None:
            return rank == 0
    local = _read(env, LOCAL_RANK_VARIABLE)
    if local is not None:  # global rank = node rank x devices + local rank
        return local == 0 and _node_rank(env) == 0
    for name in SCHEDULER_RANK_VARIABLES:
        rank = _read(env, name)
        if rank is not None:
            return rank == 0
    return _node_rank(env) == 0


def rank_zero_log_file(path: object) -> str:
    """The job log's path on rank 0; os.devnull on the other ranks (their console stays)."""
    return str(path) if is_launch_rank_zero() else os.devnull
