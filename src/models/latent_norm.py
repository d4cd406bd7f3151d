"""An optional normalisation of the encoder's latents before the quantizer.

Bounded grids (FSQ's tanh bound) only use their outer levels when the latents reach them,
and reconstruction alone does not pull the encoder's scale there: on MNIST the pre-bound
latents settle at a standard deviation of about 0.5, where tanh is nearly linear and the
grid's edges stay empty. Per-channel batch statistics (no learnable affine, so the scale
cannot drift back) pin every channel at `scale` standard deviations.
"""

from __future__ import annotations

from torch import Tensor, nn

LATENT_NORMS = ("batch",)


class ScaledBatchNorm(nn.Module):
    """Per-channel batch normalisation without affine parameters, times a fixed `scale`.

    Running statistics are used in eval; under DDP, `trainer.sync_batchnorm` makes the
    batch statistics those of every rank's batch.
    """

    def __init__(self, channels: int, scale: float) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(channels, affine=False)
        self.scale = float(scale)

    def forward(self, latents: Tensor) -> Tensor:
        """(batch, channels, *spatial) -> the same layout, normalised per channel."""
        flat = latents.flatten(2)
        return (self.norm(flat) * self.scale).view_as(latents)


def build_latent_norm(kind: str | None, channels: int, scale: float = 1.0) -> nn.Module:
    """`None` (identity) or "batch" (see ScaledBatchNorm)."""
    if kind is None:
        return nn.Identity()
    if kind not in LATENT_NORMS:
        raise ValueError(f"latent_norm must be null or one of {list(LATENT_NORMS)}; got {kind!r}")
    if scale <= 0:
        raise ValueError(f"latent_scale must be positive; got {scale}")
    return ScaledBatchNorm(channels, scale)
