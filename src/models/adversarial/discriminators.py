"""Discriminators of the adversarial tokenizer recipes.

Every discriminator maps media to a list of heads, one `(logits, features)` pair per head:
`logits` are the real/fake scores of that head (any shape), `features` the activations of its
hidden layers (what the feature-matching loss compares). A PatchGAN has one head, the
multi-scale STFT discriminator one per window size, the multi-period one per period.

- `PatchGAN` (pix2pix / VQGAN's NLayerDiscriminator): strided 4x4 convolutions scoring
  overlapping patches of an image.
- `MultiScaleSTFTDiscriminator` (EnCodec): 2-D convolutions over the real and imaginary parts
  of complex STFTs (torch.stft) of several window sizes.
- `MultiPeriodDiscriminator` (HiFi-GAN): the waveform folded into (T / p, p) frames for several
  periods p, convolved along time with kernels (k, 1).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

Heads = list[tuple[Tensor, list[Tensor]]]
NORMS = ("batch", "group", "instance", "none")


def _norm2d(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(32, max(1, channels // 4)), channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    return nn.Identity()


class PatchGAN(nn.Module):
    """pix2pix / VQGAN PatchGAN: `num_layers` stride-2 4x4 convolutions (width doubling up to
    8 x `channels`), one stride-1 convolution, a 1-channel output of patch logits.

    `norm` is batch (VQGAN's default), group, instance or none; weights start at N(0, 0.02)
    (norm scales at N(1, 0.02)) as in pix2pix. A 28x28 digit with 2 layers gets 5x5 logits.
    """

    def __init__(
        self, in_channels: int, channels: int = 64, num_layers: int = 3, norm: str = "batch"
    ) -> None:
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"PatchGAN norm must be one of {NORMS}, got {norm!r}")
        if num_layers < 1 or channels < 1:
            raise ValueError(
                f"PatchGAN needs num_layers >= 1 and channels >= 1, got {num_layers}, {channels}"
            )
        bias = norm in ("none", "instance")
        blocks: list[nn.Sequential] = [
            nn.Sequential(nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2))
        ]
        width = channels
        for n in range(1, num_layers + 1):
            out = channels * min(2**n, 8)
            stride = 2 if n < num_layers else 1
            blocks.append(
                nn.Sequential(
                    nn.Conv2d(width, out, 4, stride, 1, bias=bias),
                    _norm2d(norm, out),
                    nn.LeakyReLU(0.2),
                )
            )
            width = out
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Conv2d(width, 1, 4, 1, 1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
            elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm, nn.InstanceNorm2d)):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    def forward(self, images: Tensor) -> Heads:
        features = []
        x = images
        for block in self.blocks:
            x = block(x)
            features.append(x)
        return [(self.head(x), features)]


class _STFTScale(nn.Module):
    """One window size of the MS-STFT discriminator: (B, 1, T) -> logits over (time, freq)."""

    def __init__(self, n_fft: int, channels: int, dilations: Sequence[int]) -> None:
        super().__init__()
        self.n_fft = n_fft
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        convs = [weight_norm(nn.Conv2d(2, channels, (3, 9), padding=(1, 4)))]
        for dilation in dilations:
            convs.append(
                weight_norm(
                    nn.Conv2d(
                        channels,
                        channels,
                        (3, 9),
                        stride=(1, 2),
                        dilation=(dilation, 1),
                        padding=(dilation, 4),
                    )
                )
            )
        convs.append(weight_norm(nn.Conv2d(channels, channels, (3, 3), padding=(1, 1))))
        self.convs = nn.ModuleList(convs)
        self.head = weight_norm(nn.Conv2d(channels, 1, (3, 3), padding=(1, 1)))

    def forward(self, waveform: Tensor) -> tuple[Tensor, list[Tensor]]:
        spec = torch.stft(
            waveform.float().squeeze(1),
            self.n_fft,
            hop_length=self.n_fft // 4,
            window=self.window,
            return_complex=True,
        )  # (B, freq, time), complex
        x = torch.view_as_real(spec).permute(0, 3, 2, 1)  # (B, 2 = real/imag, time, freq)
        features = []
        for conv in self.convs:
            x = F.leaky_relu(conv(x), 0.2)
            features.append(x)
        return self.head(x), features


class MultiScaleSTFTDiscriminator(nn.Module):
    """EnCodec's MS-STFT discriminator: one convolutional head per STFT window size, each on the
    real and imaginary parts of the complex spectrogram (hop = n_fft / 4, Hann window)."""

    def __init__(
        self,
        n_ffts: Sequence[int] = (1024, 512, 256),
        channels: int = 32,
        dilations: Sequence[int] = (1, 2, 4),
    ) -> None:
        super().__init__()
        if not n_ffts:
            raise ValueError("MultiScaleSTFTDiscriminator needs at least one n_fft")
        self.scales = nn.ModuleList(_STFTScale(n, channels, dilations) for n in n_ffts)

    def forward(self, waveform: Tensor) -> Heads:
        return [scale(waveform) for scale in self.scales]


class _PeriodHead(nn.Module):
    """One period of the MPD: (B, 1, T) folded to (B, 1, T / p, p), convolved along time."""

    def __init__(self, period: int, channels: Sequence[int]) -> None:
        super().__init__()
        self.period = period
        widths = [1, *channels]
        self.convs = nn.ModuleList(
            weight_norm(nn.Conv2d(a, b, (5, 1), (3, 1), padding=(2, 0)))
            for a, b in itertools.pairwise(widths)
        )
        self.post = weight_norm(nn.Conv2d(widths[-1], widths[-1], (5, 1), padding=(2, 0)))
        self.head = weight_norm(nn.Conv2d(widths[-1], 1, (3, 1), padding=(1, 0)))

    def forward(self, waveform: Tensor) -> tuple[Tensor, list[Tensor]]:
        batch, _, length = waveform.shape
        pad = -length % self.period
        x = F.pad(waveform.float(), (0, pad), mode="reflect" if pad < length else "constant")
        x = x.view(batch, 1, -1, self.period)
        features = []
        for conv in [*self.convs, self.post]:
            x = F.leaky_relu(conv(x), 0.1)
            features.append(x)
        return self.head(x), features


class MultiPeriodDiscriminator(nn.Module):
    """HiFi-GAN's multi-period discriminator: one head per period (prime periods by default,
    so the heads see different periodic structure)."""

    def __init__(
        self, periods: Sequence[int] = (2, 3, 5, 7, 11), channels: Sequence[int] = (16, 64, 128)
    ) -> None:
        super().__init__()
        if not periods or any(p < 1 for p in periods):
            raise ValueError(f"periods must be positive integers, got {list(periods)}")
        self.periods = nn.ModuleList(_PeriodHead(p, channels) for p in periods)

    def forward(self, waveform: Tensor) -> Heads:
        return [head(waveform) for head in self.periods]


DISCRIMINATORS: dict[str, type[nn.Module]] = {
    "patchgan": PatchGAN,
    "msstft": MultiScaleSTFTDiscriminator,
    "mpd": MultiPeriodDiscriminator,
}


class Discriminators(nn.Module):
    """Several discriminators as one: the heads of all of them, in config order."""

    def __init__(self, specs: Sequence[dict[str, Any]], in_channels: int) -> None:
        super().__init__()
        members = []
        for spec in specs:
            spec = dict(spec)
            name = spec.pop("name", None)
            if name not in DISCRIMINATORS:
                raise ValueError(
                    f"unknown discriminator {name!r}: model.adversarial.discriminators entries "
                    f"need name: one of {sorted(DISCRIMINATORS)}"
                )
            if name == "patchgan":
                spec.setdefault("in_channels", in_channels)
            members.append(DISCRIMINATORS[name](**spec))
        if not members:
            raise ValueError("model.adversarial.discriminators is empty: name at least one")
        self.members = nn.ModuleList(members)

    def forward(self, media: Tensor) -> Heads:
        return [head for member in self.members for head in member(media)]
