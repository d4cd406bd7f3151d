"""Residual FSQ: FSQ followed by finer and finer copies of its grid on what it left over.

Layer 0 is plain FSQ on the bounded features, measured in its own level units (channel `d`
rounds to an integer in `[-L//2, (L-1)//2]`), so its residual lies within half a step. Layer
`l` uses the same integer grid divided by `m**l`, with `m = L` for odd `L` and `m = L - 1` for
even `L`: the largest divisor for which the grid still covers the previous layer's whole
half-step interval (an even grid is one step short on the positive side). So the worst-case
error shrinks by `m` per layer, and as every grid holds zero the error of a token never grows
(a 2-level channel, `m = 1`, cannot refine). Only layer 0 passes a gradient
(straight-through through the FSQ bound), so the stack as a whole is one straight-through
quantizer whatever its depth.

That is `refinement="exact"`, the default. `refinement="rescaled"` is the reference library's
(vector-quantize-pytorch) algorithm instead: layer `l` is a symmetric FSQ
(`preserve_symmetry=True`) on the residual times `L**l`, its codes divided back, every layer
straight-through; a reference checkpoint loads into it and gives the reference's outputs.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from src.quantizers.contract import check_index_range
from src.quantizers.fsq import FSQ
from src.quantizers.grouped import GroupedResidual
from src.quantizers.kernels import straight_through
from src.quantizers.reference_checkpoint import guard_exact_residual_fsq
from src.quantizers.registry import register_quantizer
from src.quantizers.residual_quantizer import ResidualQuantizer

REFINEMENTS = ("exact", "rescaled")  # ResidualFSQ(refinement=...), see the docstring


class ResidualFSQOutput(NamedTuple):
    """`quantized` in the input's layout; `indices` (..., num_quantizers), -1 where dropped."""

    quantized: Tensor
    indices: Tensor


class ResidualFSQCodesOutput(NamedTuple):
    """With `return_all_codes=True`: also every layer's codes (q, ..., len(levels)) before
    `project_out` (zeros for dropped layers), as the reference returns: in FSQ's code units
    (exact), or each layer's symmetric FSQ codes times its scale (rescaled, the reference's)."""

    quantized: Tensor
    indices: Tensor
    all_codes: Tensor


class FSQRefinement(nn.Module):
    """Layer `depth` of a residual FSQ: FSQ's integer grid divided by `m**depth` (see above)."""

    def __init__(self, levels: list[int], depth: int) -> None:
        super().__init__()
        self.levels = levels
        self.depth = depth
        self.codebook_size = math.prod(levels)
        level_t = torch.tensor(levels)
        divisor = torch.where(level_t % 2 == 1, level_t, level_t - 1).double()
        self.register_buffer("_levels", level_t, persistent=False)
        self.register_buffer("_offset", (level_t // 2).float(), persistent=False)
        self.register_buffer("_scale", divisor.pow(depth).float(), persistent=False)
        basis = [math.prod(levels[:i]) for i in range(len(levels))]
        self.register_buffer("_basis", torch.tensor(basis), persistent=False)

    def _codes(self, digits: Tensor) -> Tensor:
        return (digits.float() - self._offset) / self._scale

    def forward(self, residual: Tensor) -> tuple[Tensor, Tensor]:
        """Codes of `residual` (..., len(levels)) and their int64 mixed-radix indices (...)."""
        shifted = (residual.detach() * self._scale).round() + self._offset  # FSQ's rounding
        top = (self._levels - 1).float()
        digits = torch.minimum(shifted.clamp_min(0), top).long()
        codes = self._codes(digits)
        out = straight_through(residual, codes) if self.depth == 0 else codes
        return out, (digits * self._basis).sum(dim=-1)

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """Codes (..., len(levels)) of int indices (...), equal to what forward returned."""
        check_index_range(indices, self.codebook_size, "ResidualFSQ layer")
        digits = (indices.long().unsqueeze(-1) // self._basis) % self._levels
        return self._codes(digits)


class RescaledFSQLayer(nn.Module):
    """Layer `depth` of the reference's residual FSQ (`refinement="rescaled"`): a symmetric
    FSQ on `residual / scale`, its codes times `scale`, with `scale = levels**-depth` per
    channel (float32, as the reference's); straight-through at every depth."""

    def __init__(self, levels: list[int], depth: int, bound_hard_clamp: bool) -> None:
        super().__init__()
        self.depth = depth
        self.fsq = FSQ(levels=levels, preserve_symmetry=True, bound_hard_clamp=bound_hard_clamp)
        self.codebook_size = self.fsq.codebook_size
        scale = torch.tensor(levels).float() ** -depth
        self.register_buffer("_scale", scale, persistent=False)

    def forward(self, residual: Tensor) -> tuple[Tensor, Tensor]:
        """Codes of `residual` (..., len(levels)) and their int64 indices (...)."""
        quantized, indices = self.fsq(residual / self._scale)
        return quantized * self._scale, indices

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """Codes (..., len(levels)) of int indices (...), equal to what forward returned."""
        return self.fsq.indices_to_codes(indices) * self._scale


@register_quantizer("rfsq")
class ResidualFSQ(ResidualQuantizer):
    """`num_quantizers` FSQ layers on successive residuals, with the reference's keywords.

    Input is channel-last `(..., dim)` or, with `is_channel_first=True`, `(batch, dim, ...)`.
    `refinement` picks the layers (see the module docstring): `"exact"` (default) refines
    layer 0's grid exactly, only layer 0 passing a gradient; `"rescaled"` is the reference
    library's algorithm, so its checkpoints load and give its outputs, indices and gradients
    (indices stay `(batch, ..., q)` for channel-first input, where the reference's forward
    returns `(batch, q, ...)`, a layout its own decode does not take).
    `soft_clamp_input_value` squashes the projected input by `c * tanh(x / c)` first;
    `bound_hard_clamp=True` bounds the layers by a clamp instead of tanh after a soft clamp to
    `1 + 1/(L - 1)` (exact: layer 0's bound; rescaled: every layer's FSQ). Its default (None)
    is the reference's True with `"rescaled"` and False with `"exact"`.
    `dim` defaults to `len(levels)`; otherwise linear projections map to and from it. Quantize
    dropout (training only) keeps a random number of leading layers and marks the rest -1.
    """

    refinement: str = "exact"  # set per instance; the class default serves older pickles

    def __init__(
        self,
        *,
        levels: list[int],
        num_quantizers: int,
        dim: int | None = None,
        is_channel_first: bool = False,
        quantize_dropout: bool = False,
        quantize_dropout_cutoff_index: int = 0,
        quantize_dropout_multiple_of: int = 1,
        soft_clamp_input_value: float | list[float] | Tensor | None = None,
        bound_hard_clamp: bool | None = None,
        refinement: str = "exact",
    ) -> None:
        super().__init__()
        if refinement not in REFINEMENTS:
            raise ValueError(
                f"ResidualFSQ refinement must be 'exact' (layer 0's grid refined exactly, the "
                f"default) or 'rescaled' (the reference library's algorithm); got {refinement!r}"
            )
        if bound_hard_clamp is None:
            bound_hard_clamp = refinement == "rescaled"  # the reference's default with its layers
        self.refinement = refinement
        # validates levels; in exact mode its bound (tanh, or a clamp) squashes layer 0
        self.fsq = FSQ(levels=levels, bound_hard_clamp=bound_hard_clamp)
        levels = self.fsq.levels
        self.bound_hard_clamp = bound_hard_clamp
        if bound_hard_clamp:
            if soft_clamp_input_value is not None:
                raise ValueError(
                    "bound_hard_clamp=True sets its own soft clamp (1 + 1/(L - 1) per channel, "
                    "as the reference); drop soft_clamp_input_value"
                )
            soft_clamp_input_value = [1 + 1 / (level - 1) for level in levels]
        clamp = None
        if soft_clamp_input_value is not None:
            clamp = torch.as_tensor(soft_clamp_input_value, dtype=torch.float32)
            if clamp.numel() not in (1, len(levels)) or clamp.ndim > 1 or (clamp <= 0).any():
                raise ValueError(
                    "soft_clamp_input_value must be a positive number or one per code channel; "
                    f"got {soft_clamp_input_value}"
                )
        # non-persistent (derived from the keywords), as in the reference
        self.register_buffer("soft_clamp_input_value", clamp, persistent=False)
        if num_quantizers < 1:
            raise ValueError(f"num_quantizers must be >= 1; got {num_quantizers}")
        self.levels = levels
        self.is_channel_first = is_channel_first
        self.channel_first = is_channel_first
        self.init_projections(len(levels) if dim is None else dim, len(levels))
        if refinement == "exact":
            layers = [FSQRefinement(levels, depth) for depth in range(num_quantizers)]
        else:
            layers = [
                RescaledFSQLayer(levels, depth, bound_hard_clamp) for depth in range(num_quantizers)
            ]
        self.init_stack(
            layers,
            quantize_dropout=quantize_dropout,
            quantize_dropout_cutoff_index=quantize_dropout_cutoff_index,
            quantize_dropout_multiple_of=quantize_dropout_multiple_of,
            decode="indices_to_codes",
        )
        if refinement == "exact":  # a reference checkpoint would load and differ silently
            guard_exact_residual_fsq(self)

    def forward(
        self,
        x: Tensor,
        return_all_codes: bool = False,
        rand_quantize_dropout_fixed_seed: int | None = None,
        *,
        num_kept: int | None = None,
    ) -> ResidualFSQOutput | ResidualFSQCodesOutput:
        """Quantize `x`; indices are (..., num_quantizers). `rand_quantize_dropout_fixed_seed`
        fixes the quantize-dropout depth (training) as the reference's keyword does."""
        self._check_input(x)
        if num_kept is None and rand_quantize_dropout_fixed_seed is not None:
            num_kept = self.draw_num_kept(x.device, rand_quantize_dropout_fixed_seed)
        tokens = x.movedim(1, -1) if self.is_channel_first else x
        token_shape = tokens.shape[:-1]
        z = self.project_latents(tokens.reshape(1, -1, self.dim))
        with torch.autocast(x.device.type, enabled=False):
            clamp = self.soft_clamp_input_value
            soft = z.float() if clamp is None else (z.float() / clamp).tanh() * clamp
            # exact: layer-0 level units; rescaled: the layers bound their own input
            bounded = self.fsq.bound(soft) if self.refinement == "exact" else soft
            stacked = self.stack(bounded, num_kept=num_kept)
            codes = self.from_stack_units(stacked.quantized)
            indices = stacked.indices
        out = self.project_codes(codes.to(z.dtype), x).reshape(*token_shape, self.dim)
        if self.is_channel_first:
            out = out.movedim(-1, 1)
        indices = indices.reshape(*token_shape, self.num_quantizers)
        if return_all_codes:
            return ResidualFSQCodesOutput(out, indices, self.get_codes_from_indices(indices))
        return ResidualFSQOutput(out, indices)

    def from_stack_units(self, codes: Tensor) -> Tensor:
        """Exact: layer-0 level units -> FSQ's [-1, 1] code units; rescaled: unchanged (the
        layers give the reference's units)."""
        return codes / self.fsq._half_width if self.refinement == "exact" else codes

    def _check_input(self, x: Tensor) -> None:
        if self.is_channel_first:
            if x.ndim < 3 or x.shape[1] != self.dim:
                raise ValueError(
                    f"ResidualFSQ(is_channel_first=True) expects (batch, dim={self.dim}, ...) "
                    f"input; got {tuple(x.shape)}"
                )
        elif x.ndim < 2 or x.shape[-1] != self.dim:
            raise ValueError(
                f"ResidualFSQ expects channel-last (batch, ..., dim={self.dim}) input, e.g. "
                f"(batch, seq, dim); got {tuple(x.shape)}"
            )


@register_quantizer("grfsq")
class GroupedResidualFSQ(GroupedResidual):
    """`groups` ResidualFSQs, each on its own slice of the feature axis.

    Indices are (groups, ..., num_quantizers). `accept_image_fmap=True` takes channel-first
    `(batch, dim, ...)` maps. All groups keep the same depth under quantize dropout. Other
    keywords (`refinement`, `bound_hard_clamp`, ...) go to every group's ResidualFSQ.
    """

    member = ResidualFSQ
    member_channel_first = "is_channel_first"

    @property
    def rfsqs(self) -> nn.ModuleList:
        return self.members
