"""Latent quantization (Hsu et al. 2023, arXiv 2305.18378): one learnable scalar codebook per
latent dimension.

Latent dimension `d` has `levels[d]` learnable values; each coordinate snaps to its nearest
value, and a token's index is the mixed-radix number of its per-dimension choices, so the
codebook is the Cartesian product of the per-dimension value sets. The values are trained by
the quantization loss ||q - sg(z)||^2; the encoder by straight-through gradients plus the
commitment loss ||z - sg(q)||^2. Indices address values, not a fixed grid, so decoding them
stays exact however far training has moved the values.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from src.quantizers.contract import QuantizerContract, check_index_range
from src.quantizers.float_input import check_float_input, like_input, project
from src.quantizers.kernels import straight_through
from src.quantizers.reference_checkpoint import register_reference_keys
from src.quantizers.registry import register_quantizer

_MAX_INDEXABLE = 2**63


class LatentQuantizeOutput(NamedTuple):
    """`quantized` has the input's layout; `indices` is int64; `loss` is a scalar ()."""

    quantized: Tensor
    indices: Tensor
    loss: Tensor


class LevelsError(ValueError, RuntimeError):
    """Bad `levels` / `codebook_dim`. Also a RuntimeError: the reference library refuses an
    int `levels` without `codebook_dim` with one (torch's repeat(-1)), and code catching that
    keeps working."""


def _resolve_levels(levels: list[int] | int, codebook_dim: int):
    """Levels as a list: an int is repeated `codebook_dim` times."""
    if isinstance(levels, int):
        if codebook_dim <= 0:
            raise LevelsError(
                f"LatentQuantize with an int `levels` ({levels}) needs codebook_dim > 0, the "
                f"number of latent dimensions it applies to (e.g. codebook_dim=3), or a list "
                f"of levels; got codebook_dim={codebook_dim}"
            )
        levels = [levels] * codebook_dim
    levels = [int(level) for level in levels]
    if not levels or min(levels) < 2:
        raise LevelsError(f"LatentQuantize levels must be ints >= 2; got {levels}")
    if codebook_dim > 0 and codebook_dim != len(levels):
        raise LevelsError(f"codebook_dim={codebook_dim} disagrees with len(levels)={len(levels)}")
    return levels


@register_quantizer("latent_quantize")
class LatentQuantize(nn.Module, QuantizerContract):
    """Per-dimension learnable scalar codebooks with the reference library's keywords.

    Layout: a 3-D input is a sequence `(batch, seq, dim)`, or `(batch, dim, seq)` when its last
    axis is not `dim` but its second is (the reference's layout; decoding then returns
    sequences channel-first too, until a channel-last sequence comes); a 4-D or 5-D input is
    a channel-first image or video map `(batch, dim, ...)`. The features are projected to
    `num_codebooks * len(levels)` channels when `dim` differs, split into `num_codebooks`
    groups sharing the same value sets, and projected back. `optimize_values=False` keeps the
    initial evenly spaced values fixed. `in_place_codebook_optimizer` (a callable taking the
    values' parameter list and returning an optimizer) trains the values inside each training
    forward instead: one step on the quantization loss, then the tokens are quantized with
    the updated values, and the returned loss is the commitment loss alone (the values get
    no gradient from it). The reference builds that optimizer but only steps it when
    `optimize_values=False`, where the values are not parameters and the call fails; here it
    needs `optimize_values=True` and is refused otherwise.
    """

    def __init__(
        self,
        levels: list[int] | int,
        dim: int | None = None,
        commitment_loss_weight: float | None = 0.1,
        quantization_loss_weight: float | None = 0.1,
        num_codebooks: int = 1,
        codebook_dim: int = -1,
        keep_num_codebooks_dim: bool | None = None,
        optimize_values: bool = True,
        in_place_codebook_optimizer: Callable[..., torch.optim.Optimizer] | None = None,
    ) -> None:
        super().__init__()
        if num_codebooks < 1:
            raise ValueError(f"num_codebooks must be >= 1; got {num_codebooks}")
        levels = _resolve_levels(levels, codebook_dim)
        if keep_num_codebooks_dim is None:
            keep_num_codebooks_dim = num_codebooks > 1
        if num_codebooks > 1 and not keep_num_codebooks_dim:
            raise ValueError("keep_num_codebooks_dim=False needs num_codebooks=1")
        self.levels = levels
        self.codebook_dim = len(levels)
        self.num_codebooks = num_codebooks
        self.keep_num_codebooks_dim = keep_num_codebooks_dim
        self._sequences_channel_first = False  # the layout of the last 3-D input (decoding)
        self.commitment_loss_weight = float(commitment_loss_weight or 0.0)
        self.quantization_loss_weight = float(quantization_loss_weight or 0.0)
        self.codebook_size: int = math.prod(levels)
        if self.codebook_size > _MAX_INDEXABLE:
            raise ValueError(f"levels {levels} give more codes than int64 indices can number")

        effective_dim = self.codebook_dim * num_codebooks
        self.dim = effective_dim if dim is None else dim
        projected = self.dim != effective_dim
        self.project_in = nn.Linear(self.dim, effective_dim) if projected else nn.Identity()
        self.project_out = nn.Linear(effective_dim, self.dim) if projected else nn.Identity()

        # values of dimension d in row d, padded to the largest level; padding is never chosen
        width = max(levels)
        values = torch.zeros(self.codebook_dim, width)
        for d, level in enumerate(levels):
            values[d, :level] = torch.linspace(-1.0, 1.0, level)
        if in_place_codebook_optimizer is not None and not optimize_values:
            raise ValueError(
                "in_place_codebook_optimizer trains the values: it needs optimize_values=True"
            )
        self.in_place_codebook_optimizer: torch.optim.Optimizer | None = None
        if optimize_values:
            self.values = nn.Parameter(values)
            if in_place_codebook_optimizer is not None:
                self.in_place_codebook_optimizer = in_place_codebook_optimizer([self.values])
        else:
            self.register_buffer("values", values)
        padding = torch.arange(width) >= torch.tensor(levels).unsqueeze(-1)
        self.register_buffer("_padding", padding, persistent=False)
        self.register_buffer("_levels", torch.tensor(levels), persistent=False)
        basis = [math.prod(levels[:d]) for d in range(len(levels))]
        self.register_buffer("_basis", torch.tensor(basis), persistent=False)
        self.register_buffer("_row_offset", torch.arange(len(levels)) * width, persistent=False)
        register_reference_keys(self)  # the reference library's checkpoints load too

    @property
    def values_per_latent(self) -> list[Tensor]:
        """The current values of each latent dimension (views into `values`)."""
        return [self.values[d, :level] for d, level in enumerate(self.levels)]

    def _digits_to_values(self, digits: Tensor) -> Tensor:
        """Per-dimension value choices (..., codebook_dim) -> values, differentiable."""
        return self.values.float().reshape(-1)[digits + self._row_offset]

    def _quantize(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Nearest value per coordinate of z (..., codebook_dim): values and indices (...)."""
        dist = (z.detach().unsqueeze(-1) - self.values.detach().float()).abs()
        digits = dist.masked_fill(self._padding, torch.inf).argmin(dim=-1)
        return self._digits_to_values(digits), (digits * self._basis).sum(dim=-1)

    def _step_values(self, z: Tensor) -> None:
        """One step of the in-place optimizer on the quantization loss of the finite tokens."""
        optimizer = self.in_place_codebook_optimizer
        assert optimizer is not None
        target = z.detach()
        finite = torch.isfinite(target).all(-1, keepdim=True)
        target = torch.where(finite, target, 0.0)
        with torch.enable_grad():
            q, _ = self._quantize(target)
            error = (q - target).square() * finite
            count = (finite.sum() * self.codebook_dim).clamp_min(1)
            loss = self.quantization_loss_weight * error.sum() / count
            (grad,) = torch.autograd.grad(loss, [self.values])
        self.values.grad = grad
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def forward(self, z: Tensor) -> LatentQuantizeOutput:
        """Quantize `z` (the reference's name for the input); returns the output, indices and
        the weighted latent losses."""
        check_float_input(z, "LatentQuantize")
        channel_first = self._check_input(z)
        tokens = z.movedim(1, -1) if channel_first else z
        token_shape = tokens.shape[:-1]
        latents = project(self.project_in, tokens.reshape(z.shape[0], -1, self.dim))
        out_dtype = latents.dtype
        with torch.autocast(z.device.type, enabled=False):
            latents = latents.float().unflatten(-1, (self.num_codebooks, self.codebook_dim))
            in_place = self.training and self.in_place_codebook_optimizer is not None
            if in_place:
                self._step_values(latents)
            q, indices = self._quantize(latents)
            loss = self.commitment_loss_weight * F.mse_loss(latents, q.detach())
            if not in_place:
                loss = loss + self.quantization_loss_weight * F.mse_loss(q, latents.detach())
            codes = straight_through(latents, q).flatten(-2)
        out = like_input(project(self.project_out, codes.to(out_dtype)), z)
        out = out.reshape(*token_shape, self.dim)
        if channel_first:
            out = out.movedim(-1, 1)
        indices = indices.reshape(*token_shape, self.num_codebooks)
        if not self.keep_num_codebooks_dim:
            indices = indices.squeeze(-1)
        return LatentQuantizeOutput(out, indices, loss)

    def indices_to_codes(self, indices: Tensor, project_out: bool = True) -> Tensor:
        """Decode indices as `forward` returns them into its output (same layout).

        Indices of a sequence are (batch, seq[, num_codebooks]); of an image or video map
        (batch, *spatial[, num_codebooks]), decoded channel-first.
        """
        if not self.keep_num_codebooks_dim:
            indices = indices.unsqueeze(-1)
        elif indices.shape[-1] != self.num_codebooks:
            raise ValueError(
                f"indices must end with num_codebooks={self.num_codebooks}; "
                f"got {tuple(indices.shape)}"
            )
        token_shape = indices.shape[:-1]
        if len(token_shape) not in (2, 3, 4):
            raise ValueError(
                "indices must be (batch, seq), (batch, height, width) or (batch, time, height, "
                f"width), with a trailing num_codebooks axis if kept; got {tuple(indices.shape)}"
            )
        check_index_range(indices, self.codebook_size, self)
        digits = (indices.long().unsqueeze(-1) // self._basis) % self._levels
        codes = self._digits_to_values(digits).flatten(-2)
        codes = codes.reshape(token_shape[0], -1, codes.shape[-1])
        if project_out:
            weight = getattr(self.project_out, "weight", None)
            codes = self.project_out(codes.to(weight.dtype if weight is not None else codes.dtype))
        codes = codes.reshape(*token_shape, codes.shape[-1])
        channel_first = len(token_shape) > 2 or self._sequences_channel_first
        return codes.movedim(-1, 1) if channel_first else codes

    def decode_indices(self, indices: Tensor) -> Tensor:
        """The contract's decode: `indices_to_codes` with the output projection."""
        return self.indices_to_codes(indices)

    def _check_input(self, x: Tensor) -> bool:
        """Validate the layout; True when `x` is a channel-first image or video map."""
        if x.ndim == 3 and x.shape[-1] == self.dim:
            self._sequences_channel_first = False
            return False
        if x.ndim == 3 and x.shape[1] == self.dim:
            self._sequences_channel_first = True
            return True
        if x.ndim in (4, 5) and x.shape[1] == self.dim:
            return True
        raise ValueError(
            f"LatentQuantize expects a sequence (batch, seq, dim={self.dim}) or a channel-first "
            f"sequence / map (batch, dim={self.dim}, seq) / (batch, dim={self.dim}, height, "
            f"width) / (batch, dim={self.dim}, time, height, width); got {tuple(x.shape)}"
        )
