"""Training throughput: `train/steps_per_sec`, `train/samples_per_sec`, `train/tokens_per_sec`.

Tokens are what the model says a training batch holds (`pl_module.tokens_in_batch(batch)`,
src/models/base_module.py): for a tokenizer one code index per latent position and codebook, so a
7x7 latent map with 4 residual codebooks is 196 tokens per image; a model without the hook, or
returning None, gets steps and samples only.
Rates are rolling averages over the last `window_size` training batches (Lightning's `Throughput`),
summed over ranks, and exclude validation time, so they appear only once a window has filled.
At the end of fit the whole-run averages (`summary()`) are logged once, at the final step, as
`summary/steps_per_sec`, `summary/samples_per_sec` and `summary/tokens_per_sec`; the counts
behind them travel in checkpoints, so a resumed run's averages cover every attempt's kept
steps. Lightning's `ThroughputMonitor` is not used as-is: its metric names differ from vqzoo's
stable ones and it does not ask the model for its tokens.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.fabric.utilities.throughput import Throughput

from src.models.base_module import batch_size_of

NAMES = ("train/steps_per_sec", "train/samples_per_sec", "train/tokens_per_sec")
SUMMARY_NAMES = ("summary/steps_per_sec", "summary/samples_per_sec", "summary/tokens_per_sec")
TOTALS = ("elapsed", "batches", "samples", "tokens")  # the counts a checkpoint carries


class TrainingThroughput(Callback):
    """Logs the three throughput metrics (written by loggers every `log_every_n_steps`)."""

    def __init__(self, window_size: int = 20) -> None:
        if window_size < 2:
            raise ValueError(f"throughput window_size must be >= 2 batches, got {window_size}")
        self.window_size = int(window_size)
        self._throughput: Throughput | None = None
        self._since: float | None = None
        self._reset_totals()

    def _reset_totals(self) -> None:
        self._elapsed = 0.0  # training time only, validation excluded
        self._batches = self._samples = self._tokens = 0

    def state_dict(self) -> dict[str, float]:
        """The whole-run counts, so that a resumed run's summary covers the earlier attempts."""
        return {name: getattr(self, f"_{name}") for name in TOTALS}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._elapsed = float(state_dict.get("elapsed", 0.0))
        for name in TOTALS[1:]:
            setattr(self, f"_{name}", int(state_dict.get(name, 0)))

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":  # Lightning loads a resumed checkpoint's counts after this
            self._reset_totals()

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._throughput = Throughput(world_size=trainer.world_size, window_size=self.window_size)
        self._since = time.perf_counter()

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Log the whole-run averages once, at the final step (loggers write on rank 0)."""
        self._since = None  # what follows the last batch is not training time
        summary = self.summary(trainer)
        if summary:
            for logger in trainer.loggers:
                logger.log_metrics(summary, step=trainer.global_step)

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._since is None:  # after a validation
            self._since = time.perf_counter()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._throughput is None:
            return
        self._pause(trainer)
        self._since = time.perf_counter()
        self._batches += 1
        self._samples += batch_size_of(batch)
        self._tokens += _tokens(pl_module, batch)
        self._throughput.update(
            time=self._elapsed,
            batches=self._batches,
            samples=self._samples,
            lengths=self._tokens if self._tokens >= self._samples else None,
        )
        rates = self._rates(trainer)  # loggers write it every trainer.log_every_n_steps
        if rates:
            pl_module.log_dict(rates, on_step=True, on_epoch=False, batch_size=1)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._pause(trainer)
        self._since = None

    def _pause(self, trainer: Trainer) -> None:
        if self._since is None:
            return
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        self._elapsed += time.perf_counter() - self._since
        self._since = None

    def _rates(self, trainer: Trainer) -> dict[str, float]:
        """Rolling rates over the window, once the window is full."""
        assert self._throughput is not None
        metrics = self._throughput.compute()
        if "device/batches_per_sec" not in metrics:
            return {}
        world, accumulate = trainer.world_size, trainer.accumulate_grad_batches
        rates = {
            "train/steps_per_sec": metrics["device/batches_per_sec"] * world / accumulate,
            "train/samples_per_sec": metrics["device/samples_per_sec"] * world,
        }
        if "device/items_per_sec" in metrics:
            rates["train/tokens_per_sec"] = metrics["device/items_per_sec"] * world
        return rates

    def summary(self, trainer: Trainer) -> dict[str, float]:
        """Whole-run averages of this process's training time (times the world size), named
        `summary/...`; empty before any training batch."""
        if self._elapsed <= 0 or self._batches == 0:
            return {}
        world, accumulate = trainer.world_size, trainer.accumulate_grad_batches
        steps, samples, tokens = SUMMARY_NAMES
        summary = {
            steps: self._batches / self._elapsed * world / accumulate,
            samples: self._samples / self._elapsed * world,
        }
        if self._tokens:
            summary[tokens] = self._tokens / self._elapsed * world
        return summary


def _tokens(pl_module: LightningModule, batch: Any) -> int:
    """The model's token count of a training batch; 0 when it does not count tokens."""
    tokens_in_batch = getattr(pl_module, "tokens_in_batch", None)
    count = tokens_in_batch(batch) if callable(tokens_in_batch) else None
    return max(int(count), 0) if count is not None else 0
