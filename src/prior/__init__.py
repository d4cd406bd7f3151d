"""Stage 2: what a prior on a tokenizer's codes needs besides the model itself: sequence
layouts of code grids, and the class-conditional bigram baseline."""

from __future__ import annotations

from collections.abc import Sequence

from src.prior.bigram import ClassBigram
from src.prior.code_factors import CodeFactors, check_codes
from src.prior.layouts import CodeLayout, FlattenLayout
from src.prior.stream_layouts import DelayLayout, FactorizedLayout, StreamLayout

__all__ = [
    "LAYOUTS",
    "ClassBigram",
    "CodeFactors",
    "CodeLayout",
    "DelayLayout",
    "FactorizedLayout",
    "FlattenLayout",
    "StreamLayout",
    "check_codes",
    "make_layout",
]

LAYOUTS: dict[str, type[CodeLayout]] = {
    "flatten": FlattenLayout,
    "delay": DelayLayout,
    "factorized": FactorizedLayout,
}


def make_layout(
    name: str,
    codebook_sizes: Sequence[int],
    grid: Sequence[int],
    num_classes: int = 0,
    max_factor_bits: int | None = None,
) -> CodeLayout:
    """Build the layout ``name`` (``flatten``, ``delay`` or ``factorized``) for codes of the
    given slot sizes and grid; ``max_factor_bits=None`` keeps each layout's default (no split
    for flatten / delay, 9-bit groups for factorized)."""
    if name not in LAYOUTS:
        raise ValueError(f"unknown layout {name!r}: choose one of {sorted(LAYOUTS)}")
    if max_factor_bits is None:
        return LAYOUTS[name](codebook_sizes, grid, num_classes)
    return LAYOUTS[name](codebook_sizes, grid, num_classes, max_factor_bits)
