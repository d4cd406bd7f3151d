"""The image tokenizer: encoder -> quantizer -> decoder, trained and evaluated by Lightning."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MeanMetric, Metric
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from src.models.adversarial.training import AdversarialTraining
from src.models.codes_api import CodesAPI
from src.models.conv2d import ConvDecoder2d, ConvEncoder2d
from src.models.latent_norm import build_latent_norm
from src.models.quantizer_adapter import QuantizedLatents, quantize_latent_map
from src.models.tokenizer_module import TokenizerModule

RECON_LOSSES = {"mse": F.mse_loss, "l1": F.l1_loss}
# SSIM costs a Gaussian filter pass per image, so only the evaluation stages compute it
SSIM_STAGES = ("val", "test")


def per_image_psnr() -> PeakSignalNoiseRatio:
    """PSNR (dB, images in [0, 1]) of each image, averaged over the epoch's images: the number
    papers report. `dim=(1, 2, 3)` keeps one squared-error sum per image (list states that
    torchmetrics concatenates over ranks); `dim=None` would pool the error of the whole epoch."""
    return PeakSignalNoiseRatio(data_range=1.0, dim=(1, 2, 3), reduction="elementwise_mean")


def per_image_ssim() -> StructuralSimilarityIndexMeasure:
    """SSIM (Gaussian 11x11 window, sigma 1.5) of each image, averaged over the epoch's images
    (sum and count states, summed over ranks)."""
    return StructuralSimilarityIndexMeasure(data_range=1.0, reduction="elementwise_mean")


class ImageTokenizer(AdversarialTraining, CodesAPI, TokenizerModule):
    """Learns discrete tokens for images in [0, 1]; logs per epoch the mean per-image PSNR
    (`<stage>/psnr`), the mean SSIM (`val/ssim`, `test/ssim`) and codebook usage.
    Codes API (src/models/codes_api.py): codes (B, h, w, Q), decoded images clamped to [0, 1].
    """

    modality = "image"
    grid_ndim = 2

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
        latent_norm: str | None = None,
        latent_scale: float = 1.0,
        adversarial: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if recon_loss not in RECON_LOSSES:
            raise ValueError(
                f"recon_loss must be one of {sorted(RECON_LOSSES)}, got {recon_loss!r}"
            )
        # without adversarial training the hparams (and the fingerprint) are those of before
        self.save_hyperparameters(ignore=None if adversarial else ["adversarial"])
        self.encoder = ConvEncoder2d(in_channels, latent_dim, list(channels), num_res_blocks)
        self.decoder = ConvDecoder2d(in_channels, latent_dim, list(channels), num_res_blocks)
        self.recon_loss_fn = RECON_LOSSES[recon_loss]
        self.latent_norm = build_latent_norm(latent_norm, latent_dim, latent_scale)
        self.init_quantizer(quantizer, latent_dim)
        # model.adversarial (configs/adversarial/): PatchGAN etc., src/models/adversarial/
        self.init_adversarial(adversarial, in_channels)

    def make_stage_metrics(self) -> dict[str, Metric]:
        return {
            "loss": MeanMetric(),
            "recon_loss": MeanMetric(),
            "quantizer_loss": MeanMetric(),
            "psnr": per_image_psnr(),
        }

    def init_stage_metrics(self) -> None:
        super().init_stage_metrics()
        for stage in SSIM_STAGES:
            self.metrics_for(stage)["ssim"] = per_image_ssim()

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

    def code_grid(self, input_shape: tuple[int, ...]) -> tuple[int, int]:
        """(h, w) codes of (..., height, width) images: each side over the downsampling."""
        factor = self.encoder.downsample_factor
        if len(input_shape) < 2 or input_shape[-2] % factor or input_shape[-1] % factor:
            raise ValueError(
                f"image sides must be divisible by {factor}; got input shape {tuple(input_shape)}"
            )
        return input_shape[-2] // factor, input_shape[-1] // factor

    def discriminator_input(self, images: Tensor) -> Tensor:
        """What a discriminator sees: images in [-1, 1] as the encoder does (unclamped)."""
        return images * 2 - 1

    def finish_decoded(self, media: Tensor) -> Tensor:
        return media.clamp(0, 1)

    def encode(self, images: Tensor) -> QuantizedLatents:
        """Images in [0, 1] -> quantized latents, token indices and the quantizer's loss."""
        self.check_images(images)
        return quantize_latent_map(self.quantizer, self.latent_norm(self.encoder(images * 2 - 1)))

    def decode(self, latents: Tensor) -> Tensor:
        """Quantized latents -> images in [0, 1] (unclamped)."""
        return (self.decoder(latents) + 1) / 2

    def forward(self, images: Tensor) -> tuple[Tensor, QuantizedLatents]:
        quantized = self.encode(images)
        return self.decode(quantized.latents), quantized

    def shared_step(self, images: Tensor, stage: str) -> dict[str, Tensor]:
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
        if "ssim" in metrics:
            metrics["ssim"].update(clamped, images.float())
        self.update_quantizer_metrics(stage, quantized)
        return {
            "loss": loss,
            "inputs": images,
            "reconstructions": clamped,
            # for adversarial training (src/models/adversarial/training.py)
            "generated": reconstructions,
            "recon_loss": recon_loss,
            "quantizer_loss": quantized.aux_loss,
            "recon_parts": {"recon": recon_loss},
        }
