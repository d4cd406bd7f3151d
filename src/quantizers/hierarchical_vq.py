"""Hierarchical (multi-scale residual) VQ: the VAR-style tokenizer bottleneck (Tian et al.
2024, arXiv 2404.02905), with the reference library's `HierarchicalVQ` keywords.

Level `k` average-pools the current residual map to its scale (`scales[k]`, coarse to fine),
quantizes every pooled cell with a VQ (one codebook shared by all levels, or one per level),
upsamples the codes back to the full map (linear interpolation and a residual 3-wide
convolution `phi` blended in by `quant_resi`) and subtracts them from the residual. The output
is the sum of every level's upsampled codes. `nested_dropout` (training) keeps only a random
prefix of levels in the output, so coarse prefixes decode on their own.

Indices come in two layouts:
- `indices_layout="levels"` (the reference's): a tuple of `num_levels` tensors
  `(batch, *scale_k)`; `get_output_from_indices(levels, full_shape)` decodes them. Flattened
  and concatenated coarse to fine they are the next-scale token sequence of a VAR prior
  (`levels_to_sequence` / `sequence_to_levels`).
- `indices_layout="slots"` (for the framework's codes API, which wants one tensor with
  `num_codebooks` codes per token position): `(batch, *full, num_levels)`, where slot `k` of a
  position holds the code of the level-`k` cell it falls in (cell `floor(i * s / S)` per
  axis). A level's scale is capped at the input's size along each axis in this layout, so
  every cell owns at least one position and decoding reads each cell back (the largest
  index over its positions: masked positions hold -1). Missing trailing slots decode as
  dropped levels, so a coarse prefix `indices[..., :k]` decodes like the full stack cut to
  `k` levels. In either layout a level without any code in a sample (all -1) adds nothing,
  which is what nested dropout's prefix output is.

Masked positions (`mask` / `lens`) and tokens with a NaN or inf are left out of the pooling,
so of every VQ statistic; their output is zero and their indices -1 (a whole masked cell).
The cutoff of nested dropout is drawn on every rank and rank 0's is taken.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from src.quantizers.communicator import Distributable
from src.quantizers.contract import MASKED, QuantizerContract, check_index_range
from src.quantizers.float_input import check_float_input, like_input, project
from src.quantizers.registry import register_quantizer
from src.quantizers.vector_quantize import VectorQuantize

_LAYOUTS = ("levels", "slots")


class HierarchicalVQOutput(NamedTuple):
    """`quantized` in the input's layout; `indices` per `indices_layout`; `loss` the mean
    commitment loss of the kept levels, float32 scalar."""

    quantized: Tensor
    indices: tuple[Tensor, ...] | Tensor
    loss: Tensor


class _Phi(nn.Module):
    """Residual 3-wide convolution after upsampling: x + ratio * (conv(x) - x)."""

    def __init__(self, dim: int, spatial_dims: int, resi_ratio: float) -> None:
        super().__init__()
        conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[spatial_dims - 1]
        self.conv = conv(dim, dim, 3, padding=1)
        self.resi_ratio = float(abs(resi_ratio))

    def forward(self, x: Tensor) -> Tensor:
        if self.resi_ratio <= 1e-8:
            return x
        convolved = project(self.conv, x)  # fp16 / bf16 maps outside autocast: in float32
        return x.to(convolved.dtype).lerp(convolved, self.resi_ratio)


def _channel_last(fmap: Tensor) -> Tensor:
    """(B, C, *spatial) -> contiguous (B, *spatial, C): the memory layout every other quantizer
    returns, so a decoder sees the same strides (and gives the same bits) after decoding."""
    return fmap.movedim(1, -1).contiguous()


def _level_shape(scale: int | Sequence[int], spatial_dims: int) -> tuple[int, ...]:
    if isinstance(scale, int):
        return (scale,) * spatial_dims
    shape = tuple(int(s) for s in scale)
    if len(shape) != spatial_dims:
        raise ValueError(f"scale {scale} has {len(shape)} axes; the input has {spatial_dims}")
    return shape


@register_quantizer("hierarchical_vq")
class HierarchicalVQ(Distributable, QuantizerContract):
    """Multi-scale residual VQ over a sequence, image or video map (see the module docstring).

    Input: channel-first `(batch, dim, *spatial)` (default) or channel-last
    `(batch, *spatial, dim)` with `channel_first=False`; one spatial axis unless
    `accept_image_fmap` (two) or `accept_3d_fmap` (three). `codebook_size` is an int or one
    size per level (`shared_codebook=False`); `num_codebooks` is the number of levels.
    """

    def __init__(
        self,
        *,
        dim: int,
        codebook_size: int | Sequence[int],
        scales: Sequence[int | Sequence[int]],
        shared_codebook: bool = True,
        channel_first: bool = True,
        sync_codebook: bool | None = None,
        decay: float = 0.99,
        commitment_weight: float = 1.0,
        rotation_trick: bool = False,
        kmeans_init: bool = True,
        kmeans_iters: int = 10,
        threshold_ema_dead_code: float = 2,
        stochastic_sample_codes: bool = False,
        sample_codebook_temp: float = 0.1,
        orthogonal_reg_weight: float = 0.0,
        orthogonal_reg_max_codes: int | None = 128,
        orthogonal_reg_active_codes_only: bool = False,
        quant_resi: float = 0.5,
        share_quant_resi: int = 1,
        nested_dropout: float = 0.0,
        nested_dropout_min_levels: int = 1,
        accept_image_fmap: bool = False,
        accept_3d_fmap: bool = False,
        indices_layout: str = "levels",
    ) -> None:
        super().__init__()
        if accept_image_fmap and accept_3d_fmap:
            raise ValueError("choose at most one of accept_image_fmap / accept_3d_fmap")
        if not 0.0 <= nested_dropout <= 1.0 or nested_dropout_min_levels < 1:
            raise ValueError("nested_dropout must be in [0, 1] and nested_dropout_min_levels >= 1")
        if indices_layout not in _LAYOUTS:
            raise ValueError(f"indices_layout must be one of {_LAYOUTS}; got {indices_layout!r}")
        spatial_dims = 2 if accept_image_fmap else 3 if accept_3d_fmap else 1
        level_shapes = tuple(_level_shape(scale, spatial_dims) for scale in scales)
        if not level_shapes or min(s for shape in level_shapes for s in shape) < 1:
            raise ValueError(f"scales must be a non-empty list of positive sizes; got {scales}")
        for coarse, fine in itertools.pairwise(level_shapes):
            if any(a > b for a, b in zip(coarse, fine, strict=True)):
                raise ValueError(f"scales must be non-decreasing (coarse to fine); got {scales}")
        sizes = (
            (int(codebook_size),) * len(level_shapes)
            if isinstance(codebook_size, int)
            else tuple(int(s) for s in codebook_size)
        )
        if len(sizes) != len(level_shapes):
            raise ValueError(f"{len(sizes)} codebook sizes for {len(level_shapes)} scales")
        if shared_codebook and len(set(sizes)) != 1:
            raise ValueError("shared_codebook=True needs one codebook size for every level")

        self.dim = dim
        self.spatial_dims = spatial_dims
        self.channel_first = channel_first
        self.scales = tuple(scales)
        self.level_shapes = level_shapes
        self.num_levels = len(level_shapes)
        self.num_codebooks = self.num_levels
        self.level_codebook_sizes = sizes
        self.codebook_size = max(sizes)
        self.nested_dropout = nested_dropout
        self.nested_dropout_min_levels = nested_dropout_min_levels
        self.indices_layout = indices_layout

        vq_kwargs = {
            "dim": dim,
            "decay": decay,
            "commitment_weight": commitment_weight,
            "rotation_trick": rotation_trick,
            "kmeans_init": kmeans_init,
            "kmeans_iters": kmeans_iters,
            "threshold_ema_dead_code": threshold_ema_dead_code,
            "stochastic_sample_codes": stochastic_sample_codes,
            "sample_codebook_temp": sample_codebook_temp,
            "orthogonal_reg_weight": orthogonal_reg_weight,
            "orthogonal_reg_max_codes": orthogonal_reg_max_codes,
            "orthogonal_reg_active_codes_only": orthogonal_reg_active_codes_only,
            "sync_codebook": sync_codebook,
            "channel_last": True,
        }
        self.vq = VectorQuantize(codebook_size=sizes[0], **vq_kwargs) if shared_codebook else None
        self.vqs = (
            None
            if shared_codebook
            else nn.ModuleList(VectorQuantize(codebook_size=s, **vq_kwargs) for s in sizes)
        )
        self.phi_shared = _Phi(dim, spatial_dims, quant_resi) if share_quant_resi == 1 else None
        self.phi_levels = None
        if share_quant_resi != 1:
            count = (
                self.num_levels if share_quant_resi <= 0 else min(self.num_levels, share_quant_resi)
            )
            self.phi_levels = nn.ModuleList(
                _Phi(dim, spatial_dims, quant_resi) for _ in range(count)
            )

    @property
    def codebook_sizes(self) -> tuple[int, ...]:  # type: ignore[override]
        return self.level_codebook_sizes

    def get_vq(self, level: int) -> VectorQuantize:
        return self.vq if self.vq is not None else self.vqs[level]  # type: ignore[index]

    def choose_phi(self, level: int) -> _Phi:
        if self.phi_shared is not None:
            return self.phi_shared
        phis = self.phi_levels
        position = level / max(self.num_levels - 1, 1)
        return phis[round(position * (len(phis) - 1))]  # type: ignore[index]

    # -- shapes -------------------------------------------------------------------------------

    def _shapes_for(self, full: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
        """The level shapes for a map of spatial size `full` (capped at it in slots layout)."""
        if self.indices_layout == "levels":
            return self.level_shapes
        return tuple(
            tuple(min(s, f) for s, f in zip(shape, full, strict=True))
            for shape in self.level_shapes
        )

    def _upsample(self, codes: Tensor, full: tuple[int, ...], level: int) -> Tensor:
        """(B, C, *level) codes -> (B, C, *full) through interpolation and phi."""
        if tuple(codes.shape[2:]) != full:
            mode = ("linear", "bilinear", "trilinear")[self.spatial_dims - 1]
            codes = F.interpolate(codes, size=full, mode=mode, align_corners=False)
        return self.choose_phi(level)(codes)

    def _pool(
        self, residual: Tensor, valid: Tensor, shape: tuple[int, ...]
    ) -> tuple[Tensor, Tensor]:
        """Masked average pooling of (B, C, *full) to `shape`; and which cells hold a token."""
        pool = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)
        pool_fn = pool[self.spatial_dims - 1]
        weight = valid.unsqueeze(1).to(residual.dtype)
        kept = torch.where(valid.unsqueeze(1), residual, 0.0)
        if all(s == 1 for s in shape):  # coarsest level: the masked mean of the whole map
            dims = tuple(range(2, residual.ndim))
            total = weight.sum(dims, keepdim=True)
            pooled = kept.sum(dims, keepdim=True) / total.clamp_min(1e-6)
            return pooled, total.squeeze(1) > 0
        share = pool_fn(weight, shape)
        pooled = pool_fn(kept, shape) / share.clamp_min(1e-6)
        return pooled, share.squeeze(1) > 0

    # -- forward ------------------------------------------------------------------------------

    def forward(
        self,
        x: Tensor,
        indices: Tensor | None = None,
        mask: Tensor | None = None,
        lens: Tensor | None = None,
        sample_codebook_temp: float | None = None,
        return_cutoff: bool = False,
    ) -> HierarchicalVQOutput | tuple[Tensor, tuple[Tensor, ...] | Tensor, Tensor, int | None]:
        if indices is not None:
            raise NotImplementedError("HierarchicalVQ(x, indices=...) is not supported")
        if mask is not None and lens is not None:
            raise ValueError("pass either mask or lens, not both")
        check_float_input(x, "HierarchicalVQ")
        fmap = x if self.channel_first else x.movedim(-1, 1)
        if fmap.ndim != self.spatial_dims + 2 or fmap.shape[1] != self.dim:
            layout = "(batch, dim, *spatial)" if self.channel_first else "(batch, *spatial, dim)"
            raise ValueError(
                f"HierarchicalVQ expects {layout} input with dim={self.dim} and "
                f"{self.spatial_dims} spatial axes (accept_image_fmap / accept_3d_fmap for "
                f"maps, channel_first for the layout); got {tuple(x.shape)}"
            )
        full = tuple(fmap.shape[2:])
        valid = torch.isfinite(fmap).all(1)
        if lens is not None:
            if self.spatial_dims != 1:
                raise ValueError("lens is only supported for 1-d sequences; pass a mask")
            valid = valid & (torch.arange(full[0], device=x.device) < lens.unsqueeze(-1))
        if mask is not None:
            if tuple(mask.shape) != (fmap.shape[0], *full):
                raise ValueError(
                    f"mask must be (batch, *spatial) = {(fmap.shape[0], *full)}; "
                    f"got {tuple(mask.shape)}"
                )
            valid = valid & mask.bool()
        vq_kwargs = (
            {} if sample_codebook_temp is None else {"sample_codebook_temp": sample_codebook_temp}
        )

        residual = fmap
        reconstruction = torch.zeros_like(fmap)
        prefixes, all_indices, losses = [], [], []
        for level, shape in enumerate(self._shapes_for(full)):
            pooled, cells = self._pool(residual, valid, shape)
            tokens = pooled.flatten(2).transpose(1, 2)
            out = self.get_vq(level)(tokens, mask=cells.flatten(1), **vq_kwargs)
            codes = out.quantized.transpose(1, 2).unflatten(2, shape)
            upsampled = self._upsample(codes, full, level)
            reconstruction = reconstruction + upsampled
            residual = residual - upsampled
            prefixes.append(reconstruction)
            all_indices.append(out.indices.unflatten(1, shape))
            losses.append(out.loss.float().sum())

        cutoff = self._nested_cutoff(x.device)
        stacked = torch.stack(losses)
        if cutoff is not None:
            reconstruction = prefixes[cutoff]
            stacked = stacked[: cutoff + 1]
        loss = stacked.mean()
        reconstruction = like_input(torch.where(valid.unsqueeze(1), reconstruction, 0.0), x)
        quantized = reconstruction if self.channel_first else _channel_last(reconstruction)
        codes_out: tuple[Tensor, ...] | Tensor = tuple(all_indices)
        if self.indices_layout == "slots":
            codes_out = self.levels_to_slots(tuple(all_indices), full, valid)
        if return_cutoff:
            return quantized, codes_out, loss, cutoff
        return HierarchicalVQOutput(quantized, codes_out, loss)

    def _nested_cutoff(self, device: torch.device) -> int | None:
        """The last kept level under nested dropout (training), or None for all levels."""
        low = self.nested_dropout_min_levels
        if not self.training or self.nested_dropout <= 0 or low >= self.num_levels:
            return None
        draw = torch.stack([torch.rand(()), torch.randint(low - 1, self.num_levels - 1, ())])
        draw = self.communicator.broadcast(draw.to(device), src=0)
        if float(draw[0]) >= self.nested_dropout:
            return None
        return int(draw[1])

    # -- decoding -----------------------------------------------------------------------------

    def get_output_from_indices(
        self,
        indices: Sequence[Tensor] | Tensor,
        full_shape: int | Sequence[int] | None = None,
    ) -> Tensor:
        """Decode per-level indices (a tuple of `(batch, *scale_k)`) or slots; -1 cells give
        zero codes. `full_shape` defaults to the finest scale (levels layout)."""
        if isinstance(indices, Tensor):
            return self.decode_indices(indices)
        if len(indices) != self.num_levels:
            raise ValueError(f"expected {self.num_levels} levels of indices; got {len(indices)}")
        full = (
            self.level_shapes[-1]
            if full_shape is None
            else _level_shape(full_shape, self.spatial_dims)
        )
        return self._decode_levels(list(indices), full)

    def _decode_levels(self, levels: list[Tensor], full: tuple[int, ...]) -> Tensor:
        reconstruction = None
        for level, level_indices in enumerate(levels):
            if level_indices.ndim != self.spatial_dims + 1:
                raise ValueError(
                    f"level {level} indices must be (batch, *scale) with {self.spatial_dims} "
                    f"spatial axes; got {tuple(level_indices.shape)}"
                )
            check_index_range(
                level_indices, self.level_codebook_sizes[level], self, allow_masked=True
            )
            flat = level_indices.flatten(1)
            codes = self.get_vq(level).get_output_from_indices(flat)  # -1 -> zeros
            codes = codes.transpose(1, 2).unflatten(2, tuple(level_indices.shape[1:]))
            upsampled = self._upsample(codes, full, level)
            # a level with no code at all in a sample (dropped, as by nested dropout or a cut
            # prefix) adds nothing; the reference would add phi's bias of a zero map
            present = (flat != MASKED).any(1).to(upsampled.dtype)
            upsampled = upsampled * present.view(-1, *([1] * (upsampled.ndim - 1)))
            reconstruction = upsampled if reconstruction is None else reconstruction + upsampled
        assert reconstruction is not None
        return reconstruction if self.channel_first else _channel_last(reconstruction)

    def decode_indices(self, indices: Sequence[Tensor] | Tensor) -> Tensor:
        """The contract's decode: indices in the layout forward returned -> its eval output."""
        if not isinstance(indices, Tensor):
            return self.get_output_from_indices(indices)
        check_index_range(indices, self.codebook_size, self, allow_masked=True)
        full = tuple(indices.shape[1:-1])
        if len(full) != self.spatial_dims or indices.shape[-1] > self.num_levels:
            raise ValueError(
                f"slots must be (batch, *spatial, <= {self.num_levels} levels) with "
                f"{self.spatial_dims} spatial axes; got {tuple(indices.shape)}"
            )
        levels = self.slots_to_levels(indices, full)
        out = self._decode_levels(levels, full)
        masked = (indices == MASKED).all(-1) if indices.shape[-1] == self.num_levels else None
        if masked is None:
            return out
        axis = 1 if self.channel_first else -1
        return out.masked_fill(masked.unsqueeze(axis), 0.0)

    # -- layouts ------------------------------------------------------------------------------

    def _cells(self, shape: tuple[int, ...], full: tuple[int, ...], device: torch.device) -> Tensor:
        """(prod(full),) flat index of the level cell each full position falls in."""
        cell = torch.zeros((), dtype=torch.long, device=device)
        for s, f in zip(shape, full, strict=True):
            axis = torch.arange(f, device=device) * s // f
            cell = cell.unsqueeze(-1) * s + axis
        return cell.reshape(-1)

    def levels_to_slots(
        self, levels: tuple[Tensor, ...], full: tuple[int, ...], valid: Tensor | None = None
    ) -> Tensor:
        """Per-level indices -> slots (batch, *full, num_levels); -1 at invalid positions."""
        slots = []
        for level_indices in levels:
            cells = self._cells(tuple(level_indices.shape[1:]), full, level_indices.device)
            slots.append(level_indices.flatten(1)[:, cells])
        stacked = torch.stack(slots, -1).unflatten(1, full)
        if valid is not None:
            stacked = stacked.masked_fill(~valid.unsqueeze(-1), MASKED)
        return stacked

    def slots_to_levels(self, slots: Tensor, full: tuple[int, ...]) -> list[Tensor]:
        """Slots (batch, *full, <= num_levels) -> per-level indices; each cell takes the largest
        index over its positions, and missing trailing levels are -1 (dropped)."""
        batch = slots.shape[0]
        flat = slots.reshape(batch, -1, slots.shape[-1])
        levels = []
        for level, shape in enumerate(self._shapes_for(full)):
            cells = self._cells(shape, full, slots.device)
            out = flat.new_full((batch, math.prod(shape)), MASKED)
            if level < flat.shape[-1]:
                index = cells.expand(batch, -1)
                out = out.scatter_reduce(1, index, flat[..., level], "amax", include_self=True)
            levels.append(out.unflatten(1, shape))
        return levels

    @staticmethod
    def levels_to_sequence(levels: Sequence[Tensor]) -> Tensor:
        """Per-level indices -> the next-scale token sequence (batch, sum of cells)."""
        return torch.cat([level.flatten(1) for level in levels], dim=1)

    def sequence_to_levels(self, sequence: Tensor) -> tuple[Tensor, ...]:
        """Inverse of `levels_to_sequence` for this quantizer's scales (levels layout)."""
        sizes = [math.prod(shape) for shape in self.level_shapes]
        if sequence.shape[-1] != sum(sizes):
            raise ValueError(
                f"a next-scale sequence has {sum(sizes)} tokens; got {sequence.shape[-1]}"
            )
        parts = sequence.split(sizes, dim=-1)
        return tuple(
            p.unflatten(-1, shape) for p, shape in zip(parts, self.level_shapes, strict=True)
        )

    def set_communicator(self, communicator) -> None:  # type: ignore[no-untyped-def]
        """Hand the communicator to the level VQs too."""
        super().set_communicator(communicator)
        for module in self.modules():
            if module is not self and hasattr(module, "set_communicator"):
                module.set_communicator(communicator)
