"""Waveform losses and metrics: multi-scale mel, multi-resolution STFT, SI-SNR, bitrate.

Mel and STFT losses follow MelGAN / HiFi-GAN / Parallel WaveGAN practice: several FFT sizes so
that no single time-frequency trade-off dominates; each term is 0 for identical signals.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchaudio.transforms import MelSpectrogram, Spectrogram

LOG_EPS = 1e-5


def _as_batch(waveform: Tensor) -> Tensor:
    """(B, 1, T) or (B, T) -> (B, T) float32 (spectrograms in half precision are unreliable)."""
    return (waveform.squeeze(1) if waveform.ndim == 3 else waveform).float()


class MultiScaleMelLoss(nn.Module):
    """Mean over FFT sizes of L1(log mel); hop = n_fft / 4, Hann windows, magnitude mels.

    Log magnitudes weigh quiet and loud bands alike (plain mel L1 is ruled by the loudest bins).
    """

    def __init__(
        self, sample_rate: int, n_ffts: Sequence[int] = (256, 512, 1024), n_mels: int = 40
    ):
        super().__init__()
        self.transforms = nn.ModuleList(
            MelSpectrogram(
                sample_rate=sample_rate,
                n_fft=n_fft,
                hop_length=n_fft // 4,
                n_mels=min(n_mels, n_fft // 2 + 1),
                power=1.0,
                center=True,
            )
            for n_fft in n_ffts
        )

    def forward(self, estimate: Tensor, target: Tensor) -> Tensor:
        estimate, target = _as_batch(estimate), _as_batch(target)
        loss = estimate.new_zeros(())
        for mel in self.transforms:
            a, b = mel(estimate), mel(target)
            loss = loss + F.l1_loss((a + LOG_EPS).log(), (b + LOG_EPS).log())
        return loss / len(self.transforms)


class MultiResolutionSTFTLoss(nn.Module):
    """Mean over resolutions of spectral convergence + L1 of log magnitudes (Yamamoto et al.
    2020), magnitudes from torchaudio's `Spectrogram`."""

    def __init__(
        self,
        fft_sizes: Sequence[int] = (128, 256, 512),
        hop_sizes: Sequence[int] | None = None,
        win_lengths: Sequence[int] | None = None,
    ):
        super().__init__()
        hop_sizes = hop_sizes or [n // 4 for n in fft_sizes]
        win_lengths = win_lengths or list(fft_sizes)
        if not len(fft_sizes) == len(hop_sizes) == len(win_lengths):
            raise ValueError("fft_sizes, hop_sizes and win_lengths must have the same length")
        self.transforms = nn.ModuleList(
            Spectrogram(n_fft=n, hop_length=h, win_length=w, power=1.0)
            for n, h, w in zip(fft_sizes, hop_sizes, win_lengths, strict=True)
        )

    def forward(self, estimate: Tensor, target: Tensor) -> Tensor:
        estimate, target = _as_batch(estimate), _as_batch(target)
        loss = estimate.new_zeros(())
        for spec in self.transforms:
            a, b = spec(estimate), spec(target)
            convergence = torch.linalg.norm(a - b) / torch.linalg.norm(b).clamp_min(LOG_EPS)
            log_mag = F.l1_loss((a + LOG_EPS).log(), (b + LOG_EPS).log())
            loss = loss + convergence + log_mag
        return loss / len(self.transforms)


def bitrate_kbps(num_codebooks: int, codebook_size: int, frame_rate: float) -> float:
    """Bits per second of the token stream, in kbps: codebooks x log2(size) x frames / s / 1000."""
    return num_codebooks * math.log2(codebook_size) * frame_rate / 1000
