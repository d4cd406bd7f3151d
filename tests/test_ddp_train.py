"""train.py under DDP on 2 CPU processes (trainer=ddp_sim): one run directory per run or per
multirun job, the same metrics as a single-process run."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import pytest
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf, read_write

from src.utils.ddp_multirun import LAUNCH_VARIABLES, ddp_job_scope
from tests.conftest import compose_config
from tests.helpers import QUICK, last_logged, read_metrics_csv, run_script
from train import train

TINY = [*QUICK, "+trainer.limit_val_batches=1", "+trainer.limit_test_batches=1"]
HYDRA_RECORD = ["config.yaml", "hydra.yaml", "overrides.yaml"]
INSTANTIATED_CSV = "instantiating logger csv"  # a line every rank logs once


def _csv_columns(run_dir: Path) -> set[str]:
    return set(read_metrics_csv(run_dir)[0])


def test_ddp_sim_run_writes_one_run_dir_with_the_single_process_metrics(tmp_path: Path) -> None:
    run_dir, log_dir = tmp_path / "run", tmp_path / "logs"
    result = run_script(
        "train.py", "trainer=ddp_sim", *TINY, f"hydra.run.dir={run_dir}", f"paths.log_dir={log_dir}"
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in output, "the second rank never started"
    # rank 1 wrote into the same directory: nothing under the default log dir, one .hydra
    # record without attempts, one log, one metrics file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert list(run_dir.rglob(".hydra")) == [run_dir / ".hydra"]
    assert sorted(p.name for p in (run_dir / ".hydra").iterdir()) == HYDRA_RECORD
    assert not list(run_dir.rglob("attempt_*"))
    assert list(run_dir.rglob("*.log")) == [run_dir / "train.log"]
    assert [p.name for p in (run_dir / "csv").iterdir()] == ["version_0"]
    assert list(run_dir.rglob("metrics.csv")) == [run_dir / "csv" / "version_0" / "metrics.csv"]
    # both ranks logged to their consoles, only rank 0 into train.log
    assert output.count(INSTANTIATED_CSV) == 2
    assert (run_dir / "train.log").read_text().count(INSTANTIATED_CSV) == 1
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    rows = read_metrics_csv(run_dir)
    for name in ["val/psnr", "val/codebook/utilization", "test/psnr", "test/loss"]:
        assert math.isfinite(last_logged(rows, name))

    single = compose_config("train", TINY, output_dir=tmp_path / "single")
    train(single)
    assert _csv_columns(run_dir) == _csv_columns(tmp_path / "single")


@pytest.mark.slow  # two DDP jobs, each starting a second Python process: ~35 s on 2 idle cores
def test_ddp_sim_multirun_gives_one_directory_per_job(tmp_path: Path) -> None:
    log_dir = tmp_path / "logs"
    result = run_script(
        "train.py", "-m", "trainer=ddp_sim", "quantizer=fsq,vq", *TINY, f"paths.log_dir={log_dir}"
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    # the child ranks ran single jobs, not sweeps of their own (with a sweep directory each)
    assert output.count("Launching 2 jobs") == 1
    (sweep_dir,) = (log_dir / "train" / "multiruns").iterdir()
    jobs = sorted(p for p in sweep_dir.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1"]
    for job, quantizer in zip(jobs, ["fsq", "vq"], strict=True):
        assert f"quantizer={quantizer}" in (job / ".hydra" / "overrides.yaml").read_text()
        assert list(job.rglob(".hydra")) == [job / ".hydra"]
        assert sorted(p.name for p in (job / ".hydra").iterdir()) == HYDRA_RECORD
        assert list(job.rglob("*.log")) == [job / "train.log"]
        assert (job / "train.log").read_text().count(INSTANTIATED_CSV) == 1
        assert len(list(job.glob("csv/version_*"))) == 1
        assert math.isfinite(last_logged(read_metrics_csv(job), "test/psnr"))


def test_job_scope_points_the_command_line_at_one_multirun_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What Lightning re-runs for the other ranks: this job's overrides in run mode, in this
    job's directory; afterwards the sweep's command line and Lightning's variables are gone."""
    for name in LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    cfg = compose_config("train", ["quantizer=vq", "trainer=ddp_sim"], output_dir=tmp_path / "3")
    with read_write(cfg.hydra):
        cfg.hydra.mode = RunMode.MULTIRUN
        cfg.hydra.overrides.hydra = ["hydra.sweep.dir=/sweep", "hydra.mode=MULTIRUN"]
    HydraConfig().set_config(cfg)
    run_dir_setting = OmegaConf.to_container(HydraConfig.get().run, resolve=False)["dir"]
    sweep_argv = ["train.py", "-m", "quantizer=vq,fsq", "trainer=ddp_sim"]
    monkeypatch.setattr(sys, "argv", sweep_argv)
    with ddp_job_scope():
        assert sys.argv == ["train.py", "hydra.sweep.dir=/sweep", "quantizer=vq", "trainer=ddp_sim"]
        assert HydraConfig.get().run.dir == str(tmp_path / "3")
        os.environ["LOCAL_RANK"] = "0"  # as Lightning's launcher leaves it
    assert sys.argv == sweep_argv
    assert "LOCAL_RANK" not in os.environ
    assert OmegaConf.to_container(HydraConfig.get().run, resolve=False)["dir"] == run_dir_setting
