"""src/loggers/wandb_run.py: offline by default, resumes the run of its directory, one W&B run
per job; all checked offline, on the files W&B writes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import wandb
from hydra.utils import instantiate
from lightning.pytorch.utilities.exceptions import SIGTERMException

from src.loggers import WandbRunLogger
from src.loggers.wandb_run import normalize_mode, previous_run_id
from tests.conftest import compose_config
from tests.wandb_offline import finished_records, offline_runs, summarize


@pytest.fixture(autouse=True)
def no_run_left_over() -> Iterator[None]:
    yield
    wandb.finish()


@pytest.mark.parametrize(
    ("given", "mode"),
    [(None, "offline"), ("dryrun", "offline"), ("ONLINE", "online"), ("disabled", "disabled")],
)
def test_modes(given: str | None, mode: str) -> None:
    assert normalize_mode(given) == mode


def test_unknown_mode_names_the_choices() -> None:
    with pytest.raises(ValueError, match="use offline, online or disabled"):
        normalize_mode("sometimes")


def test_config_is_offline_unless_wandb_mode_says_otherwise(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = compose_config("train", ["logger=wandb"], output_dir=tmp_path)
    assert cfg.logger.wandb.mode == "offline"
    monkeypatch.setenv("WANDB_MODE", "online")
    cfg = compose_config("train", ["logger=wandb"], output_dir=tmp_path)
    assert cfg.logger.wandb.mode == "online"
    disabled = ["logger=wandb", "logger.wandb.mode=disabled"]
    cfg = compose_config("train", disabled, output_dir=tmp_path)
    assert cfg.logger.wandb.mode == "disabled"


def test_uploading_checkpoints_offline_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"log_model=false or logger\.wandb\.mode=online"):
        WandbRunLogger(save_dir=str(tmp_path), mode="offline", log_model=True)


def test_config_builds_an_offline_logger_with_its_fields(tmp_path: Path) -> None:
    overrides = ["logger=wandb", "logger.wandb.group=g1", "tags=[a,b]", "logger.wandb.name=n1"]
    cfg = compose_config("train", overrides, output_dir=tmp_path)
    logger = instantiate(cfg.logger.wandb)
    assert isinstance(logger, WandbRunLogger)
    logger.log_metrics({"val/codebook/utilization": 0.25}, step=4)
    wandb.finish()
    (folder,) = offline_runs(tmp_path)
    run = summarize(folder)
    assert (
        cfg.logger.wandb.project == "vqzoo"
    )  # configs/logger/wandb.yaml; W&B's own: uncategorized
    assert (run["project"], run["group"], run["name"]) == ("vqzoo", "g1", "n1")
    assert run["tags"] == ["a", "b"]
    assert {"val/codebook/utilization": 0.25, "trainer/global_step": 4}.items() <= (
        run["history"][0].items()
    )


def test_rerun_in_the_same_directory_continues_the_same_wandb_run(tmp_path: Path) -> None:
    assert previous_run_id(tmp_path) is None
    first = WandbRunLogger(save_dir=str(tmp_path))
    first.log_metrics({"train/loss": 1.0}, step=1)
    run_id = first.experiment.id
    wandb.finish()
    assert previous_run_id(tmp_path) == run_id

    second = WandbRunLogger(save_dir=str(tmp_path))  # e.g. the run resumed after preemption
    second.log_metrics({"train/loss": 0.5}, step=2)
    assert second.experiment.id == run_id
    wandb.finish()
    folders = offline_runs(tmp_path)
    assert len(folders) == 2  # offline, each attempt has its folder; `wandb sync` joins them
    assert [summarize(f)["id"] for f in folders] == [run_id, run_id]


@pytest.mark.parametrize(
    ("error", "kinds"),
    [(RuntimeError("boom"), ["exit"]), (SIGTERMException(), ["preempting", "exit"])],
    ids=["failed", "preempted"],
)
def test_a_failed_or_preempted_fit_finishes_its_run(
    tmp_path: Path, error: BaseException, kinds: list[str]
) -> None:
    """Lightning calls finalize("failed") while the fit's exception propagates."""
    logger = WandbRunLogger(save_dir=str(tmp_path), id="stopped")
    logger.log_metrics({"train/loss": 1.0}, step=1)
    try:
        raise error
    except BaseException:
        logger.finalize("failed")
    assert wandb.run is None  # finished here, not left to the process's exit
    (folder,) = offline_runs(tmp_path)
    run = summarize(folder)
    assert [k for k in run["kinds"] if k in ("preempting", "exit")] == kinds
    exit_record = next(r for r in finished_records(folder) if r.WhichOneof("record_type") == "exit")
    assert exit_record.exit.exit_code == 1


def test_an_explicit_id_wins(tmp_path: Path) -> None:
    WandbRunLogger(save_dir=str(tmp_path)).log_metrics({"x": 1.0})
    wandb.finish()
    logger = WandbRunLogger(save_dir=str(tmp_path), id="my-run-7")
    assert logger.experiment.id == "my-run-7"


def test_a_later_job_gets_its_own_run_and_finishes_the_earlier_one(tmp_path: Path) -> None:
    """A multirun's jobs share one process: each must get a run of its own."""
    first = WandbRunLogger(save_dir=str(tmp_path / "0"))
    first.log_metrics({"val/psnr": 20.0}, step=1)
    second = WandbRunLogger(save_dir=str(tmp_path / "1"))
    second.log_metrics({"val/psnr": 21.0}, step=1)
    assert second.experiment.id != first.experiment.id
    assert wandb.run is second.experiment
    wandb.finish()
    for job, psnr in (("0", 20.0), ("1", 21.0)):
        (folder,) = offline_runs(tmp_path / job)
        run = summarize(folder)  # waits for the exit record: the first run was finished
        assert [row["val/psnr"] for row in run["history"]] == [psnr]


def test_transaction_log_reader_crosses_blocks(tmp_path: Path) -> None:
    """The reader of tests/wandb_offline.py sees every row of a log spanning 32 KiB blocks."""
    logger = WandbRunLogger(save_dir=str(tmp_path))
    for step in range(600):
        logger.log_metrics({f"val/codebook/{i}/utilization": step / 600 for i in range(8)}, step)
    wandb.finish()
    (folder,) = offline_runs(tmp_path)
    assert next(folder.glob("run-*.wandb")).stat().st_size > 3 * 32 * 1024
    history = summarize(folder)["history"]
    assert [row["trainer/global_step"] for row in history] == list(range(600))
    for row in history:
        assert row["val/codebook/7/utilization"] == row["trainer/global_step"] / 600


def test_a_named_run_uses_its_run_id_as_the_wandb_id(tmp_path: Path) -> None:
    cfg = compose_config("train", ["logger=wandb", "run_name=my_run"], output_dir=tmp_path)
    assert cfg.logger.wandb.id == cfg.run_id == "my_run"
    assert compose_config("train", ["logger=wandb"], output_dir=tmp_path).logger.wandb.id is None
