"""``next_scale``: the VAR-style sequence of a multi-scale tokenizer's codes (one stream).

The prefix (class or null token), then the codes of level 0 (the coarsest scale) cell by cell in
raster order, then level 1's, ... the finest level last: ``L = 1 + sum_k prod(scale_k)``. Level
``k``'s codes are offset by the codebook sizes of the levels before it (one joint vocabulary, as
in ``flatten``), so the levels have their own embeddings even with one shared codebook.

The codes come and go as the codes API has them, ``(B, *grid, Q)`` with slot ``k`` the level-``k``
code of each position (src/prior/scales.py); ``decode`` puts every generated cell's code on all
positions of the cell, so a sample decodes with ``tokenizer.decode_codes`` like encoded codes.
Compared with ``flatten`` over those slots (``P * Q`` codes, a coarse cell's code repeated at
each of its positions) the sequence holds every code once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from src.prior.layouts import CodeLayout
from src.prior.scales import check_scales, codes_to_scales, scales_to_codes

__all__ = ["NextScaleLayout"]


class NextScaleLayout(CodeLayout):
    """Coarse-to-fine token sequence of per-level codes (see the module docstring).

    Args:
        codebook_sizes: codes per level (slot), coarse to fine.
        grid: the code grid of the codes API, ``(h, w)`` or ``(frames,)``.
        num_classes: class tokens for labels; 0 = unconditional.
        max_factor_bits: must be None (the levels' codebooks are not split).
        scales: cells of each level, ``[n]`` along the raster order or one size per grid axis
            (a tokenizer's ``code_scales(grid)``, recorded in its code cache).
    """

    name = "next_scale"
    multi_stream = False

    def __init__(
        self,
        codebook_sizes: Sequence[int],
        grid: Sequence[int],
        num_classes: int = 0,
        max_factor_bits: int | None = None,
        scales: Sequence[Sequence[int]] | None = None,
    ) -> None:
        if max_factor_bits is not None:
            raise ValueError(
                "the next_scale layout does not split codebooks (max_factor_bits must be null); "
                "use layout=factorized for huge codebooks"
            )
        if scales is None:
            raise ValueError(
                "the next_scale layout needs the tokenizer's scales (code_scales): train the "
                "prior on the codes of a multi-scale tokenizer (quantizer=hierarchical_vq), "
                "whose code cache records them (a cache written before they were recorded: "
                "delete its directory to tokenize again), or pass model.code_scales"
            )
        super().__init__(codebook_sizes, grid, num_classes, None)
        self.scales = check_scales(scales, self.grid, len(self.codebook_sizes))
        sizes = self.codebook_sizes
        self.level_offsets = tuple(sum(sizes[:k]) for k in range(len(sizes)))
        self.level_cells = tuple(math.prod(shape) for shape in self.scales)
        # level of every code step 1 .. L-1
        self._level_of = torch.repeat_interleave(
            torch.arange(len(sizes)), torch.tensor(self.level_cells)
        )

    @property
    def code_vocab_size(self) -> int:
        return sum(self.codebook_sizes)

    @property
    def seq_len(self) -> int:
        return 1 + sum(self.level_cells)

    def level_of_step(self, step: int) -> int:
        """The level whose code the token at ``step >= 1`` holds."""
        if not 1 <= step < self.seq_len:
            raise ValueError(f"code steps of this layout are 1 .. {self.seq_len - 1}, got {step}")
        return int(self._level_of[step - 1])

    def allowed_slices(self, step: int) -> tuple[slice, ...]:
        if step == 0:
            return (self._prefix_slice(),)
        level = self.level_of_step(step)
        start = self.level_offsets[level]
        return (slice(start, start + self.codebook_sizes[level]),)

    def target_mask(self) -> Tensor:
        return torch.ones(self.seq_len - 1, dtype=torch.bool)

    def _encode_factors(self, factors: Tensor, prefix: Tensor) -> Tensor:
        codes = factors.reshape(factors.shape[0], *self.grid, factors.shape[-1])
        levels = codes_to_scales(codes, self.scales)
        body = [
            level.reshape(level.shape[0], -1) + offset
            for level, offset in zip(levels, self.level_offsets, strict=True)
        ]
        return torch.cat([prefix.unsqueeze(1), *body], dim=1)

    def _decode_factors(self, tokens: Tensor) -> Tensor:
        parts = tokens[:, 1:].split(self.level_cells, dim=1)
        levels = [
            (part - offset).reshape(tokens.shape[0], *shape)
            for part, offset, shape in zip(parts, self.level_offsets, self.scales, strict=True)
        ]
        codes = scales_to_codes(levels, self.scales, self.grid)
        return codes.reshape(tokens.shape[0], self.num_positions, -1)
