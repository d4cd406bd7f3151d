"""Stable run names: `run_name=foo` puts a run in logs/<task>/runs/foo/ so re-running resumes it.

Registers the OmegaConf resolvers used by configs/hydra/default.yaml and configs/train.yaml:
`${run_dir_name:<run_name>,<timestamp>}` (the run directory's last part),
`${run_id:<run_name>}` (the id loggers such as W&B resume by; null without a run_name), and
`${attempt_subdir:<output_dir>,<timestamp>}`, where Hydra writes its config files: `.hydra`, or
`.hydra/attempt_<timestamp>` when the directory already holds a run's, so re-running a named
run (to resume it, or with a config that turns out not to match) keeps the first record; on
ranks other than 0 of a torchrun / SLURM launch (each runs Hydra itself) it is null, so they
write no record. `${rank_zero_log_file:<path>}` names the job log (os.devnull on those ranks).
"""

from __future__ import annotations

import re
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf

from src.utils.launch_rank import is_launch_rank_zero, rank_zero_log_file
from src.utils.monitor import optuna_direction

_ALLOWED = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class BadRunNameError(ValueError):
    """A run_name that cannot name one directory."""


def check_run_name(name: object) -> str:
    """Return ``name`` if it can name a single run directory, else raise BadRunNameError."""
    text = str(name)
    if _ALLOWED.fullmatch(text) is None:
        problem = (
            "contains a path separator"
            if "/" in text or "\\" in text
            else "must start with a letter or digit and use only letters, digits, '.', '_', '-'"
            " (at most 128 characters)"
        )
        raise BadRunNameError(
            f"run_name={text!r} {problem}: it names one directory under logs/<task>/runs/. "
            "Pick e.g. run_name=fsq_8x6x5 (use hydra.run.dir=<path> for a directory elsewhere)"
        )
    return text


def run_dir_name(run_name: object, timestamp: str) -> str:
    """The run directory's name: the checked run_name, or the timestamp when there is none."""
    return timestamp if run_name is None else check_run_name(run_name)


def run_id(run_name: object) -> str | None:
    """Logger run id (W&B `id`): the run_name (`<run_name>-<job>` in a multirun), else None."""
    if run_name is None:
        return None
    name = check_run_name(run_name)
    job_num = _multirun_job_num()
    return name if job_num is None else f"{name}-{job_num}"


def _multirun_job_num() -> int | None:
    """This job's number when Hydra runs a sweep, else None."""
    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    return int(hydra_cfg.job.num)


def attempt_subdir(output_dir: object, timestamp: str) -> str | None:
    """Hydra's output_subdir: `.hydra`, or `.hydra/attempt_<timestamp>` if that is taken;
    None (no record) on a rank other than 0, which shares rank 0's run directory."""
    if not is_launch_rank_zero():
        return None
    if (Path(str(output_dir)) / ".hydra" / "config.yaml").exists():
        return f".hydra/attempt_{timestamp}"
    return ".hydra"


def register_resolvers() -> None:
    """Register the resolvers once (idempotent)."""
    resolvers = {
        "run_dir_name": run_dir_name,
        "run_id": run_id,
        "attempt_subdir": attempt_subdir,
        "rank_zero_log_file": rank_zero_log_file,
        "optuna_direction": optuna_direction,  # hparams_search: direction from monitor.mode
    }
    for name, resolver in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)


register_resolvers()
