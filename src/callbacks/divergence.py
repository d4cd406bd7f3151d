"""Stop a diverged run: a training loss that stays non-finite, or a NaN validation metric that
a checkpoint would be ranked by, ends training with an error before any checkpoint of that
state is written, so the newest checkpoint (the one a rerun resumes from) stays finite and no
NaN checkpoint becomes the best one.

Runs before every checkpoint callback at the end of a training step and of a validation
(Lightning calls ModelCheckpoint callbacks last), and before the preemption callback, which
train.py adds after it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer
from torch import Tensor


class DivergenceError(RuntimeError):
    """Training diverged (non-finite loss or NaN monitored metric); the message says what to
    try and which step it happened at."""


class DivergenceStop(Callback):
    """Raise `DivergenceError` once the training loss or its gradients have been non-finite
    (NaN or +-inf) for `patience` steps in a row, or when a validation metric that a checkpoint
    monitors is NaN. At patience 1 non-finite gradients stop the run before the optimizer step.

    With full or bf16 precision one non-finite step already makes the weights non-finite (its
    gradients reach every parameter through the optimizer), hence the default patience of 1;
    under fp16 mixed precision the gradient scaler skips overflowing steps and the weights stay
    finite, so a larger patience lets the scaler recover. Ranks decide together (one boolean
    all-reduce per step), so they all stop at the same step.
    """

    def __init__(self, patience: int = 1) -> None:
        if patience < 1:
            raise ValueError(f"divergence patience must be >= 1 step, got {patience}")
        self.patience = int(patience)
        self.streak = 0
        self._bad_gradients = False

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._bad_gradients = False

    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: Any
    ) -> None:
        """Non-finite gradients count as a diverged step, and the last one allowed stops the run
        before the optimizer writes them into the weights (a finite loss can still overflow in
        the backward pass). Gradients are already reduced over ranks, so ranks agree."""
        params = [p for group in optimizer.param_groups for p in group["params"]]
        grads = [p.grad for p in params if p.grad is not None]
        if not grads or bool(torch.isfinite(torch.nn.utils.get_total_norm(grads))):
            return
        self._bad_gradients = True
        if self.streak + 1 >= self.patience:
            step = trainer.global_step + 1  # the step these gradients were for
            self._raise(trainer, pl_module, f"the gradients of step {step} are not finite")

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        bad_loss = isinstance(loss, Tensor) and not bool(torch.isfinite(loss.detach()).all())
        bad = trainer.strategy.reduce_boolean_decision(bad_loss, all=False) or self._bad_gradients
        self.streak = self.streak + 1 if bad else 0
        if self.streak >= self.patience:
            value = loss.detach().float().mean().item() if isinstance(loss, Tensor) else None
            step = trainer.global_step  # counted once the optimizer stepped
            self._raise(trainer, pl_module, f"the training loss is {value} at step {step}")

    def _raise(self, trainer: Trainer, pl_module: LightningModule, what: str) -> None:
        streak = max(self.streak, 1)
        raise DivergenceError(
            f"training diverged: {what} (epoch {trainer.current_epoch})"
            + (f", non-finite for {streak} steps in a row" if streak > 1 else "")
            + ". "
            + _advice(trainer, pl_module)
        )

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        for callback in trainer.checkpoint_callbacks:
            name = getattr(callback, "monitor", None)
            value = trainer.callback_metrics.get(name) if name else None
            if value is not None and math.isnan(float(value)):
                raise DivergenceError(
                    f"training diverged: the monitored metric {name} is nan after step "
                    f"{trainer.global_step} (epoch {trainer.current_epoch}); no checkpoint was "
                    f"written for it. " + _advice(trainer, pl_module)
                )


def _advice(trainer: Trainer, pl_module: LightningModule) -> str:
    """What to try, with the run's current settings, and where its last checkpoint is."""
    lr = getattr(pl_module.hparams, "lr", None) if hasattr(pl_module, "hparams") else None
    clip = trainer.gradient_clip_val
    precision = trainer.precision
    tips = [
        "a lower learning rate (model.lr" + (f", now {lr})" if lr is not None else ")"),
        (
            f"tighter gradient clipping (trainer.gradient_clip_val, now {clip})"
            if clip
            else "gradient clipping (trainer.gradient_clip_val=1.0)"
        ),
    ]
    if str(precision) != "32-true":
        tips.append(f"full precision (trainer.precision=32-true, now {precision})")
    where = trainer.checkpoint_callback.dirpath if trainer.checkpoint_callback else None
    kept = (
        f" Checkpoints written before the divergence stay in {where}; none was written after it."
        if where
        else ""
    )
    return "Try " + ", ".join(tips[:-1]) + " or " + tips[-1] + "." + kept
