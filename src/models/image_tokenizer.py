"""The image tokenizer: encoder -> quantizer -> decoder, trained and evaluated by Lightning."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lightning import LightningModule
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.image import PeakSignalNoiseRatio

from src.metrics import CodebookUsage
from src.models.conv2d import ConvDecoder2d, ConvEncoder2d
from src.models.quantizer_adapter import (
    QuantizedLatents,
    build_latent_quantizer,
    quantize_latent_map,
)
from src.models.schedules import warmup_cosine
from src.models.strategy_communicator import StrategyCommunicator
from src.quantizers import install_communicator

RECON_LOSSES = {"mse": F.mse_loss, "l1": F.l1_loss}


class ImageTokenizer(LightningModule):
    """Learns discrete tokens for images in [0, 1]; logs PSNR and codebook usage per epoch."""

    def __init__(
        self,
        in_channels: int,
        quantizer: dict[str, Any],
        latent_dim: int = 32,
        channels: tuple[int, ...] = (16, 32, 64),
        num_res_blocks: int = 1,
        recon_loss: str = "mse",
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
    ) -> None:
        super().__init__()
        if recon_loss not in RECON_LOSSES:
            raise ValueError(
                f"recon_loss must be one of {sorted(RECON_LOSSES)}, got {recon_loss!r}"
            )
        self.save_hyperparameters()
        self.encoder = ConvEncoder2d(in_channels, latent_dim, list(channels), num_res_blocks)
        self.decoder = ConvDecoder2d(in_channels, latent_dim, list(channels), num_res_blocks)
        self.quantizer = build_latent_quantizer(quantizer, latent_dim)
        self.codebook_size = int(self.quantizer.codebook_size)
        self.num_codebooks = int(getattr(self.quantizer, "num_codebooks", 1))
        self.recon_loss_fn = RECON_LOSSES[recon_loss]
        # one set per stage; ModuleDict keys can't be "train" (it would shadow Module.train)
        self.train_metrics = self._make_stage_metrics()
        self.val_metrics = self._make_stage_metrics()
        self.test_metrics = self._make_stage_metrics()

    def _make_stage_metrics(self) -> nn.ModuleDict:
        return nn.ModuleDict(
            {
                "loss": MeanMetric(),
                "recon_loss": MeanMetric(),
                "quantizer_loss": MeanMetric(),
                "psnr": PeakSignalNoiseRatio(data_range=1.0),
                "codebook": CodebookUsage(self.codebook_size, self.num_codebooks),
            }
        )

    def metrics_for(self, stage: str) -> nn.ModuleDict:
        return getattr(self, f"{stage}_metrics")

    def setup(self, stage: str) -> None:
        """Hand the quantizer a communicator over the trainer's strategy (no-op on one process)."""
        install_communicator(self.quantizer, StrategyCommunicator(self.trainer.strategy))

    def check_images(self, images: Tensor) -> None:
        """Fail with the expected layout instead of a shape error deep inside a convolution."""
        factor = self.encoder.downsample_factor
        channels = self.hparams.in_channels
        ok = images.ndim == 4 and images.shape[1] == channels and images.is_floating_point()
        if not ok or images.shape[-2] % factor or images.shape[-1] % factor:
            raise ValueError(
                f"ImageTokenizer expects float images shaped (batch, channels={channels}, height, "
                f"width) with height and width divisible by {factor}; got {images.dtype} "
                f"{tuple(images.shape)}. Datamodules must yield image tensors in [0, 1]."
            )

    def encode(self, images: Tensor) -> QuantizedLatents:
        """Images in [0, 1] -> quantized latents, token indices and the quantizer's loss."""
        self.check_images(images)
        return quantize_latent_map(self.quantizer, self.encoder(images * 2 - 1))

    def decode(self, latents: Tensor) -> Tensor:
        """Quantized latents -> images in [0, 1] (unclamped)."""
        return (self.decoder(latents) + 1) / 2

    def forward(self, images: Tensor) -> tuple[Tensor, QuantizedLatents]:
        quantized = self.encode(images)
        return self.decode(quantized.latents), quantized

    def _shared_step(self, images: Tensor, stage: str) -> dict[str, Tensor]:
        reconstructions, quantized = self(images)
        recon_loss = self.recon_loss_fn(reconstructions.float() * 2, images.float() * 2)
        loss = recon_loss + quantized.aux_loss
        metrics = self.metrics_for(stage)
        batch = images.shape[0]
        metrics["loss"].update(loss.detach(), weight=batch)
        metrics["recon_loss"].update(recon_loss.detach(), weight=batch)
        metrics["quantizer_loss"].update(quantized.aux_loss.detach(), weight=batch)
        clamped = reconstructions.detach().float().clamp(0, 1)
        metrics["psnr"].update(clamped, images.float())
        if quantized.indices is not None:
            metrics["codebook"].update(quantized.indices)
        return {"loss": loss, "inputs": images, "reconstructions": clamped}

    def training_step(self, images: Tensor, batch_idx: int) -> Tensor:
        out = self._shared_step(images, "train")
        self.log("train/loss_step", out["loss"].detach(), prog_bar=True, batch_size=len(images))
        return out["loss"]

    def validation_step(self, images: Tensor, batch_idx: int) -> dict[str, Tensor]:
        return self._shared_step(images, "val")

    def test_step(self, images: Tensor, batch_idx: int) -> dict[str, Tensor]:
        return self._shared_step(images, "test")

    def on_train_epoch_end(self) -> None:
        self._log_epoch("train")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def _log_epoch(self, stage: str) -> None:
        """Compute epoch-level metrics (already summed over ranks by torchmetrics) and log them."""
        metrics = self.metrics_for(stage)
        values: dict[str, Tensor] = {
            f"{stage}/{name}": metrics[name].compute()
            for name in ("loss", "recon_loss", "quantizer_loss", "psnr")
        }
        if metrics["codebook"].update_count > 0:  # quantizers built without indices skip usage
            values.update(codebook_log_values(stage, metrics["codebook"].compute()))
        for metric in metrics.values():
            metric.reset()
        self.log_dict(values, prog_bar=False, sync_dist=False)

    def configure_optimizers(self) -> dict[str, Any]:
        decay, no_decay = [], []
        for param in self.parameters():
            if param.requires_grad:
                (decay if param.ndim >= 2 else no_decay).append(param)
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": self.hparams.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=self.hparams.lr,
            betas=tuple(self.hparams.betas),
        )
        total_steps = int(self.trainer.estimated_stepping_batches)
        scheduler = warmup_cosine(
            optimizer, self.hparams.warmup_steps, total_steps, self.hparams.min_lr_ratio
        )
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
