"""Multi-scale codes: the per-position code slots of a hierarchical tokenizer <-> codes per scale.

A multi-scale tokenizer (``quantizer=hierarchical_vq``) gives through the codes API one code per
level at every grid position, ``(B, *grid, Q)`` with ``Q`` levels: slot ``k`` of a position holds
the code of the level-``k`` cell the position falls in. ``scales`` says which cells those are:
one entry per level, either ``[n]`` (``n`` cells along the positions in raster order, as the
tokenizers hand their latent map to the quantizer as a sequence) or one size per grid axis. A
position ``i`` along an axis of length ``f`` cut into ``s`` cells lies in cell ``floor(i*s/f)``
(HierarchicalVQ's ``indices_layout="slots"``). Every position of a cell holds the same code, so
the codes of level ``k`` are one code per cell, ``(B, *scale_k)``: what a next-scale (VAR) prior
predicts, coarse level first.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["cell_map", "check_scales", "codes_to_scales", "scales_to_codes"]

Scales = Sequence[Sequence[int]]


def check_scales(
    scales: Scales, grid: Sequence[int], num_slots: int
) -> tuple[tuple[int, ...], ...]:
    """The scales as tuples; ValueError unless there is one per slot, each ``[n]`` with
    ``1 <= n <= prod(grid)`` or one size per grid axis within it."""
    grid = tuple(int(g) for g in grid)
    shapes = tuple(tuple(int(s) for s in scale) for scale in scales)
    if len(shapes) != num_slots:
        raise ValueError(
            f"{len(shapes)} scales for {num_slots} code slots: a multi-scale tokenizer has one "
            "scale per level (slot)"
        )
    positions = math.prod(grid)
    for level, shape in enumerate(shapes):
        bounds = (positions,) if len(shape) == 1 else grid
        fits = len(shape) == len(bounds) and all(
            1 <= s <= f for s, f in zip(shape, bounds, strict=True)
        )
        if not fits:
            raise ValueError(
                f"scale {list(shape)} of level {level} must be [n] with 1 <= n <= {positions} "
                f"(cells along the raster order) or one size per axis of the grid {list(grid)}, "
                "each at most the axis"
            )
    return shapes


def cell_map(
    scale: Sequence[int], grid: Sequence[int], device: torch.device | None = None
) -> Tensor:
    """``(prod(grid),)`` long: the flat (raster) index of the cell of ``scale`` each position of
    ``grid`` (in raster order) falls in."""
    axes = (math.prod(grid),) if len(scale) == 1 else tuple(grid)
    cell = torch.zeros((), dtype=torch.long, device=device)
    for s, f in zip(scale, axes, strict=True):
        cell = cell.unsqueeze(-1) * s + torch.arange(f, device=device) * s // f
    return cell.reshape(-1)


def _first_positions(cells: Tensor, num_cells: int) -> Tensor:
    """The first position (raster order) of every cell."""
    positions = torch.arange(cells.numel(), device=cells.device)
    first = torch.full((num_cells,), cells.numel(), dtype=torch.long, device=cells.device)
    return first.scatter_reduce(0, cells, positions, "amin")


def codes_to_scales(codes: Tensor, scales: Scales) -> tuple[Tensor, ...]:
    """Codes ``(B, *grid, Q)`` -> per level ``(B, *scale_k)`` (one code per cell); ValueError
    when the positions of a cell hold different codes (not codes of these scales)."""
    grid = tuple(codes.shape[1:-1])
    shapes = check_scales(scales, grid, codes.shape[-1])
    flat = codes.reshape(codes.shape[0], -1, codes.shape[-1])
    levels = []
    for level, shape in enumerate(shapes):
        cells = cell_map(shape, grid, codes.device)
        values = flat[:, _first_positions(cells, math.prod(shape)), level]
        if not torch.equal(values[:, cells], flat[..., level]):
            raise ValueError(
                f"codes of level {level} differ within a cell of its scale {list(shape)}: these "
                "are not the codes of a multi-scale tokenizer with these scales (code_scales of "
                "another tokenizer, or codes not made by encode_codes)"
            )
        levels.append(values.reshape(codes.shape[0], *shape))
    return tuple(levels)


def scales_to_codes(levels: Sequence[Tensor], scales: Scales, grid: Sequence[int]) -> Tensor:
    """Per level ``(B, *scale_k)`` -> codes ``(B, *grid, Q)``: every position takes its cell's
    code in each slot (the inverse of :func:`codes_to_scales`)."""
    grid = tuple(int(g) for g in grid)
    shapes = check_scales(scales, grid, len(levels))
    slots = []
    for level, (values, shape) in enumerate(zip(levels, shapes, strict=True)):
        if tuple(values.shape[1:]) != shape:
            raise ValueError(
                f"level {level} codes must be (batch, {', '.join(map(str, shape))}), got "
                f"{tuple(values.shape)}"
            )
        slots.append(values.reshape(values.shape[0], -1)[:, cell_map(shape, grid, values.device)])
    return torch.stack(slots, -1).reshape(levels[0].shape[0], *grid, len(levels))
