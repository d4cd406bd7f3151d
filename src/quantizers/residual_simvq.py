"""Residual SimVQ: SimVQ layers on successive residuals (each with its own frozen codebook and
learned map), on the shared residual machinery of `src/quantizers/residual.py`."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from src.quantizers.registry import register_quantizer
from src.quantizers.residual_quantizer import ResidualQuantizer
from src.quantizers.simvq import SimVQ


class ResidualSimVQOutput(NamedTuple):
    """`indices` (..., num_quantizers), -1 where dropped; `loss` (num_quantizers,) per layer."""

    quantized: Tensor
    indices: Tensor
    loss: Tensor


class ResidualSimVQCodesOutput(NamedTuple):
    """With `return_all_codes=True`: also every layer's codes (q, ..., dim), zero where
    dropped (the reference's fourth output)."""

    quantized: Tensor
    indices: Tensor
    loss: Tensor
    all_codes: Tensor


@register_quantizer("rsimvq")
class ResidualSimVQ(ResidualQuantizer):
    """`num_quantizers` SimVQ layers, each quantizing what the previous ones left over.

    Input is channel-last `(batch, ..., dim)`, or `(batch, dim, ...)` with
    `channel_first=True`. Further keywords (`frozen_codebook_dim`, `commitment_weight`,
    `input_to_quantize_commit_loss_weight`, `init_fn`, `codebook_transform`) go to every layer;
    a `codebook_transform` module given here would be shared by all layers.
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
        channel_first: bool = False,
        rotation_trick: bool = True,
        heads: int = 1,
        **sim_vq_kwargs: object,
    ) -> None:
        super().__init__()
        if heads != 1:
            raise ValueError(f"ResidualSimVQ takes heads=1 only (as the reference), got {heads}")
        if num_quantizers < 1:
            raise ValueError(f"num_quantizers must be >= 1; got {num_quantizers}")
        layers = [
            SimVQ(
                dim=dim, codebook_size=codebook_size, rotation_trick=rotation_trick, **sim_vq_kwargs
            )
            for _ in range(num_quantizers)
        ]
        self.init_stack(
            layers,
            quantize_dropout=quantize_dropout,
            quantize_dropout_cutoff_index=quantize_dropout_cutoff_index,
            quantize_dropout_multiple_of=quantize_dropout_multiple_of,
            decode="indices_to_codes",
        )
        self.init_projections(dim, dim)  # identities: the layers work at the input width
        self.channel_first = channel_first

    @property
    def codebooks(self) -> Tensor:
        """The layers' searched codebooks, (num_quantizers, codebook_size, dim)."""
        return torch.stack([layer.codebook for layer in self.layers])

    def forward(
        self,
        x: Tensor,
        return_all_codes: bool = False,
        rand_quantize_dropout_fixed_seed: int | None = None,
        *,
        num_kept: int | None = None,
    ) -> ResidualSimVQOutput | ResidualSimVQCodesOutput:
        """Quantize `x`; indices (..., num_quantizers), per-layer losses (num_quantizers,).
        `rand_quantize_dropout_fixed_seed` fixes the quantize-dropout depth as the reference
        draws it; `return_all_codes` adds each layer's codes."""
        self._check_input(x)
        if num_kept is None and rand_quantize_dropout_fixed_seed is not None:
            num_kept = self.draw_num_kept(x.device, rand_quantize_dropout_fixed_seed)
        tokens = x.movedim(1, -1) if self.channel_first else x
        token_shape = tokens.shape[:-1]
        # identity projections: this only refuses integer input, as every quantizer does
        stacked = self.stack(
            self.project_latents(tokens.reshape(1, -1, self.dim)), num_kept=num_kept
        )
        out = stacked.quantized.to(x.dtype).reshape(*token_shape, self.dim)
        if self.channel_first:
            out = out.movedim(-1, 1)
        indices = stacked.indices.reshape(*token_shape, self.num_quantizers)
        if return_all_codes:
            all_codes = self.get_codes_from_indices(indices)
            return ResidualSimVQCodesOutput(out, indices, stacked.losses, all_codes)
        return ResidualSimVQOutput(out, indices, stacked.losses)

    def _check_input(self, x: Tensor) -> None:
        axis = 1 if self.channel_first else -1
        if x.ndim < (3 if self.channel_first else 2) or x.shape[axis] != self.dim:
            layout = "(batch, dim, ...)" if self.channel_first else "(batch, ..., dim)"
            raise ValueError(
                f"ResidualSimVQ expects {layout} input with dim={self.dim}; got {tuple(x.shape)}"
            )
