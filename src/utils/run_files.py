"""Where a finished run left its checkpoints, metrics and images."""

from __future__ import annotations

from pathlib import Path

from lightning import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger


def run_files(trainer: Trainer) -> dict[str, Path | None]:
    """Best and last checkpoint, metrics CSV and the newest file of each media callback that
    names one (`media_name`: reconstruction grids, WAVs, a prior's samples); None if absent."""
    files: dict[str, Path | None] = {}
    checkpoint = trainer.checkpoint_callback
    if isinstance(checkpoint, ModelCheckpoint):
        files["best checkpoint"] = (
            Path(checkpoint.best_model_path) if checkpoint.best_model_path else None
        )
        # written by the periodic checkpoints and at the end of training (src/utils/run_controller)
        last = Path(checkpoint.dirpath or "") / "last.ckpt"
        files["last checkpoint"] = last if checkpoint.dirpath and last.is_file() else None
    for logger in trainer.loggers:
        if isinstance(logger, CSVLogger):
            files["metrics csv"] = Path(logger.log_dir) / "metrics.csv"
    for callback in trainer.callbacks:  # media callbacks name what they write (`media_name`)
        name = getattr(callback, "media_name", None)
        if name and getattr(callback, "last_path", None) is not None:
            files[name] = Path(callback.last_path)
    return files


def final_metrics(
    trainer: Trainer, prefixes: tuple[str, ...] = ("val/", "test/", "sample/")
) -> dict[str, float]:
    """Epoch-level validation, test (and sampling: a prior's `sample/...`) metrics the trainer
    holds at the end of the run."""
    return {
        name: float(value)
        for name, value in trainer.callback_metrics.items()
        if name.startswith(prefixes) and value.numel() == 1
    }
