"""What every vqzoo LightningModule shares, whatever it models: per-stage epoch metrics logged
as `<stage>/<name>`, AdamW with a warmup + cosine schedule, the communicator install, and the
hooks that callbacks read (`tokens_in_batch` for throughput).

A model kind (the tokenizers in src/models/tokenizer_module.py, a prior on their codes) subclasses
`VqzooModule`, builds its layers, calls `init_stage_metrics()` and implements `make_stage_metrics`
and `shared_step`; train.py, eval.py, the callbacks and compare.py need nothing else from it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from lightning import LightningModule
from torch import Tensor, nn
from torchmetrics import Metric

from src.models.schedules import warmup_cosine
from src.models.strategy_communicator import StrategyCommunicator
from src.quantizers import install_communicator

STAGES = ("train", "val", "test")


def batch_size_of(batch: Any) -> int:
    """Samples in a batch: a tensor's first dimension, or that of the first tensor of a tuple /
    list / dict (e.g. `(codes, labels)`); 1 when the batch holds no tensor."""
    if isinstance(batch, Tensor):
        return int(batch.shape[0]) if batch.ndim else 1
    items = batch.values() if isinstance(batch, dict) else batch
    if isinstance(items, (list, tuple)) or isinstance(batch, dict):
        for item in items:
            if isinstance(item, Tensor) and item.ndim:
                return int(item.shape[0])
    return 1


def adamw(
    parameters: Iterable[nn.Parameter],
    lr: float,
    weight_decay: float,
    betas: Sequence[float],
) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and kernels only (not on biases and norms); frozen
    parameters are left out."""
    params = [p for p in parameters if p.requires_grad]
    return torch.optim.AdamW(
        [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=lr,
        betas=tuple(betas),
    )


class VqzooModule(LightningModule):
    """Base of every model: subclasses implement `make_stage_metrics` and `shared_step`.

    Hyperparameters it reads (saved with `save_hyperparameters`): lr, weight_decay, betas,
    warmup_steps, min_lr_ratio. Every metric of a stage is computed over the whole epoch (summed
    over ranks by torchmetrics) and logged once per epoch as `<stage>/<name>`.
    """

    def init_stage_metrics(self) -> None:
        """One metric set per stage from `make_stage_metrics` (call once the layers exist)."""
        # attributes, not a ModuleDict: a key "train" would shadow Module.train
        for stage in STAGES:
            setattr(self, f"{stage}_metrics", nn.ModuleDict(dict(self.make_stage_metrics())))

    def make_stage_metrics(self) -> dict[str, Metric]:
        """The epoch metrics of one stage, by name (logged as `<stage>/<name>`)."""
        raise NotImplementedError

    def shared_step(self, batch: Any, stage: str) -> dict[str, Tensor]:
        """Forward, losses and metric updates; returns at least `loss`. Media callbacks read
        `inputs` / `reconstructions` from it when the model produces them."""
        raise NotImplementedError

    def metrics_for(self, stage: str) -> nn.ModuleDict:
        return getattr(self, f"{stage}_metrics")

    def metric_values(self, stage: str, name: str, metric: Metric) -> dict[str, Tensor]:
        """What one epoch metric logs: by default its value as `<stage>/<name>`; a metric that
        computes several values (codebook usage) is expanded by its model."""
        return {f"{stage}/{name}": metric.compute()}

    def extra_epoch_values(self, stage: str) -> dict[str, Tensor]:
        """Values logged once per epoch besides the metrics (e.g. the bitrate)."""
        return {}

    def epoch_metric_names(self, stage: str) -> list[str]:
        """The names this model logs once per `stage` epoch (train.py checks the monitored
        metric against them before training)."""
        return [f"{stage}/{name}" for name in self.metrics_for(stage)] + list(
            self.extra_epoch_values(stage)
        )

    def tokens_in_batch(self, batch: Any) -> int | None:
        """Tokens a training batch holds, for `train/tokens_per_sec` (src/callbacks/throughput.py);
        None: the model has no notion of tokens and only steps and samples are counted."""
        return None

    def setup(self, stage: str) -> None:
        """Hand a communicator over the trainer's strategy to every submodule that syncs state
        across ranks (quantizers, latent normalisation; a no-op on one process)."""
        install_communicator(self, StrategyCommunicator(self.trainer.strategy))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        out = self.shared_step(batch, "train")
        size = batch_size_of(batch)
        self.log("train/loss_step", out["loss"].detach(), prog_bar=True, batch_size=size)
        return out["loss"]

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        return self.shared_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        return self.shared_step(batch, "test")

    def on_train_epoch_end(self) -> None:
        self.log_epoch("train")

    def on_validation_epoch_end(self) -> None:
        self.log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self.log_epoch("test")

    def log_epoch(self, stage: str) -> None:
        """Compute, log and reset the stage's epoch metrics."""
        metrics = self.metrics_for(stage)
        values: dict[str, Tensor] = {}
        for name, metric in metrics.items():
            values.update(self.metric_values(stage, name, metric))
        values.update(self.extra_epoch_values(stage))
        for metric in metrics.values():
            metric.reset()
        self.log_dict(values, prog_bar=stage == "val", sync_dist=False)

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW (no weight decay on biases and norms), linear warmup then cosine decay."""
        hp = self.hparams
        optimizer = adamw(self.parameters(), hp.lr, hp.weight_decay, hp.betas)
        total_steps = int(self.trainer.estimated_stepping_batches)
        scheduler = warmup_cosine(optimizer, hp.warmup_steps, total_steps, hp.min_lr_ratio)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }
