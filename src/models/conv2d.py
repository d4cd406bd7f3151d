"""Convolutional image encoder and decoder: residual blocks, one level per `channels` entry."""

from __future__ import annotations

from torch import Tensor, nn


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=min(32, channels // 4) or 1, num_channels=channels, eps=1e-6)


class ResidualBlock2d(nn.Module):
    """norm-SiLU-conv twice plus a skip connection (1x1 conv when the width changes)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _group_norm(in_channels),
            nn.SiLU(),
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
            _group_norm(out_channels),
            nn.SiLU(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip = (
            nn.Identity()
            if in_channels == out_channels
            else nn.Conv2d(in_channels, out_channels, 1)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.skip(x) + self.body(x)


def _check_channels(channels: list[int], num_res_blocks: int) -> None:
    if not channels or any(c <= 0 for c in channels):
        raise ValueError(f"channels must be a non-empty list of positive widths, got {channels}")
    if num_res_blocks < 0:
        raise ValueError(f"num_res_blocks must be >= 0, got {num_res_blocks}")


class ConvEncoder2d(nn.Module):
    """Maps (B, in_channels, H, W) to (B, latent_dim, H/f, W/f), f = 2 ** (len(channels) - 1).

    `channels[i]` is the width at resolution level i; each level but the last ends with a
    stride-2 convolution.
    """

    def __init__(
        self,
        in_channels: int,
        latent_dim: int,
        channels: list[int],
        num_res_blocks: int = 1,
    ) -> None:
        super().__init__()
        _check_channels(channels, num_res_blocks)
        self.downsample_factor = 2 ** (len(channels) - 1)
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels[0], 3, padding=1)]
        for level, width in enumerate(channels):
            layers += [ResidualBlock2d(width, width) for _ in range(num_res_blocks)]
            if level + 1 < len(channels):
                layers.append(nn.Conv2d(width, channels[level + 1], 4, stride=2, padding=1))
        layers += [_group_norm(channels[-1]), nn.SiLU(), nn.Conv2d(channels[-1], latent_dim, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images)


class ConvDecoder2d(nn.Module):
    """Mirror of `ConvEncoder2d`: (B, latent_dim, h, w) to (B, out_channels, h*f, w*f)."""

    def __init__(
        self,
        out_channels: int,
        latent_dim: int,
        channels: list[int],
        num_res_blocks: int = 1,
    ) -> None:
        super().__init__()
        _check_channels(channels, num_res_blocks)
        widths = list(reversed(channels))
        layers: list[nn.Module] = [nn.Conv2d(latent_dim, widths[0], 3, padding=1)]
        for level, width in enumerate(widths):
            layers += [ResidualBlock2d(width, width) for _ in range(num_res_blocks)]
            if level + 1 < len(widths):
                layers += [
                    nn.Upsample(scale_factor=2, mode="nearest"),
                    nn.Conv2d(width, widths[level + 1], 3, padding=1),
                ]
        layers += [
            _group_norm(widths[-1]),
            nn.SiLU(),
            nn.Conv2d(widths[-1], out_channels, 3, padding=1),
        ]
        self.net = nn.Sequential(*layers)

    def forward(self, latents: Tensor) -> Tensor:
        return self.net(latents)
