"""Split each code of a huge codebook into bit-group factors and join them back, exactly.

A lookup-free quantizer with 2^18 codes would need a 2^18-way softmax per token. Open-MAGVIT2
instead predicts the code's bits in groups ("asymmetric token factorization"): the code
``k = sum_f d_f * 2^shift_f`` becomes the digits ``d_f``, each from a small vocabulary. This
module is that change of variables and nothing else; the layouts decide where the digits go in
the sequence (one after the other, or as parallel streams with separate heads).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["CodeFactors", "check_codes"]


def check_codes(codes: Tensor, codebook_sizes: Sequence[int]) -> None:
    """Raise a ``ValueError`` naming the slot and the range unless ``codes`` is a long tensor
    ``(..., Q)`` with every code of slot ``q`` in ``[0, codebook_sizes[q])``."""
    if codes.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ValueError(f"codes must be an integer tensor, got dtype {codes.dtype}")
    if codes.dim() < 1 or codes.shape[-1] != len(codebook_sizes):
        raise ValueError(
            f"codes must end in the slot axis Q={len(codebook_sizes)} (one code per codebook "
            f"slot, sizes {list(codebook_sizes)}), got shape {tuple(codes.shape)}"
        )
    if codes.numel() == 0:
        return
    flat = codes.reshape(-1, len(codebook_sizes)).long()
    low, high = flat.min(dim=0).values, flat.max(dim=0).values
    for q, size in enumerate(codebook_sizes):
        if low[q] < 0 or high[q] >= size:
            raise ValueError(
                f"codes of slot {q} must lie in [0, {size}) (its codebook size), found values in "
                f"[{int(low[q])}, {int(high[q])}]: were these codes made by another tokenizer?"
            )


def _bit_groups(bits: int, max_bits: int) -> list[int]:
    """Split ``bits`` into the fewest groups of at most ``max_bits``, as even as possible
    (18 bits at most 9 -> [9, 9]; 14 -> [7, 7]; 32 at most 9 -> [8, 8, 8, 8])."""
    num = -(-bits // max_bits)
    base, extra = divmod(bits, num)
    return [base + 1] * extra + [base] * (num - extra)


class CodeFactors:
    """Mixed-radix split of the ``Q`` code slots into ``S`` factor slots (most significant first).

    A slot whose codebook has at most ``2**max_factor_bits`` codes stays one factor (any size).
    A larger one must have a power-of-two size (LFQ / BSQ: every bit pattern is a valid code, so
    independently predicted factors always join into a valid code); it is split into bit groups.
    ``max_factor_bits=None`` keeps every slot whole.
    """

    def __init__(self, codebook_sizes: Sequence[int], max_factor_bits: int | None = None) -> None:
        sizes = [int(s) for s in codebook_sizes]
        if not sizes or min(sizes) < 1:
            raise ValueError(f"codebook_sizes must be a non-empty list of sizes >= 1: {sizes}")
        if max_factor_bits is not None and max_factor_bits < 1:
            raise ValueError(f"max_factor_bits must be >= 1 or None, got {max_factor_bits}")
        self.codebook_sizes = tuple(sizes)
        factor_sizes: list[int] = []
        slot_of_factor: list[int] = []
        shifts: list[int] = []
        for q, size in enumerate(sizes):
            if max_factor_bits is None or size <= 2**max_factor_bits:
                groups, radices = [0], [size]
            else:
                bits = size.bit_length() - 1
                if size != 1 << bits:
                    raise ValueError(
                        f"slot {q} has {size} codes, more than 2**max_factor_bits="
                        f"{2**max_factor_bits}, and is not a power of two, so it cannot be split "
                        "into bit groups: use a larger max_factor_bits or the flatten layout "
                        "without factors"
                    )
                groups = _bit_groups(bits, max_factor_bits)
                radices = [1 << g for g in groups]
            # most significant group first: its shift is the bits of the groups after it
            for f, radix in enumerate(radices):
                shifts.append(sum(groups[f + 1 :]))
                factor_sizes.append(radix)
                slot_of_factor.append(q)
        self.factor_sizes = tuple(factor_sizes)
        self.slot_of_factor = tuple(slot_of_factor)
        self._shifts = tuple(shifts)

    @property
    def num_slots(self) -> int:
        """``Q``, the code slots per position."""
        return len(self.codebook_sizes)

    @property
    def num_factors(self) -> int:
        """``S``, the factor slots per position (``Q`` when nothing is split)."""
        return len(self.factor_sizes)

    @property
    def is_identity(self) -> bool:
        """True when no slot is split (factors are the codes themselves)."""
        return self.num_factors == self.num_slots

    def split(self, codes: Tensor) -> Tensor:
        """``(..., Q)`` codes -> ``(..., S)`` factors; checks the codes' range first."""
        check_codes(codes, self.codebook_sizes)
        codes = codes.long()
        if self.is_identity:
            return codes
        columns = [
            (codes[..., q] >> shift) % radix  # a whole slot's radix need not be 2^b
            for q, shift, radix in zip(
                self.slot_of_factor, self._shifts, self.factor_sizes, strict=True
            )
        ]
        return torch.stack(columns, dim=-1)

    def merge(self, factors: Tensor) -> Tensor:
        """``(..., S)`` factors -> ``(..., Q)`` codes; checks each factor's range first."""
        check_codes(factors, self.factor_sizes)
        factors = factors.long()
        if self.is_identity:
            return factors
        codes = factors.new_zeros((*factors.shape[:-1], self.num_slots))
        for f, (q, shift) in enumerate(zip(self.slot_of_factor, self._shifts, strict=True)):
            codes[..., q] += factors[..., f] << shift
        return codes
