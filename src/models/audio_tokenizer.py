"""The audio tokenizer: 1-D conv encoder -> quantizer over time -> decoder, trained by Lightning."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchaudio.transforms import MelSpectrogram
from torchmetrics import MeanMetric, Metric
from torchmetrics.audio import ScaleInvariantSignalNoiseRatio

from src.models.adversarial.training import AdversarialTraining
from src.models.audio_losses import (
    LOG_EPS,
    MultiResolutionSTFTLoss,
    MultiScaleMelLoss,
    bitrate_kbps,
)
from src.models.codes_api import CodesAPI
from src.models.conv1d import ConvDecoder1d, ConvEncoder1d
from src.models.quantizer_adapter import QuantizedLatents, quantize_latent_map
from src.models.tokenizer_module import TokenizerModule

EPOCH_METRICS = (
    "loss",
    "recon_loss",
    "quantizer_loss",
    "waveform_loss",
    "mel_loss",
    "stft_loss",
    "si_snr",
    "mel_distance",
)


class AudioTokenizer(AdversarialTraining, CodesAPI, TokenizerModule):
    """Learns discrete tokens of mono waveforms (B, 1, T); logs SI-SNR, mel distance, bitrate
    and codebook usage per epoch.

    Loss = waveform_weight * L1 + mel_weight * multi-scale mel + stft_weight * multi-resolution
    STFT + the quantizer's own losses (as for images). Codes API (src/models/codes_api.py):
    codes (B, frames, Q), one frame per `hop` samples.
    """

    modality = "audio"
    grid_ndim = 1

    def __init__(
        self,
        quantizer: dict[str, Any],
        sample_rate: int,
        latent_dim: int = 64,
        channels: int = 32,
        strides: Sequence[int] = (2, 4, 5, 8),
        dilations: Sequence[int] = (1, 3, 9),
        causal: bool = False,
        waveform_weight: float = 1.0,
        mel_weight: float = 1.0,
        stft_weight: float = 1.0,
        mel_n_ffts: Sequence[int] = (256, 512, 1024),
        mel_n_mels: int = 40,
        stft_fft_sizes: Sequence[int] = (128, 256, 512),
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
        adversarial: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        # without adversarial training the hparams (and the fingerprint) are those of before
        self.save_hyperparameters(ignore=None if adversarial else ["adversarial"])
        self.encoder = ConvEncoder1d(1, latent_dim, channels, strides, dilations, causal)
        self.decoder = ConvDecoder1d(1, latent_dim, channels, strides, dilations, causal)
        self.init_quantizer(quantizer, latent_dim)
        self.hop = self.encoder.hop
        self.frame_rate = sample_rate / self.hop
        self.bitrate_kbps = bitrate_kbps(self.num_codebooks, self.codebook_size, self.frame_rate)
        self.mel_loss = MultiScaleMelLoss(sample_rate, mel_n_ffts, mel_n_mels)
        self.stft_loss = MultiResolutionSTFTLoss(stft_fft_sizes)
        # one fixed resolution for the mel-distance metric, whatever the loss scales are
        self.mel_metric = MelSpectrogram(sample_rate, n_fft=512, hop_length=128, n_mels=64)
        # model.adversarial (configs/adversarial/): MS-STFT + MPD etc., src/models/adversarial/
        self.init_adversarial(adversarial, 1)

    def make_stage_metrics(self) -> dict[str, Metric]:
        metrics: dict[str, Metric] = {name: MeanMetric() for name in EPOCH_METRICS}
        # scale-invariant SNR per window (zero-mean), averaged over the epoch's windows
        metrics["si_snr"] = ScaleInvariantSignalNoiseRatio()
        return metrics

    def extra_epoch_values(self, stage: str) -> dict[str, Tensor]:
        return {f"{stage}/bitrate_kbps": torch.tensor(self.bitrate_kbps)}

    def check_waveforms(self, waveforms: Tensor) -> None:
        """Fail with the expected layout instead of a shape error deep inside a convolution."""
        if waveforms.ndim != 3 or waveforms.shape[1] != 1 or not waveforms.is_floating_point():
            raise ValueError(
                "AudioTokenizer expects float mono waveforms shaped (batch, 1, samples); got "
                f"{waveforms.dtype} {tuple(waveforms.shape)}"
            )

    def code_grid(self, input_shape: tuple[int, ...]) -> tuple[int]:
        """(frames,) of (..., samples) waveforms: ceil(samples / hop) (padded to whole frames)."""
        if len(input_shape) < 1 or input_shape[-1] < 1:
            raise ValueError(f"expected (..., samples) waveforms, got shape {tuple(input_shape)}")
        return (-(-input_shape[-1] // self.hop),)

    def encode(self, waveforms: Tensor) -> QuantizedLatents:
        """(B, 1, T) -> latents (B, C, ceil(T / hop)); the input is zero-padded to whole frames."""
        self.check_waveforms(waveforms)
        padding = -waveforms.shape[-1] % self.hop
        return quantize_latent_map(self.quantizer, self.encoder(F.pad(waveforms, (0, padding))))

    def decode(self, latents: Tensor) -> Tensor:
        """Latents (B, C, F) -> waveforms (B, 1, F * hop)."""
        return self.decoder(latents)

    def forward(self, waveforms: Tensor) -> tuple[Tensor, QuantizedLatents]:
        quantized = self.encode(waveforms)
        return self.decode(quantized.latents)[..., : waveforms.shape[-1]], quantized

    def discriminator_input(self, waveforms: Tensor) -> Tensor:
        """What a discriminator sees: the waveform itself."""
        return waveforms

    def mel_distance(self, estimate: Tensor, target: Tensor) -> Tensor:
        """Mean |log mel(estimate) - log mel(target)| per clip (512-point FFT, 64 mels)."""
        a = (self.mel_metric(estimate.float().squeeze(1)) + LOG_EPS).log()
        b = (self.mel_metric(target.float().squeeze(1)) + LOG_EPS).log()
        return (a - b).abs().flatten(1).mean(1)

    def shared_step(self, waveforms: Tensor, stage: str) -> dict[str, Tensor]:
        reconstructions, quantized = self(waveforms)
        hp = self.hparams
        parts = {
            "waveform_loss": F.l1_loss(reconstructions.float(), waveforms.float()),
            "mel_loss": self.mel_loss(reconstructions, waveforms),
            "stft_loss": self.stft_loss(reconstructions, waveforms),
        }
        recon_loss = (
            hp.waveform_weight * parts["waveform_loss"]
            + hp.mel_weight * parts["mel_loss"]
            + hp.stft_weight * parts["stft_loss"]
        )
        loss = recon_loss + quantized.aux_loss
        metrics = self.metrics_for(stage)
        batch = waveforms.shape[0]
        values = {"loss": loss, "recon_loss": recon_loss, "quantizer_loss": quantized.aux_loss}
        for name, value in (values | parts).items():
            metrics[name].update(value.detach(), weight=batch)
        detached = reconstructions.detach()
        metrics["si_snr"].update(detached.squeeze(1).float(), waveforms.squeeze(1).float())
        metrics["mel_distance"].update(self.mel_distance(detached, waveforms))
        self.update_quantizer_metrics(stage, quantized)
        return {
            "loss": loss,
            "inputs": waveforms,
            "reconstructions": detached,
            # for adversarial training (src/models/adversarial/training.py); the balancer's
            # loss names are these parts' (waveform, mel, stft), unweighted
            "generated": reconstructions,
            "recon_loss": recon_loss,
            "quantizer_loss": quantized.aux_loss,
            "recon_parts": {name.removesuffix("_loss"): parts[name] for name in parts},
        }
