"""Starting a named run again without its checkpoints, or from another run's checkpoint
(issue 16 faults 3 and 6): the old rows are kept apart and the stored config is compared first."""

from __future__ import annotations

import csv
import logging
import shutil
from pathlib import Path

import pytest

from src.utils.resume import ResumeError
from tests.conftest import compose_config
from tests.helpers import read_metrics_csv
from train import train

RUN = [
    "extras.print_config=false",
    "callbacks.model_summary=null",
    "callbacks.reconstruction_grid=null",
    "callbacks.code_frequencies=null",
    "trainer.max_steps=2",
    "+trainer.limit_train_batches=2",
    "+trainer.limit_val_batches=1",
    "+trainer.limit_test_batches=1",
    "trainer.log_every_n_steps=1",
    "test=false",
]


def _steps(rows: list[dict[str, str]]) -> list[int]:
    return [int(r["step"]) for r in rows if r.get("train/loss_step")]


def test_named_run_without_checkpoints_restarts_with_old_rows_kept_apart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run_dir = tmp_path / "run"
    train(compose_config("train", [*RUN, "run_name=again"], output_dir=run_dir))
    first = read_metrics_csv(run_dir)
    assert _steps(first) == [0, 1]
    shutil.rmtree(run_dir / "checkpoints")  # e.g. deleted to free disk space

    with caplog.at_level(logging.WARNING):
        train(compose_config("train", [*RUN, "run_name=again"], output_dir=run_dir))
    assert any(
        "no checkpoint" in r.getMessage() and "metrics.rolled_back.csv" in r.getMessage()
        for r in caplog.records
    ), [r.getMessage() for r in caplog.records]
    # metrics.csv reads like one training; the first one's rows moved aside, none lost
    assert _steps(read_metrics_csv(run_dir)) == [0, 1]
    (side,) = run_dir.glob("csv/version_0/metrics.rolled_back.csv")
    with side.open(newline="") as file:
        assert list(csv.DictReader(file)) == first


def test_checkpoint_of_another_quantizer_lists_the_differences(tmp_path: Path) -> None:
    fsq_dir = tmp_path / "fsq"
    train(compose_config("train", [*RUN, "quantizer=fsq"], output_dir=fsq_dir))
    ckpt = fsq_dir / "checkpoints" / "last.ckpt"
    vq_dir = tmp_path / "vq"
    cfg = compose_config("train", [*RUN, "quantizer=vq", f"ckpt_path={ckpt}"], output_dir=vq_dir)
    with pytest.raises(ResumeError) as info:
        train(cfg)
    message = str(info.value)
    assert f"cannot train from ckpt_path={ckpt}" in message
    assert "model.quantizer.name: 'fsq' -> 'vq'" in message
    assert "model.quantizer.levels" in message and "model.quantizer.codebook_size" in message
    assert "resume.must_match" in message  # how to allow it on purpose
    assert not (vq_dir / "checkpoints").exists()


def test_missing_ckpt_path_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.ckpt"
    cfg = compose_config("train", [*RUN, f"ckpt_path={missing}"], output_dir=tmp_path / "run")
    with pytest.raises(ResumeError, match=f"ckpt_path={missing} does not load"):
        train(cfg)
