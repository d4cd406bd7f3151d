"""Preemption: on SIGTERM or SIGUSR1, finish the current training step, save `last.ckpt`, and
exit with a documented code, so that re-running the same command resumes from there.

Lightning's own SIGTERM handling stops mid-validation too, which would checkpoint a half-computed
epoch metric; this callback replaces Lightning's handlers while training runs and acts only at the
end of a training step (the point where periodic checkpoints are taken), on every rank at once.
When a validation is due right after that step, it runs first (Lightning would resume past it)
and the checkpoint follows at the epoch's end or the next step.
Works with or without SLURM: `#SBATCH --signal=USR1@120` signals the job steps (`srun python
train.py ...`) 120 s before the time limit (`B:USR1@120` would signal only the batch shell), the
job script requeues on exit code 75; or a plain `kill -TERM <pid>`. Under SLURM, train.py turns
Lightning's own auto-requeue off (src/utils/run_controller.py), so a job is requeued once.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from types import FrameType
from typing import Any

from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import SIGTERMException

from src.callbacks.step_checkpoint import validation_follows

log = logging.getLogger(__name__)

# EX_TEMPFAIL of sysexits.h: "temporary failure, the user is invited to retry"
PREEMPTED_EXIT_CODE = 75


class RunPreempted(SIGTERMException):
    """Raised after the preemption checkpoint is written; exits the process with `code`."""

    def __init__(self, code: int, checkpoint: Path, signal_name: str) -> None:
        super().__init__(code)
        self.checkpoint = checkpoint
        self.signal_name = signal_name


class Preemption(Callback):
    """Turns the listed signals into "checkpoint at the end of this step, then exit ``exit_code``".

    ``dirpath`` holds the checkpoint (``<dirpath>/last.ckpt``, the file auto-resume reads first).
    """

    def __init__(
        self,
        dirpath: str | Path,
        signals: tuple[str, ...] | list[str] = ("SIGTERM", "SIGUSR1"),
        exit_code: int = PREEMPTED_EXIT_CODE,
    ) -> None:
        self.dirpath = Path(dirpath)
        self.signals = [_signal(name) for name in signals]
        self.exit_code = int(exit_code)
        self.received: signal.Signals | None = None
        self._deferred = False
        self._previous: dict[signal.Signals, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # only a flag: the checkpoint is written by the training loop, never inside a handler
        self.received = signal.Signals(signum)
        log.warning("received %s: saving a checkpoint after this training step", self.received.name)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # after Lightning registered its own handlers (trainer._run), so ours take their place
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._handle)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restore_handlers()

    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, exception: BaseException
    ) -> None:
        self._restore_handlers()

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        stop = self.received is not None
        if trainer.world_size > 1:  # every rank stops at the same step, whichever got the signal
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop and validation_follows(trainer):
            # Lightning would resume such a checkpoint without this validation: let it run, and
            # stop at the end of the epoch (or of the next step, for a validation mid-epoch)
            self._deferred = True
            return
        if stop:
            self._stop(trainer)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._deferred:
            self._stop(trainer)

    def _stop(self, trainer: Trainer) -> None:
        """Save last.ckpt and leave with the preemption exit code."""
        path = self.dirpath / "last.ckpt"
        trainer.save_checkpoint(path)
        name = self.received.name if self.received is not None else "a signal on another rank"
        log.warning(
            "%s: saved %s at step %d; exiting with code %d (run the same command to resume)",
            name,
            path,
            trainer.global_step,
            self.exit_code,
        )
        raise RunPreempted(self.exit_code, path, name)


def _signal(name: str) -> signal.Signals:
    try:
        return signal.Signals[name] if isinstance(name, str) else signal.Signals(name)
    except (KeyError, ValueError):
        valid = ", ".join(s.name for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2))
        raise ValueError(
            f"unknown signal {name!r} for preemption; use names such as {valid}"
        ) from None
