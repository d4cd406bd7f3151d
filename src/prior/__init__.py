"""Stage 2: what a prior on a tokenizer's codes needs besides the model itself: sequence
layouts of code grids (``next_scale`` for multi-scale tokenizers), the codes per scale, and the
class-conditional bigram baseline."""

from __future__ import annotations

from collections.abc import Sequence

from src.prior.bigram import ClassBigram
from src.prior.code_factors import CodeFactors, check_codes
from src.prior.layouts import CodeLayout, FlattenLayout
from src.prior.next_scale_layout import NextScaleLayout
from src.prior.scales import codes_to_scales, scales_to_codes
from src.prior.stream_layouts import DelayLayout, FactorizedLayout, StreamLayout

__all__ = [
    "LAYOUTS",
    "ClassBigram",
    "CodeFactors",
    "CodeLayout",
    "DelayLayout",
    "FactorizedLayout",
    "FlattenLayout",
    "NextScaleLayout",
    "StreamLayout",
    "check_codes",
    "codes_to_scales",
    "make_layout",
    "scales_to_codes",
]

LAYOUTS: dict[str, type[CodeLayout]] = {
    "flatten": FlattenLayout,
    "delay": DelayLayout,
    "factorized": FactorizedLayout,
    "next_scale": NextScaleLayout,
}


def make_layout(
    name: str,
    codebook_sizes: Sequence[int],
    grid: Sequence[int],
    num_classes: int = 0,
    max_factor_bits: int | None = None,
    scales: Sequence[Sequence[int]] | None = None,
) -> CodeLayout:
    """Build the layout ``name`` (``flatten``, ``delay``, ``factorized`` or ``next_scale``) for
    codes of the given slot sizes and grid; ``max_factor_bits=None`` keeps each layout's default
    (no split for flatten / delay, 9-bit groups for factorized). ``scales`` (a multi-scale
    tokenizer's ``code_scales``) is read by ``next_scale`` only, which needs it."""
    if name not in LAYOUTS:
        raise ValueError(f"unknown layout {name!r}: choose one of {sorted(LAYOUTS)}")
    if name == "next_scale":
        return NextScaleLayout(codebook_sizes, grid, num_classes, max_factor_bits, scales)
    if max_factor_bits is None:
        return LAYOUTS[name](codebook_sizes, grid, num_classes)
    return LAYOUTS[name](codebook_sizes, grid, num_classes, max_factor_bits)
