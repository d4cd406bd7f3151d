"""The pieces train.py adds around `Trainer.fit` for long runs: a stop on divergence, resume
state, preemption, throughput, atomic checkpoint writes, logger roll-back, and the
final-checkpoint marker that `eval.py watch=<dir>` stops at."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from lightning import Callback, Trainer
from lightning.pytorch.loggers import Logger
from lightning.pytorch.plugins.environments import SLURMEnvironment
from omegaconf import DictConfig, open_dict

from src.callbacks.divergence import DivergenceStop
from src.callbacks.preemption import Preemption
from src.callbacks.resume_state import ResumeState
from src.callbacks.throughput import TrainingThroughput
from src.loggers.resumable_csv import ROLLED_BACK_FILE
from src.utils.checkpoint_io import AtomicCheckpointIO
from src.utils.resume import ResumePoint, read_checkpoint

log = logging.getLogger(__name__)

# written by train.py into the checkpoint directory when training reached its budget
FINAL_MARKER = "final.json"


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def controller_callbacks(cfg: DictConfig, run_dir: Path) -> list[Callback]:
    """A stop on divergence (first: it acts before anything saves the step), RNG/data-order
    state in checkpoints, preemption on signals, throughput metrics."""
    preemption = cfg.get("preemption") or {}
    throughput = cfg.get("throughput") or {}
    divergence = cfg.get("divergence") or {}
    return [
        DivergenceStop(patience=int(divergence.get("patience", 1))),
        ResumeState(),
        TrainingThroughput(window_size=int(throughput.get("window_size", 20))),
        Preemption(
            checkpoint_dir(run_dir),
            signals=list(preemption.get("signals", ["SIGTERM", "SIGUSR1"])),
            exit_code=int(preemption.get("exit_code", 75)),
        ),
    ]


def trainer_plugins(cfg: DictConfig) -> dict[str, Any]:
    """Atomic checkpoint writes, unless the trainer config brings its own plugins; under SLURM
    with our preemption handler on, Lightning's SLURM environment without its auto-requeue."""
    if cfg.trainer.get("plugins"):
        return {}
    plugins: list[Any] = [AtomicCheckpointIO()]
    signals = (cfg.get("preemption") or {}).get("signals", ["SIGTERM", "SIGUSR1"])
    if signals and SLURMEnvironment.detect():
        # Lightning would otherwise requeue the job itself on SIGUSR1 while our handler saves
        # last.ckpt and exits 75 for the job script to requeue it: a job requeued twice
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return {"plugins": plugins}


def restart_step(cfg: DictConfig, resume: ResumePoint | None) -> int | None:
    """The global step training continues from: the resumed checkpoint's, 0 for a named run
    that starts again without one, None for a fresh (timestamped) run."""
    if resume is not None:
        return resume.global_step
    return 0 if cfg.get("run_name") and cfg.get("train") else None


def logger_configs(config: DictConfig | None, step: int | None) -> DictConfig | None:
    """The logger group with Lightning's TensorBoardLogger told to purge from `step`
    (`purge_step`, passed on to TensorBoard's SummaryWriter): events a stopped attempt logged
    at or after the resumed step are hidden, so one TensorBoard run reads like the CSV."""
    if config is None or step is None:
        return config
    config = config.copy()
    for entry in config.values():
        if isinstance(entry, DictConfig) and str(entry.get("_target_", "")).endswith(
            "TensorBoardLogger"
        ):
            with open_dict(entry):
                entry.purge_step = int(step)
    return config


def roll_back_loggers(loggers: list[Logger], step: int) -> None:
    """Loggers that can set aside what was logged at or after the step training continues
    from: the CSV logger moves those rows to metrics.rolled_back.csv (TensorBoard purges them
    through `logger_configs`).
    Step 0 is a named run starting again without a checkpoint (deleted, or never written):
    everything an earlier attempt logged is set aside, so two trainings never mix in one log."""
    for logger in loggers:
        roll_back = getattr(logger, "roll_back", None)
        if not callable(roll_back):
            continue
        moved = roll_back(step)
        if moved and step == 0:
            log.warning(
                "%s: the run directory has no checkpoint but holds %d rows of an earlier "
                "training; this run starts again at step 0 and those rows moved to %s",
                logger.name,
                moved,
                ROLLED_BACK_FILE,
            )
        elif moved:
            log.info("%s: moved %d rows logged after step %d aside", logger.name, moved, step)


def finish_training(trainer: Trainer, callbacks: list[Callback], run_dir: Path) -> dict[str, float]:
    """After a completed fit: make sure last.ckpt holds the final step, mark it final, and
    return the run's throughput summary."""
    ckpt_dir = checkpoint_dir(run_dir)
    last = ckpt_dir / "last.ckpt"
    if (
        trainer.checkpoint_callback is not None
        and trainer.global_step > 0
        and not trainer.fast_dev_run
    ):
        stale = (
            not last.is_file() or int(read_checkpoint(last)["global_step"]) != trainer.global_step
        )
        # rank 0 decides: every rank must take part in a save (or none), whatever its disk shows
        if trainer.strategy.broadcast(stale, src=0):
            trainer.save_checkpoint(last)
        if trainer.is_global_zero:
            write_final_marker(ckpt_dir, trainer.global_step, last)
    summary: dict[str, float] = {}
    for callback in callbacks:
        if isinstance(callback, TrainingThroughput):
            summary.update(callback.summary(trainer))
    return summary


def write_final_marker(ckpt_dir: Path, global_step: int, checkpoint: Path) -> None:
    """`final.json`: the step at which training ended and the checkpoint that holds it."""
    marker = {"global_step": int(global_step), "checkpoint": checkpoint.name}
    partial = ckpt_dir / f".{FINAL_MARKER}.partial"
    partial.write_text(json.dumps(marker) + "\n")
    partial.replace(ckpt_dir / FINAL_MARKER)


def clear_final_marker(run_dir: Path) -> None:
    """A run that trains again is no longer final."""
    (checkpoint_dir(run_dir) / FINAL_MARKER).unlink(missing_ok=True)
