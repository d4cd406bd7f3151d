"""The private Lightning internals our code relies on, checked one by one: when a Lightning
upgrade renames or changes one, the failing case names the file of ours that needs a look,
instead of that file silently falling back to something else."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path

import lightning
import lightning as L
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop

from src.loggers.resumable_csv import AppendingExperimentWriter


def _calls(cls: type, method: str, name: str) -> bool:
    """Whether `cls.<method>` or a base's (reached through super()) mentions `name`."""
    return any(
        name in inspect.getsource(vars(klass)[method])
        for klass in cls.__mro__
        if method in vars(klass) and klass is not object
    )


def _trainer() -> L.Trainer:
    return L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)


def _step_checkpoint_loop_rule() -> None:
    params = list(inspect.signature(_TrainingEpochLoop._should_check_val_fx).parameters)
    assert params == ["self", "data_fetcher"], params
    assert hasattr(_trainer().fit_loop, "_data_fetcher")


def _step_checkpoint_model_checkpoint() -> None:
    callback = ModelCheckpoint(every_n_train_steps=3)
    assert callback._every_n_train_steps == 3
    assert callback._defer_save_until_validation is False
    params = list(inspect.signature(callback._should_skip_saving_checkpoint).parameters)
    assert params == ["trainer"], params
    assert "_defer_save_until_validation" in inspect.getsource(ModelCheckpoint.on_validation_end)


def _csv_writer_hook(tmp_path: Path) -> None:
    assert _calls(ExperimentWriter, "__init__", "_check_log_dir_exists")
    assert ExperimentWriter.NAME_METRICS_FILE == "metrics.csv"
    existing = tmp_path / "metrics.csv"
    existing.write_text("a,step\n1,0\n")
    writer = AppendingExperimentWriter(log_dir=str(tmp_path))
    assert writer.metrics_file_path == str(existing) and existing.read_text() == "a,step\n1,0\n"
    assert sorted(writer.metrics_keys) == ["a", "step"]


def _csv_logger_experiment() -> None:
    assert "_experiment" in vars(CSVLogger(save_dir="unused"))


def _wandb_logger_attributes() -> None:
    logger = WandbLogger(save_dir="unused", offline=True)
    assert isinstance(logger._wandb_init, dict) and logger._experiment is None


CASES: dict[str, tuple[str, Callable[..., None]]] = {
    "fit loop's validation rule": ("src/callbacks/step_checkpoint.py", _step_checkpoint_loop_rule),
    "ModelCheckpoint's deferral": (
        "src/callbacks/step_checkpoint.py",
        _step_checkpoint_model_checkpoint,
    ),
    "CSV writer's log-dir hook": ("src/loggers/resumable_csv.py", _csv_writer_hook),
    "CSVLogger._experiment": ("src/loggers/resumable_csv.py", _csv_logger_experiment),
    "WandbLogger._wandb_init/_experiment": ("src/loggers/wandb_run.py", _wandb_logger_attributes),
}


@pytest.mark.parametrize("case", list(CASES))
def test_private_lightning_internal_still_there(case: str, tmp_path: Path) -> None:
    our_file, check = CASES[case]
    try:
        check(tmp_path) if "tmp_path" in inspect.signature(check).parameters else check()
    except (AttributeError, AssertionError, TypeError, ValueError) as error:
        pytest.fail(
            f"Lightning {lightning.__version__} changed a private internal ({case}) that "
            f"{our_file} relies on: {type(error).__name__}: {error}. Update {our_file} to the "
            "new Lightning code (and this check) before relying on it."
        )
