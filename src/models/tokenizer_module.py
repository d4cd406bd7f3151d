"""What the image and audio tokenizers share: quantizer, per-stage metrics, logging, optimizer."""

from __future__ import annotations

from typing import Any

import torch
from lightning import LightningModule
from torch import Tensor, nn
from torchmetrics import Metric

from src.metrics import CodebookUsage
from src.models.quantizer_adapter import build_latent_quantizer
from src.models.schedules import warmup_cosine
from src.models.strategy_communicator import StrategyCommunicator
from src.quantizers import install_communicator

STAGES = ("train", "val", "test")


class TokenizerModule(LightningModule):
    """Base of the tokenizers: subclasses build encoder/decoder and implement `shared_step`.

    Hyperparameters it reads: lr, weight_decay, betas, warmup_steps, min_lr_ratio.
    Every metric of a stage is computed over the whole epoch (summed over ranks by
    torchmetrics) and logged as `<stage>/<name>`, codebook usage as `<stage>/codebook/...`.
    """

    def init_quantizer(self, config: dict[str, Any], latent_dim: int) -> None:
        """Build the quantizer and one metric set per stage (call after encoder/decoder)."""
        self.quantizer = build_latent_quantizer(config, latent_dim)
        self.codebook_size = int(self.quantizer.codebook_size)
        self.num_codebooks = int(getattr(self.quantizer, "num_codebooks", 1))
        # attributes, not a ModuleDict: a key "train" would shadow Module.train
        for stage in STAGES:
            metrics = dict(self.make_stage_metrics())
            metrics["codebook"] = CodebookUsage(self.codebook_size, self.num_codebooks)
            setattr(self, f"{stage}_metrics", nn.ModuleDict(metrics))

    def make_stage_metrics(self) -> dict[str, Metric]:
        """The epoch metrics of one stage, by name (codebook usage is added by the base)."""
        raise NotImplementedError

    def shared_step(self, batch: Tensor, stage: str) -> dict[str, Tensor]:
        """Forward, losses and metric updates; returns at least `loss`."""
        raise NotImplementedError

    def extra_epoch_values(self, stage: str) -> dict[str, Tensor]:
        """Values logged once per epoch besides the metrics (e.g. the bitrate)."""
        return {}

    def metrics_for(self, stage: str) -> nn.ModuleDict:
        return getattr(self, f"{stage}_metrics")

    def setup(self, stage: str) -> None:
        """Hand a communicator over the trainer's strategy to every submodule that syncs state
        across ranks: the quantizer and, if set, the latent normalisation (no-op on one process)."""
        install_communicator(self, StrategyCommunicator(self.trainer.strategy))

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        out = self.shared_step(batch, "train")
        self.log("train/loss_step", out["loss"].detach(), prog_bar=True, batch_size=len(batch))
        return out["loss"]

    def validation_step(self, batch: Tensor, batch_idx: int) -> dict[str, Tensor]:
        return self.shared_step(batch, "val")

    def test_step(self, batch: Tensor, batch_idx: int) -> dict[str, Tensor]:
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
        values = {
            f"{stage}/{name}": metric.compute()
            for name, metric in metrics.items()
            if name != "codebook"
        }
        values.update(self.extra_epoch_values(stage))
        if metrics["codebook"].update_count > 0:  # quantizers built without indices skip usage
            values.update(codebook_log_values(stage, metrics["codebook"].compute()))
        for metric in metrics.values():
            metric.reset()
        self.log_dict(values, prog_bar=stage == "val", sync_dist=False)

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW (no weight decay on biases and norms), linear warmup then cosine decay."""
        decay = [p for p in self.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in self.parameters() if p.requires_grad and p.ndim < 2]
        hp = self.hparams
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": hp.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=hp.lr,
            betas=tuple(hp.betas),
        )
        total_steps = int(self.trainer.estimated_stepping_batches)
        scheduler = warmup_cosine(optimizer, hp.warmup_steps, total_steps, hp.min_lr_ratio)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


def codebook_log_values(stage: str, usage: dict[str, Tensor]) -> dict[str, Tensor]:
    """Stable metric names: `<stage>/codebook/<name>` and, with several codebooks, per codebook."""
    values = {
        f"{stage}/codebook/{name}": usage[name]
        for name in ("utilization", "perplexity", "dead_codes")
    }
    per_codebook = usage["utilization_per_codebook"]
    if per_codebook.numel() > 1:
        for name in ("utilization", "perplexity", "dead_codes"):
            for i, value in enumerate(usage[f"{name}_per_codebook"]):
                values[f"{stage}/codebook/{i}/{name}"] = value
    return values
