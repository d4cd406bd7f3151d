"""Residual LFQ: LFQ layers on successive residuals, layer `i` with codes `+-2^-i`, and its
grouped form (one residual LFQ per slice of the feature axis).

Built on the shared machinery: `ResidualStack` (src/quantizers/residual.py) runs the layers
and decodes indices; `GroupedResidual` (src/quantizers/grouped.py) splits and combines groups.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from src.quantizers.grouped import GroupedResidual
from src.quantizers.lfq import LFQ
from src.quantizers.registry import register_quantizer
from src.quantizers.residual_quantizer import ResidualQuantizer


class ResidualLFQOutput(NamedTuple):
    """`indices` (..., num_quantizers), -1 where dropped; `commit_loss` one loss per layer."""

    quantized: Tensor
    indices: Tensor
    commit_loss: Tensor

    @property
    def loss(self) -> Tensor:
        return self.commit_loss


class ResidualLFQCodesOutput(NamedTuple):
    """With `return_all_codes=True`: also every layer's codes (q, ..., codebook_dim)."""

    quantized: Tensor
    indices: Tensor
    commit_loss: Tensor
    all_codes: Tensor

    @property
    def loss(self) -> Tensor:
        return self.commit_loss


@register_quantizer("rlfq")
class ResidualLFQ(ResidualQuantizer):
    """`num_quantizers` LFQ layers of `codebook_size` codes, each quantizing what the previous
    left; layer `i` has `codebook_scale = 2^-i` (and half the previous soft clamp).

    Input: a sequence `(batch, seq, dim)`, or `(batch, dim, ...)` with `channel_first=True`.
    Other keywords (entropy_loss_weight, diversity_gamma, spherical, ...) go to every layer.
    The loss is a vector with one entry per layer (zeros outside training).
    """

    def __init__(
        self,
        *,
        dim: int,
        num_quantizers: int,
        codebook_size: int,
        quantize_dropout: bool = False,
        quantize_dropout_cutoff_index: int = 0,
        quantize_dropout_multiple_of: int = 1,
        soft_clamp_input_value: float | None = None,
        channel_first: bool = False,
        **kwargs: object,
    ) -> None:
        super().__init__()
        if num_quantizers < 1:
            raise ValueError(f"num_quantizers must be >= 1; got {num_quantizers}")
        if int(kwargs.get("num_codebooks", 1)) != 1:
            raise ValueError("ResidualLFQ layers have one codebook each; drop num_codebooks")
        layers = []
        for i in range(num_quantizers):
            layers.append(
                LFQ(
                    codebook_size=codebook_size,
                    codebook_scale=2.0**-i,
                    soft_clamp_input_value=soft_clamp_input_value,
                    **kwargs,
                )
            )
            if soft_clamp_input_value is not None:
                soft_clamp_input_value *= 0.5
        self.channel_first = channel_first
        self.has_projections = dim != layers[0].codebook_dim
        self.init_projections(dim, layers[0].codebook_dim)
        self.init_stack(
            layers,
            quantize_dropout=quantize_dropout,
            quantize_dropout_cutoff_index=quantize_dropout_cutoff_index,
            quantize_dropout_multiple_of=quantize_dropout_multiple_of,
            decode="indices_to_codes",
        )

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        return_all_codes: bool = False,
        rand_quantize_dropout_fixed_seed: int | None = None,
        *,
        num_kept: int | None = None,
    ) -> ResidualLFQOutput | ResidualLFQCodesOutput:
        """Quantize `x`; indices are (batch, seq, num_quantizers) (or (batch, ..., q) maps).
        `rand_quantize_dropout_fixed_seed` fixes the quantize-dropout depth as the reference
        draws it."""
        spatial = self._check_input(x)
        if num_kept is None and rand_quantize_dropout_fixed_seed is not None:
            num_kept = self.draw_num_kept(x.device, rand_quantize_dropout_fixed_seed)
        if self.channel_first:
            x = x.flatten(2).transpose(1, 2)
        z = self.project_latents(x)
        with torch.autocast(x.device.type, enabled=False):
            stacked = self.stack(z.float(), num_kept=num_kept, mask=mask)
        out = self.project_codes(stacked.quantized.to(z.dtype), x)
        indices = stacked.indices
        if self.channel_first:
            out = out.transpose(1, 2).unflatten(2, spatial)
            indices = indices.unflatten(1, spatial)
        if return_all_codes:
            all_codes = self.get_codes_from_indices(indices)
            return ResidualLFQCodesOutput(out, indices, stacked.losses, all_codes)
        return ResidualLFQOutput(out, indices, stacked.losses)

    def _check_input(self, x: Tensor) -> tuple[int, ...]:
        if self.channel_first:
            if x.ndim < 3 or x.shape[1] != self.dim:
                raise ValueError(
                    f"ResidualLFQ(channel_first=True) expects (batch, dim={self.dim}, ...); "
                    f"got {tuple(x.shape)}"
                )
            return tuple(x.shape[2:])
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(
                f"ResidualLFQ expects a sequence (batch, seq, dim={self.dim}); got {tuple(x.shape)}"
            )
        return ()


@register_quantizer("grlfq")
class GroupedResidualLFQ(GroupedResidual):
    """`groups` ResidualLFQs, each on its own slice of the feature axis.

    Indices are (groups, batch, ..., num_quantizers), losses (groups, num_quantizers).
    `accept_image_fmap=True` takes channel-first `(batch, dim, ...)` maps. All groups keep the
    same depth under quantize dropout.
    """

    member = ResidualLFQ
    member_channel_first = "channel_first"

    @property
    def rvqs(self) -> nn.ModuleList:
        return self.members

    def forward(
        self, x: Tensor, mask: Tensor | None = None, return_all_codes: bool = False
    ) -> ResidualLFQOutput | ResidualLFQCodesOutput:
        return super().forward(x, mask=mask, return_all_codes=return_all_codes)
