"""Residual VQ (SoundStream, Zeghidour et al. 2021), its shared-codebook RQ-VAE form (Lee et al.
2022) and grouped residual VQ (HiFi-Codec, Yang et al. 2023), over `VectorQuantize` layers.

The generic machinery lives in `residual.py` (the stack) and `grouped.py` (the groups); this
file only builds VectorQuantize layers, projects in and out once, and handles input layouts.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from src.quantizers.grouped import GroupedResidual
from src.quantizers.registry import register_quantizer
from src.quantizers.residual_quantizer import ResidualQuantizer
from src.quantizers.vector_quantize import VectorQuantize


class ResidualVQOutput(NamedTuple):
    """quantized (input layout), indices (..., Q) with -1 for dropped layers, loss (1, Q)."""

    quantized: Tensor
    indices: Tensor
    loss: Tensor


class ResidualVQCodesOutput(NamedTuple):
    """As ResidualVQOutput plus the codes each depth used (Q, ..., codebook_dim), zero where
    dropped; they carry the estimator's gradient, like `quantized`."""

    quantized: Tensor
    indices: Tensor
    loss: Tensor
    all_codes: Tensor


@register_quantizer("rvq")
class ResidualVQ(ResidualQuantizer):
    """`num_quantizers` VectorQuantize layers on successive residuals, with the guide's API.

    Input `(batch, seq, dim)`, or with `accept_image_fmap=True` channel-first
    `(batch, dim, height, width)` / `(batch, dim, time, height, width)`. When `codebook_dim`
    differs from `dim` the input is projected once into codebook space and the sum projected
    back. Other keywords (decay, kmeans_init, use_cosine_sim, stochastic sampling, ...) go to
    every VectorQuantize layer; `shared_codebook=True` uses one layer at every depth.
    """

    def __init__(
        self,
        *,
        dim: int,
        num_quantizers: int,
        codebook_size: int,
        codebook_dim: int | None = None,
        shared_codebook: bool = False,
        quantize_dropout: bool = False,
        quantize_dropout_cutoff_index: int = 0,
        quantize_dropout_multiple_of: int = 1,
        accept_image_fmap: bool = False,
        **vq_kwargs: Any,
    ) -> None:
        super().__init__()
        if not isinstance(codebook_size, int) or codebook_size < 1:
            raise ValueError(f"codebook_size must be a positive int, got {codebook_size!r}")
        if num_quantizers < 1:
            raise ValueError(f"num_quantizers must be >= 1, got {num_quantizers}")
        codebook_dim = dim if codebook_dim is None else codebook_dim
        self.shared_codebook = shared_codebook
        self.accept_image_fmap = accept_image_fmap
        self.channel_first = accept_image_fmap
        self.init_projections(dim, codebook_dim)

        def make_layer() -> VectorQuantize:
            return VectorQuantize(
                dim=codebook_dim, codebook_size=codebook_size, codebook_dim=codebook_dim,
                **vq_kwargs,
            )  # fmt: skip

        self.init_stack(
            [make_layer()] if shared_codebook else [make_layer() for _ in range(num_quantizers)],
            depth=num_quantizers if shared_codebook else None,
            quantize_dropout=quantize_dropout,
            quantize_dropout_cutoff_index=quantize_dropout_cutoff_index,
            quantize_dropout_multiple_of=quantize_dropout_multiple_of,
            decode="get_output_from_indices",
            defer_updates=VectorQuantize.pooled_updates if shared_codebook else None,
        )

    @property
    def codebooks(self) -> Tensor:
        """(num_quantizers, codebook_size, codebook_dim) float32 codebooks, one per depth."""
        return torch.stack([layer.codebook for layer in self.layers])

    # ---- layout ---------------------------------------------------------------------------

    def _to_tokens(self, x: Tensor) -> Tensor:
        """Input layout -> (batch, tokens, dim), validating rank and feature size."""
        if self.accept_image_fmap:
            if x.ndim not in (4, 5) or x.shape[1] != self.dim:
                raise ValueError(
                    f"{type(self).__name__}(accept_image_fmap=True) expects (batch, "
                    f"dim={self.dim}, height, width) or (batch, dim, time, height, width) "
                    f"input, got shape {tuple(x.shape)}"
                )
            return x.movedim(1, -1).reshape(x.shape[0], -1, self.dim)
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(
                f"{type(self).__name__} expects (batch, seq, dim={self.dim}) input, got shape "
                f"{tuple(x.shape)}; pass accept_image_fmap=True for (batch, dim, height, width)"
            )
        return x

    def _token_shape(self, x: Tensor) -> tuple[int, ...]:
        """Shape of one index per token position: (batch, seq) or (batch, [time,] h, w)."""
        return (x.shape[0], *x.shape[2:]) if self.accept_image_fmap else tuple(x.shape[:2])

    def _from_tokens(self, tokens: Tensor, token_shape: tuple[int, ...]) -> Tensor:
        out = tokens.reshape(*token_shape, tokens.shape[-1])
        return out.movedim(-1, 1) if self.accept_image_fmap else out

    # ---- forward / decode -----------------------------------------------------------------

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        return_all_codes: bool = False,
        *,
        num_kept: int | None = None,
        **layer_kwargs: Any,
    ) -> ResidualVQOutput | ResidualVQCodesOutput:
        """Quantize `x`; `mask` (True = valid) has the indices' shape without the Q axis.

        `num_kept` forces the quantize-dropout depth (GroupedResidualVQ uses it so all groups
        agree); other keywords (e.g. `sample_codebook_temp`) go to every VectorQuantize call.
        """
        token_shape = self._token_shape(x)
        tokens = self._to_tokens(x)
        if mask is not None:
            if tuple(mask.shape) != token_shape:
                raise ValueError(
                    f"mask must have shape {token_shape} (True = valid), got {tuple(mask.shape)}"
                )
            layer_kwargs["mask"] = mask.reshape(tokens.shape[0], -1).bool()
        stacked = self.stack(
            self.project_latents(tokens),
            num_kept=num_kept,
            return_all_codes=return_all_codes,
            **layer_kwargs,
        )
        if isinstance(self.project_out, nn.Identity):
            out = stacked.quantized.to(x.dtype)
        else:
            out = self.project_codes(stacked.quantized, x)
        if mask is not None:
            out = out.masked_fill(~layer_kwargs["mask"].unsqueeze(-1), 0.0)
        quantized = self._from_tokens(out, token_shape)
        indices = stacked.indices.reshape(*token_shape, self.num_quantizers)
        loss = stacked.losses
        if not return_all_codes:
            return ResidualVQOutput(quantized, indices, loss)
        all_codes = stacked.all_codes.reshape(self.num_quantizers, *token_shape, -1)
        return ResidualVQCodesOutput(quantized, indices, loss, all_codes)


@register_quantizer("grvq")
class GroupedResidualVQ(GroupedResidual):
    """`groups` ResidualVQs, each over its own `dim // groups` slice of the features.

    Indices (groups, batch, seq, Q) and losses (groups, 1, Q); all keywords but `dim`,
    `groups` and `accept_image_fmap` go to every ResidualVQ. All groups share one
    quantize-dropout depth per step.
    """

    member = ResidualVQ
    member_channel_first = "accept_image_fmap"

    @property
    def rvqs(self) -> nn.ModuleList:
        return self.members

    @property
    def codebooks(self) -> Tensor:
        """(groups, Q, codebook_size, codebook_dim)."""
        return torch.stack([rvq.codebooks for rvq in self.members])

    def forward(
        self, x: Tensor, mask: Tensor | None = None, return_all_codes: bool = False, **kwargs: Any
    ) -> ResidualVQOutput | ResidualVQCodesOutput:
        """quantized like `x`; indices (G, ..., Q); loss (G, 1, Q); all_codes (G, Q, ..., d)."""
        return super().forward(x, mask=mask, return_all_codes=return_all_codes, **kwargs)


@register_quantizer("rvq_shared")
class SharedResidualVQ(ResidualVQ):
    """ResidualVQ with one codebook for all depths (RQ-VAE); `shared_codebook` defaults on."""

    def __init__(self, *, shared_codebook: bool = True, **kwargs: Any) -> None:
        super().__init__(shared_codebook=shared_codebook, **kwargs)
