"""Finite Scalar Quantization (Mentzer et al. 2023, arXiv 2309.15505).

Each channel is squashed into a bounded range and rounded to one of `L` levels, with a
straight-through gradient. The codebook is the implicit grid of `prod(levels)` points in
[-1, 1]^len(levels); there are no codebook parameters and no auxiliary losses.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import NamedTuple

import torch
from torch import Tensor, nn

from src.quantizers.contract import QuantizerContract, check_index_range
from src.quantizers.float_input import check_float_input, like_input, project
from src.quantizers.kernels import straight_through
from src.quantizers.registry import register_quantizer

_MAX_INDEXABLE = 2**63  # indices are int64: the largest index prod(levels) - 1 must fit
_BOUND_EPS = 1e-3  # widens the tanh range a little so the outermost levels are reachable
_FLOAT_EXACT = 2**24  # float32 holds every integer up to this exactly


class FSQOutput(NamedTuple):
    """`quantized` has the input's layout and dtype; `indices` is int64 or None, -1 where
    the token (its codebook's channels) is not finite."""

    quantized: Tensor
    indices: Tensor | None


class _RoundBounded(torch.autograd.Function):
    """codes = round(tanh(z + shift)·half_l - offset) / half_width with the gradient of the
    unrounded value (straight-through), in one node: the tanh derivative is kept from the
    forward pass, so the backward is a single multiply. Also returns the rounded levels.

    With `noise` (uniform in [-1/2, 1/2) where an element's rounding is replaced, NaN
    elsewhere) those elements' codes are the unrounded value plus that noise; the rounded
    levels (and so the indices) stay the hard ones."""

    @staticmethod
    def forward(ctx, z, shift, half_l, offset, half_width, noise):  # type: ignore[override]
        squashed = torch.tanh(z + shift)
        bounded = torch.addcmul(-offset, squashed, half_l)
        if noise is None:
            rounded = levels = bounded.round_()  # the unrounded value is not needed: in place
        else:
            rounded = bounded.round()
            levels = torch.where(noise.isnan(), rounded, bounded.add_(noise))
        ctx.save_for_backward((1.0 - squashed * squashed).mul_(half_l / half_width))
        ctx.mark_non_differentiable(rounded)
        return levels / half_width, rounded

    @staticmethod
    def backward(ctx, grad_codes, grad_rounded):  # type: ignore[override]
        (slope,) = ctx.saved_tensors
        return grad_codes * slope, None, None, None, None, None


@register_quantizer("fsq")
class FSQ(nn.Module, QuantizerContract):
    """Round each of `len(levels)` channels to its own number of levels.

    Input is channel-last `(..., dim)`, or `(batch, dim, *spatial)` when built with
    `channel_first=True`. With `num_codebooks > 1` the (projected) features are split into
    `num_codebooks` groups of `len(levels)` channels, each quantized on the same grid.
    """

    def __init__(
        self,
        levels: list[int],
        dim: int | None = None,
        num_codebooks: int = 1,
        keep_num_codebooks_dim: bool | None = None,
        scale: float | None = None,
        allowed_dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float64),
        channel_first: bool = False,
        projection_has_bias: bool = True,
        return_indices: bool = True,
        force_quantization_f32: bool = True,
        preserve_symmetry: bool = False,
        noise_dropout: float = 0.0,
        bound_hard_clamp: bool = False,
        orthogonal_rotation: bool = False,
    ) -> None:
        super().__init__()
        levels = [int(level) for level in levels]
        if not levels or min(levels) < 2:
            raise ValueError(f"FSQ levels must be a non-empty list of ints >= 2; got {levels}")
        if num_codebooks < 1:
            raise ValueError(f"num_codebooks must be >= 1; got {num_codebooks}")
        if not 0.0 <= noise_dropout <= 1.0:
            raise ValueError(f"noise_dropout is a probability in [0, 1]; got {noise_dropout}")
        if keep_num_codebooks_dim is None:
            keep_num_codebooks_dim = num_codebooks > 1
        if num_codebooks > 1 and not keep_num_codebooks_dim:
            raise ValueError("keep_num_codebooks_dim=False needs num_codebooks=1")

        self.levels = levels
        self.codebook_dim = len(levels)
        self.num_codebooks = num_codebooks
        self.keep_num_codebooks_dim = keep_num_codebooks_dim
        self.channel_first = channel_first
        self.return_indices = return_indices
        self.force_quantization_f32 = force_quantization_f32
        self.noise_dropout = noise_dropout
        self.scale = scale  # accepted and kept, as in the reference (which does not use it)
        self.allowed_dtypes = tuple(allowed_dtypes)
        self.preserve_symmetry = preserve_symmetry
        self.bound_hard_clamp = bound_hard_clamp
        self.orthogonal_rotation = orthogonal_rotation
        if orthogonal_rotation:  # persistent, as the reference's: a random draw to keep
            rotation = nn.init.orthogonal_(torch.empty(len(levels), len(levels)))
            self.register_buffer("orthogonal_rot", rotation)
        self.codebook_size: int = math.prod(levels)
        if return_indices and self.codebook_size > _MAX_INDEXABLE:
            raise ValueError(
                f"FSQ levels {levels} give {self.codebook_size} codes, more than int64 indices "
                f"can number; pass return_indices=False to quantize without indices"
            )

        effective_dim = self.codebook_dim * num_codebooks
        self.dim = effective_dim if dim is None else dim
        needs_projection = self.dim != effective_dim
        self.project_in: nn.Module = (
            nn.Linear(self.dim, effective_dim, bias=projection_has_bias)
            if needs_projection
            else nn.Identity()
        )
        self.project_out: nn.Module = (
            nn.Linear(effective_dim, self.dim, bias=projection_has_bias)
            if needs_projection
            else nn.Identity()
        )

        level_t = torch.tensor(levels, dtype=torch.float64)
        half_l = (level_t - 1) * (1 + _BOUND_EPS) / 2
        offset = torch.where(level_t % 2 == 0, 0.5, 0.0)
        # Non-persistent: derived from `levels`, so checkpoints stay free of them.
        self.register_buffer("_half_l", half_l.float(), persistent=False)
        self.register_buffer("_offset", offset.float(), persistent=False)
        self.register_buffer("_shift", torch.atanh(offset / half_l).float(), persistent=False)
        self.register_buffer(
            "_half_width", torch.tensor([lv // 2 for lv in levels]).float(), persistent=False
        )
        self.register_buffer("_levels", torch.tensor(levels, dtype=torch.int64), persistent=False)
        if self.codebook_size <= _MAX_INDEXABLE:
            basis = [math.prod(levels[:i]) for i in range(len(levels))]
            self.register_buffer("_basis", torch.tensor(basis, dtype=torch.int64), persistent=False)
            self.register_buffer("_basis_float", self._basis.float(), persistent=False)
            offset_index = sum(b * (lv // 2) for b, lv in zip(basis, levels, strict=True))
            self._index_offset = float(offset_index)  # index of the all-lowest code is 0
        else:
            self._basis = None

    def bound(self, z: Tensor) -> Tensor:
        """Squash `z` so that rounding gives exactly `L` integer values per channel (tanh, or
        a clamp to [-1, 1] with `bound_hard_clamp`)."""
        shift, half_l, offset = (b.to(z.dtype) for b in (self._shift, self._half_l, self._offset))
        if self.bound_hard_clamp:
            return (z + offset / half_l).clamp(-1.0, 1.0) * half_l - offset
        return torch.tanh(z + shift) * half_l - offset

    def _quantize(self, z: Tensor) -> tuple[Tensor, Tensor | None]:
        """Codes in [-1, 1] of `z` (..., codebook_dim) and their int64 indices (...)."""
        if self.preserve_symmetry or self.bound_hard_clamp:
            return self._quantize_variant(z)
        half_width = self._half_width.to(z.dtype)
        shift, half_l, offset = (b.to(z.dtype) for b in (self._shift, self._half_l, self._offset))
        codes, rounded = _RoundBounded.apply(
            z, shift, half_l, offset, half_width, self._rounding_noise(z)
        )
        if not self.return_indices:
            return codes, None
        if self.codebook_size <= _FLOAT_EXACT and rounded.dtype == torch.float32:
            # mixed radix as one small matmul: exact, every partial sum is an integer < 2^24
            flat = torch.mv(rounded.reshape(-1, self.codebook_dim), self._basis_float)
            indices = flat.add_(self._index_offset).long().view(rounded.shape[:-1])
        else:
            indices = ((rounded + half_width).long() * self._basis).sum(dim=-1)
        # a non-finite token (NaN, inf) has no code: -1, not the cast of NaN (INT64_MIN)
        return codes, indices.masked_fill_(~torch.isfinite(z).all(dim=-1), -1)

    def _quantize_variant(self, z: Tensor) -> tuple[Tensor, Tensor | None]:
        """`_quantize` with the reference's `bound_hard_clamp` (clamp to [-1, 1] in place of
        tanh) and/or `preserve_symmetry` (levels 2k/(L-1) - 1, symmetric about 0, arXiv
        2411.19842 section 3.2): straight-through gradients, codes exactly the grid values."""
        levels = self._levels.to(z.dtype)
        squash = (lambda t: t.clamp(-1.0, 1.0)) if self.bound_hard_clamp else torch.tanh
        if self.preserve_symmetry:
            step = 2.0 / (levels - 1)
            unrounded = (levels - 1) * (squash(z) + 1) / 2 + 0.5
            digits = unrounded.detach().floor()
            soft, codes = unrounded * step - 1.0, digits * step - 1.0
        else:
            half_l, offset = self._half_l.to(z.dtype), self._offset.to(z.dtype)
            step = 1.0 / self._half_width.to(z.dtype)
            shift = offset / half_l if self.bound_hard_clamp else self._shift.to(z.dtype)
            bounded = squash(z + shift) * half_l - offset
            rounded = bounded.detach().round()
            digits = rounded + self._half_width.to(z.dtype)
            soft, codes = bounded * step, rounded * step
        codes = straight_through(soft, codes)
        noise = self._rounding_noise(z)
        if noise is not None:  # one step of uniform noise in place of the rounding
            codes = (codes + torch.nan_to_num(noise, nan=0.0) * step).clamp(-1.0, 1.0)
        if not self.return_indices:
            return codes, None
        indices = (digits.long() * self._basis).sum(dim=-1)
        return codes, indices.masked_fill_(~torch.isfinite(z).all(dim=-1), -1)

    def _rounding_noise(self, z: Tensor) -> Tensor | None:
        """In training, uniform noise of one level's width in place of the rounding of a
        `noise_dropout` fraction of elements (NaN marks the rounded ones), else None."""
        if not (self.training and self.noise_dropout > 0):
            return None
        noise = torch.rand_like(z).sub_(0.5)
        keep_rounding = torch.rand_like(z) >= self.noise_dropout
        return noise.masked_fill_(keep_rounding, float("nan"))

    def codes_to_indices(self, zhat: Tensor) -> Tensor:
        """Int64 index of each code `zhat` (..., len(levels)) in [-1, 1] (mixed radix)."""
        self._check_indexable()
        if self.preserve_symmetry:
            digits = ((zhat.float() + 1.0) * (self._levels - 1) / 2.0).round().long()
            return (digits * self._basis).sum(dim=-1)
        digits = (zhat.float() * self._half_width + self._half_width).round().long()
        return (digits * self._basis).sum(dim=-1)

    def _indices_to_level_codes(self, indices: Tensor) -> Tensor:
        """Codes in [-1, 1] (..., len(levels)) of int indices (...)."""
        self._check_indexable()
        digits = (indices.long().unsqueeze(-1) // self._basis) % self._levels
        if self.preserve_symmetry:
            return digits.float() * (2.0 / (self._levels - 1).float()) - 1.0
        return (digits.float() - self._half_width) / self._half_width

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """Decode indices as returned by `forward` into quantized outputs, in the input layout.

        -1 (the index forward gives a non-finite token) decodes to a zero output."""
        if self.keep_num_codebooks_dim:
            if indices.shape[-1] != self.num_codebooks:
                raise ValueError(
                    f"indices must end with num_codebooks={self.num_codebooks}; "
                    f"got {tuple(indices.shape)}"
                )
        else:
            indices = indices.unsqueeze(-1)
        check_index_range(indices, self.codebook_size, self, allow_masked=True)
        codes = self._rotate_back(self._indices_to_level_codes(indices.clamp_min(0))).flatten(-2)
        codes = self.project_out(codes.to(self._project_dtype()))
        codes = codes.masked_fill((indices < 0).any(-1, keepdim=True), 0.0)
        return codes.movedim(-1, 1) if self.channel_first else codes

    def _rotate_back(self, codes: Tensor) -> Tensor:
        """Codes (..., len(levels)) out of the rotated frame (`orthogonal_rotation`)."""
        if not self.orthogonal_rotation:
            return codes
        return codes @ self.orthogonal_rot.to(codes.dtype).t()

    decode_indices = indices_to_codes  # the contract's name (src/quantizers/contract.py)

    @property
    def implicit_codebook(self) -> Tensor:
        """All `codebook_size` codes (codebook_size, len(levels)); built on demand."""
        indices = torch.arange(self.codebook_size, device=self._levels.device)
        return self._indices_to_level_codes(indices)

    def forward(self, z: Tensor) -> FSQOutput:
        """Quantize `z`; indices are (..., num_codebooks) or (...) with a single codebook."""
        check_float_input(z, "FSQ")
        self._check_input(z)
        if self.channel_first:
            z = z.movedim(1, -1)
        given = z
        z = project(self.project_in, z)
        orig_dtype = z.dtype
        z = z.unflatten(-1, (self.num_codebooks, self.codebook_dim))

        f32 = self.force_quantization_f32
        with torch.autocast(z.device.type, enabled=False) if f32 else nullcontext():
            if f32 and z.dtype not in self.allowed_dtypes:
                z = z.float()
            if self.orthogonal_rotation:
                z = z @ self.orthogonal_rot.to(z.dtype)
            codes, indices = self._quantize(z)
            codes = self._rotate_back(codes)
        codes = codes.flatten(-2).to(orig_dtype)

        out = like_input(project(self.project_out, codes), given)
        if self.channel_first:
            out = out.movedim(-1, 1)
        if indices is not None and not self.keep_num_codebooks_dim:
            indices = indices.squeeze(-1)
        return FSQOutput(out, indices)

    def _check_input(self, z: Tensor) -> None:
        if self.channel_first:
            if z.ndim < 2 or z.shape[1] != self.dim:
                raise ValueError(
                    f"FSQ(channel_first=True) expects (batch, dim={self.dim}, ...) maps; "
                    f"got {tuple(z.shape)}"
                )
        elif z.ndim < 1 or z.shape[-1] != self.dim:
            raise ValueError(
                f"FSQ expects channel-last input (..., dim={self.dim}); got {tuple(z.shape)}; "
                f"build with channel_first=True for (batch, dim, height, width) maps"
            )

    def _check_indexable(self) -> None:
        if self._basis is None:
            raise ValueError(
                f"FSQ levels {self.levels} give {self.codebook_size} codes, too many for "
                f"int64 indices"
            )

    def _project_dtype(self) -> torch.dtype:
        weight = getattr(self.project_out, "weight", None)
        return weight.dtype if weight is not None else torch.float32
