"""1-D convolutional waveform encoder and decoder in the manner of SoundStream / EnCodec.

Each level is a stack of dilated residual units and one strided convolution; the hop (samples
per latent frame) is the product of the strides, e.g. [2, 4, 5, 8] -> 320. With `causal=True`
every convolution pads on the left only, so an output never depends on later samples.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn


class PaddedConv1d(nn.Module):
    """Conv1d whose output has length ceil(T / stride): 'same' padding, or causal (left only)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        dilation: int = 1,
        causal: bool = False,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, stride, dilation=dilation)
        total = dilation * (kernel_size - 1) + 1 - stride
        self.padding = (total, 0) if causal else (total // 2, total - total // 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, self.padding))


class PaddedConvTranspose1d(nn.Module):
    """ConvTranspose1d with kernel 2*stride trimmed to exactly T * stride samples."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, causal: bool) -> None:
        super().__init__()
        self.conv = nn.ConvTranspose1d(in_channels, out_channels, 2 * stride, stride)
        extra = stride  # (T - 1) * s + 2s - T * s
        self.trim = (0, extra) if causal else (extra // 2, extra - extra // 2)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)
        return out[..., self.trim[0] : out.shape[-1] - self.trim[1]]


class ResidualUnit1d(nn.Module):
    """ELU, dilated conv (kernel 7), ELU, 1x1 conv, added to the input."""

    def __init__(self, channels: int, dilation: int, causal: bool) -> None:
        super().__init__()
        hidden = max(1, channels // 2)
        self.body = nn.Sequential(
            nn.ELU(),
            PaddedConv1d(channels, hidden, 7, dilation=dilation, causal=causal),
            nn.ELU(),
            nn.Conv1d(hidden, channels, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


def _residual_units(channels: int, dilations: Sequence[int], causal: bool) -> list[nn.Module]:
    return [ResidualUnit1d(channels, d, causal) for d in dilations]


def _check(channels: int, strides: Sequence[int]) -> None:
    if channels < 1 or not strides or any(s < 1 for s in strides):
        raise ValueError(
            f"channels must be >= 1 and strides a non-empty list of positive ints; "
            f"got {channels} and {list(strides)}"
        )


class ConvEncoder1d(nn.Module):
    """(B, in_channels, T) -> (B, latent_dim, T / hop); the width doubles at every stride."""

    def __init__(
        self,
        in_channels: int,
        latent_dim: int,
        channels: int = 32,
        strides: Sequence[int] = (2, 4, 5, 8),
        dilations: Sequence[int] = (1, 3, 9),
        causal: bool = False,
    ) -> None:
        super().__init__()
        _check(channels, strides)
        self.hop = math.prod(strides)
        layers: list[nn.Module] = [PaddedConv1d(in_channels, channels, 7, causal=causal)]
        width = channels
        for stride in strides:
            layers += _residual_units(width, dilations, causal)
            layers += [nn.ELU(), PaddedConv1d(width, 2 * width, 2 * stride, stride, causal=causal)]
            width *= 2
        layers += [nn.ELU(), PaddedConv1d(width, latent_dim, 3, causal=causal)]
        self.net = nn.Sequential(*layers)

    def forward(self, waveform: Tensor) -> Tensor:
        return self.net(waveform)


class ConvDecoder1d(nn.Module):
    """Mirror of `ConvEncoder1d`: (B, latent_dim, F) -> (B, out_channels, F * hop)."""

    def __init__(
        self,
        out_channels: int,
        latent_dim: int,
        channels: int = 32,
        strides: Sequence[int] = (2, 4, 5, 8),
        dilations: Sequence[int] = (1, 3, 9),
        causal: bool = False,
    ) -> None:
        super().__init__()
        _check(channels, strides)
        self.hop = math.prod(strides)
        width = channels * 2 ** len(strides)
        layers: list[nn.Module] = [PaddedConv1d(latent_dim, width, 7, causal=causal)]
        for stride in reversed(strides):
            layers += [nn.ELU(), PaddedConvTranspose1d(width, width // 2, stride, causal)]
            width //= 2
            layers += _residual_units(width, dilations, causal)
        layers += [nn.ELU(), PaddedConv1d(width, out_channels, 7, causal=causal)]
        self.net = nn.Sequential(*layers)

    def forward(self, latents: Tensor) -> Tensor:
        return self.net(latents)
