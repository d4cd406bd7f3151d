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
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from src.quantizers.contract import QuantizerContract, check_index_range
from src.quantizers.fsq import FSQ
from src.quantizers.grouped import GroupedResidual
from src.quantizers.kernels import straight_through
from src.quantizers.registry import register_quantizer
from src.quantizers.residual import ResidualStack


class ResidualFSQOutput(NamedTuple):
    """`quantized` in the input's layout; `indices` (..., num_quantizers), -1 where dropped."""

    quantized: Tensor
    indices: Tensor


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


@register_quantizer("rfsq")
class ResidualFSQ(nn.Module, QuantizerContract):
    """`num_quantizers` FSQ layers on successive residuals, with the reference's keywords.

    Input is channel-last `(..., dim)` or, with `is_channel_first=True`, `(batch, dim, ...)`.
    `dim` defaults to `len(levels)`; otherwise linear projections map to and from it. Quantize
    dropout (training only) keeps a random number of leading layers and marks the rest -1.
    """

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
    ) -> None:
        super().__init__()
        self.fsq = FSQ(levels=levels)  # validates levels; its bound is layer 0's squash
        levels = self.fsq.levels
        if num_quantizers < 1:
            raise ValueError(f"num_quantizers must be >= 1; got {num_quantizers}")
        self.levels = levels
        self.codebook_dim = len(levels)
        self.dim = self.codebook_dim if dim is None else dim
        self.num_quantizers = num_quantizers
        self.num_codebooks = num_quantizers
        self.codebook_size = self.fsq.codebook_size
        self.is_channel_first = is_channel_first
        projected = self.dim != self.codebook_dim
        self.project_in = nn.Linear(self.dim, self.codebook_dim) if projected else nn.Identity()
        self.project_out = nn.Linear(self.codebook_dim, self.dim) if projected else nn.Identity()
        self.stack = ResidualStack(
            [FSQRefinement(levels, depth) for depth in range(num_quantizers)],
            quantize_dropout=quantize_dropout,
            quantize_dropout_cutoff_index=quantize_dropout_cutoff_index,
            quantize_dropout_multiple_of=quantize_dropout_multiple_of,
            decode="indices_to_codes",
            owner=type(self).__name__,
        )

    def draw_num_kept(self, device: torch.device | str = "cpu") -> int | None:
        """Layers kept in this training step (quantize dropout), agreed across ranks."""
        return self.stack.draw_num_kept(device)

    def forward(self, x: Tensor, *, num_kept: int | None = None) -> ResidualFSQOutput:
        """Quantize `x`; indices are (..., num_quantizers)."""
        self._check_input(x)
        tokens = x.movedim(1, -1) if self.is_channel_first else x
        token_shape = tokens.shape[:-1]
        z = self.project_in(tokens.reshape(1, -1, self.dim))
        with torch.autocast(x.device.type, enabled=False):
            bounded = self.fsq.bound(z.float())  # layer-0 level units
            stacked = self.stack(bounded, num_kept=num_kept)
            codes = stacked.quantized / self.fsq._half_width
            indices = stacked.indices
        out = self._project_out(codes, z.dtype).reshape(*token_shape, self.dim)
        if self.is_channel_first:
            out = out.movedim(-1, 1)
        return ResidualFSQOutput(out, indices.reshape(*token_shape, self.num_quantizers))

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        """Per-layer codes in [-1, 1] units (num_quantizers, ..., len(levels)), unprojected."""
        flat = self._check_indices(indices).reshape(1, -1, indices.shape[-1])
        codes = self.stack.get_codes_from_indices(flat) / self.fsq._half_width
        return codes.reshape(codes.shape[0], *indices.shape[:-1], self.codebook_dim)

    def get_output_from_indices(self, indices: Tensor) -> Tensor:
        """Decode indices (..., q <= num_quantizers) into forward's output, in the input layout."""
        token_shape = self._check_indices(indices).shape[:-1]
        flat = indices.reshape(1, -1, indices.shape[-1])
        codes = self.stack.get_output_from_indices(flat) / self.fsq._half_width
        out = self._project_out(codes, self._project_dtype()).reshape(*token_shape, self.dim)
        return out.movedim(-1, 1) if self.is_channel_first else out

    decode_indices = get_output_from_indices  # the contract's name

    def _project_out(self, codes: Tensor, dtype: torch.dtype) -> Tensor:
        return self.project_out(codes.to(dtype))

    def _project_dtype(self) -> torch.dtype:
        weight = getattr(self.project_out, "weight", None)
        return weight.dtype if weight is not None else torch.float32

    def _check_indices(self, indices: Tensor) -> Tensor:
        if indices.ndim < 2 or not 1 <= indices.shape[-1] <= self.num_quantizers:
            raise ValueError(
                f"indices must be (batch, ..., q) with 1 <= q <= {self.num_quantizers}; "
                f"got {tuple(indices.shape)}"
            )
        return indices

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
class GroupedResidualFSQ(nn.Module, QuantizerContract):
    """`groups` ResidualFSQs, each on its own slice of the feature axis.

    Indices are (groups, ..., num_quantizers). `accept_image_fmap=True` takes channel-first
    `(batch, dim, ...)` maps. All groups keep the same depth under quantize dropout.
    """

    def __init__(
        self, *, dim: int, groups: int = 1, accept_image_fmap: bool = False, **kwargs: object
    ) -> None:
        super().__init__()
        self.dim = dim
        self.groups = groups
        self.accept_image_fmap = accept_image_fmap
        self.grouped = GroupedResidual.split_evenly(
            lambda width: ResidualFSQ(dim=width, is_channel_first=accept_image_fmap, **kwargs),
            dim,
            groups,
            channel_first=accept_image_fmap,
        )
        first = self.grouped.groups[0]
        self.codebook_size = first.codebook_size
        self.num_quantizers = first.num_quantizers
        self.num_codebooks = groups * self.num_quantizers

    @property
    def rfsqs(self) -> nn.ModuleList:
        return self.grouped.groups

    def forward(self, x: Tensor) -> ResidualFSQOutput:
        """Quantize `x`; indices are (groups, ..., num_quantizers)."""
        return self.grouped(x)

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        """Per-group, per-layer codes (groups, num_quantizers, ..., len(levels))."""
        return self.grouped.get_codes_from_indices(indices)

    def get_output_from_indices(self, indices: Tensor) -> Tensor:
        """Decode (groups, ..., q) indices into forward's output."""
        return self.grouped.get_output_from_indices(indices)

    decode_indices = get_output_from_indices  # the contract's name
