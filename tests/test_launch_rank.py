"""One run directory per run when every rank runs Hydra itself (torchrun, SLURM): only rank 0
writes Hydra's `.hydra` record and the run's train.log."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from src.utils.launch_rank import (
    GLOBAL_RANK_VARIABLES,
    LOCAL_RANK_VARIABLE,
    NODE_RANK_VARIABLES,
    SCHEDULER_RANK_VARIABLES,
    is_launch_rank_zero,
    rank_zero_log_file,
)
from tests.helpers import ROOT

ALL_VARIABLES = (
    *GLOBAL_RANK_VARIABLES,
    LOCAL_RANK_VARIABLE,
    *NODE_RANK_VARIABLES,
    *SCHEDULER_RANK_VARIABLES,
)


@pytest.mark.parametrize(
    ("environ", "zero"),
    [
        ({}, True),  # a plain `python train.py`
        ({"RANK": "0", "LOCAL_RANK": "0", "GROUP_RANK": "0"}, True),  # torchrun, rank 0
        ({"RANK": "1", "LOCAL_RANK": "1", "GROUP_RANK": "0"}, False),  # torchrun, rank 1
        ({"RANK": "4", "LOCAL_RANK": "0", "GROUP_RANK": "1"}, False),  # torchrun, 2nd node
        ({"SLURM_PROCID": "0"}, True),  # srun, task 0
        ({"SLURM_PROCID": "3"}, False),  # srun, task 3
        ({"LOCAL_RANK": "1", "NODE_RANK": "0"}, False),  # Lightning's launcher, rank 1
        ({"LOCAL_RANK": "0", "NODE_RANK": "1"}, False),  # Lightning's launcher, 2nd node
        ({"NODE_RANK": "1"}, False),  # 2nd node's first process, before Lightning launches
        # Lightning starting its ranks inside one SLURM task: LOCAL_RANK decides, as in Lightning
        ({"SLURM_PROCID": "0", "LOCAL_RANK": "1"}, False),
        ({"SLURM_PROCID": "2", "LOCAL_RANK": "0"}, True),
        ({"RANK": ""}, True),  # set but empty: unset
    ],
)
def test_rank_zero_is_read_from_the_launchers_variables(environ: dict, zero: bool) -> None:
    assert is_launch_rank_zero(environ) is zero


def test_the_log_file_is_devnull_on_other_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ALL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert rank_zero_log_file("/run/train.log") == "/run/train.log"
    monkeypatch.setenv("SLURM_PROCID", "1")
    assert rank_zero_log_file("/run/train.log") == os.devnull


def _probe(run_dir: Path, **launch: str) -> str:
    """Run the Hydra probe app as one rank of a launch; returns its console output."""
    env = {k: v for k, v in os.environ.items() if k not in ALL_VARIABLES}
    env.update(launch)
    command = [
        sys.executable,
        str(ROOT / "tests" / "hydra_rank_probe.py"),
        f"hydra.run.dir={run_dir}",
        "~hydra.callbacks.finish_wandb",  # keeps W&B (and Lightning) out of the probe
    ]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_only_rank_zero_writes_the_hydra_record_and_the_log(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    _probe(run_dir, RANK="0", LOCAL_RANK="0")  # torchrun's rank 0 first
    others = [
        {"RANK": "1", "LOCAL_RANK": "1"},  # torchrun
        {"SLURM_PROCID": "1"},  # srun
    ]
    for launch in others:
        output = _probe(run_dir, **launch)
        assert "probe ran with" in output, "a rank > 0 still logs to its console"
    assert sorted(p.name for p in run_dir.iterdir()) == [".hydra", "train.log"]
    assert sorted(p.name for p in (run_dir / ".hydra").iterdir()) == [
        "config.yaml",
        "hydra.yaml",
        "overrides.yaml",
    ]
    lines = (run_dir / "train.log").read_text().splitlines()
    assert len(lines) == 1 and "'RANK': '0'" in lines[0], lines
    # the control: rank 0 re-running the same directory does keep an attempt record
    _probe(run_dir)
    (attempt,) = (run_dir / ".hydra").glob("attempt_*")
    assert (attempt / "config.yaml").is_file()
    assert len((run_dir / "train.log").read_text().splitlines()) == 2
