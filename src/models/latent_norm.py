"""An optional normalisation of the encoder's latents before the quantizer.

Bounded grids (FSQ's tanh bound) only use their outer levels when the latents reach them,
and reconstruction alone does not pull the encoder's scale there: on MNIST the pre-bound
latents settle at a standard deviation of about 0.5, where tanh is nearly linear and the
grid's edges stay empty. Per-channel batch statistics (no learnable affine, so the scale
cannot drift back) pin every channel at `scale` standard deviations.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from src.quantizers.collectives import differentiable_all_reduce_sum
from src.quantizers.communicator import Distributable

LATENT_NORMS = ("batch",)


class ScaledBatchNorm(Distributable):
    """Per-channel batch normalisation without affine parameters, times a fixed `scale`.

    Training uses the statistics of the whole batch over every rank (sums all-reduced,
    differentiably, through the communicator the LightningModule installs, so it holds on CPU
    gloo as on GPUs) and keeps running estimates for eval. Statistics are float32 whatever the
    autocast dtype.
    """

    def __init__(self, channels: int, scale: float, momentum: float = 0.1, eps: float = 1e-5):
        super().__init__()
        self.scale = float(scale)
        self.momentum = momentum
        self.eps = eps
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, latents: Tensor) -> Tensor:
        """(batch, channels, *spatial) -> the same layout, normalised per channel."""
        x = latents.flatten(2).float()
        if self.training:
            mean, var = self._batch_statistics(x)
        else:
            mean, var = self.running_mean, self.running_var
        out = (x - mean[:, None]) * torch.rsqrt(var + self.eps)[:, None] * self.scale
        return out.to(latents.dtype).view_as(latents)

    def _batch_statistics(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and (biased) variance per channel of (batch, channels, positions) over ranks;
        two passes, so a large mean does not cancel the variance in float32."""
        comm = self.communicator
        positions = x.new_full((1,), float(x.shape[0] * x.shape[2]))
        # one all-reduce for the sums and the number of positions they cover
        totals = differentiable_all_reduce_sum(torch.cat([x.sum(dim=(0, 2)), positions]), comm)
        sums, count = totals[:-1], totals[-1]
        mean = sums / count
        centred = x - mean[:, None]
        var = differentiable_all_reduce_sum(centred.square().sum(dim=(0, 2)), comm) / count
        with torch.no_grad():
            unbiased = var * count / (count - 1).clamp(min=1)
            self.running_mean.lerp_(mean.detach(), self.momentum)
            self.running_var.lerp_(unbiased.detach(), self.momentum)
        return mean, var


def build_latent_norm(kind: str | None, channels: int, scale: float = 1.0) -> nn.Module:
    """`None` (identity) or "batch" (see ScaledBatchNorm)."""
    if kind is None:
        return nn.Identity()
    if kind not in LATENT_NORMS:
        raise ValueError(f"latent_norm must be null or one of {list(LATENT_NORMS)}; got {kind!r}")
    if scale <= 0:
        raise ValueError(f"latent_scale must be positive; got {scale}")
    return ScaledBatchNorm(channels, scale)
