"""Step-interval checkpoints that never land between a training step and its validation.

Lightning resumes a checkpoint taken at the end of a training step as "that step is done", and
skips the validation that was due right after it. A checkpoint due on such a step is therefore
taken once that validation has run (Lightning's own deferral of `ModelCheckpoint`), so a resumed
run keeps every validation, and with it every candidate for the best checkpoint.
"""

from __future__ import annotations

from typing import Any

from lightning import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint


def validation_follows(trainer: Trainer) -> bool:
    """Whether the fit loop validates right after the training step that just ended."""
    epoch_loop = trainer.fit_loop.epoch_loop
    try:  # the loop's own rule (val_check_interval, epoch ends, limits), private in Lightning
        return bool(epoch_loop._should_check_val_fx(trainer.fit_loop._data_fetcher))
    except (AttributeError, TypeError) as error:  # no silent guess: checkpoints would misplace
        raise RuntimeError(
            "src/callbacks/step_checkpoint.py reads Lightning's private "
            "_TrainingEpochLoop._should_check_val_fx(fit_loop._data_fetcher), which this "
            f"Lightning version changed ({type(error).__name__}: {error}); see "
            "tests/test_lightning_internals.py"
        ) from error


class StepCheckpoint(ModelCheckpoint):
    """`ModelCheckpoint(every_n_train_steps=N)` that defers a save due just before a validation
    to the end of that validation."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs["save_on_train_epoch_end"] = False  # deferred saves happen at validation end
        super().__init__(**kwargs)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        due = (
            self._every_n_train_steps >= 1 and trainer.global_step % self._every_n_train_steps == 0
        )
        if due and not self._should_skip_saving_checkpoint(trainer) and validation_follows(trainer):
            self._defer_save_until_validation = True
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
