"""Entropies of binary (lookup-free) codebooks without materialising the 2^d codes.

With distance logits `2 * inv_temperature * <x, c>` over codes `c` in `{-s, +s}^d`, the
softmax over all 2^d codes factorises into independent per-bit Bernoullis with logits
`u_i = 4 * inv_temperature * s * x_i` (the sign of bit i is `+` with probability sigmoid(u_i)).

- Per-sample entropy is exact: the sum of the per-bit binary entropies.
- Batch (codebook-average) entropy H(mean_n p_n) does not factorise. Up to `max_exact_bits`
  bits it is exact: the bits are split into a high and a low half, each token's code
  probability is `a_n(hi) * b_n(lo)`, so the mean over tokens is the matrix `A^T B / N` of
  shape (2^{d/2}, 2^{d/2}); memory is tokens x 2^{d/2}, never tokens x 2^d.
- Beyond `max_exact_bits` the bits are cut into groups of at most `max_exact_bits` bits and
  the groups are treated as independent: H ~= sum over groups of the exact batch entropy of
  each group's marginal. By subadditivity of entropy this is an UPPER BOUND on the exact
  value (equal when the groups are independent under the batch-average distribution).

Code probabilities are indexed most-significant bit first (bit 0 of the features is the
highest bit of the index), as LFQ numbers its codes.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

MAX_EXACT_BITS = 16  # exact batch entropy up to 2^16 codes (a 256 x 256 average matrix)

SumReducer = Callable[[Tensor], Tensor]


def bit_logits(x: Tensor, inv_temperature: float, code_scale: float) -> Tensor:
    """Per-bit Bernoulli logits of the softmax over codes `{-code_scale, +code_scale}^d`."""
    return x * (4.0 * inv_temperature * code_scale)


def binary_entropy_from_logits(logits: Tensor) -> Tensor:
    """Elementwise entropy (nats) of Bernoulli(sigmoid(logits)), stable for large |logits|."""
    p = torch.sigmoid(logits)
    # -log p = softplus(-u), -log(1 - p) = softplus(u)
    return p * F.softplus(-logits) + (1 - p) * F.softplus(logits)


def per_sample_entropy(logits: Tensor) -> Tensor:
    """Entropy of each token's distribution over the 2^d codes: (..., d) -> (...)."""
    return binary_entropy_from_logits(logits).sum(dim=-1)


def _code_bits(num_bits: int, like: Tensor) -> Tensor:
    """(2^k, k) matrix of the bits of every code index, MSB first, as floats like `like`."""
    index = torch.arange(2**num_bits, device=like.device).unsqueeze(-1)
    weights = 2 ** torch.arange(num_bits - 1, -1, -1, device=like.device)
    return ((index & weights) != 0).to(like.dtype)


def code_probability_table(logits: Tensor) -> Tensor:
    """Probabilities of all 2^k codes of k bits: (..., k) -> (..., 2^k), MSB first.

    log p(code) = sum_t [bit_t * u_t + logsigmoid(-u_t)]: one (k x 2^k) matmul, then exp.
    """
    bits = _code_bits(logits.shape[-1], logits)
    log_table = logits @ bits.t() + F.logsigmoid(-logits).sum(dim=-1, keepdim=True)
    return log_table.exp()


def code_probability_sums(logits: Tensor) -> Tensor:
    """Sum over tokens of the code distribution, as a (hi, lo) matrix.

    logits: (..., N, k) per-bit logits of N tokens. Returns (..., 2^{ceil(k/2)}, 2^{floor(k/2)})
    whose flattened row-major form is the summed probability of every code, MSB first.
    """
    hi_bits = (logits.shape[-1] + 1) // 2
    a = code_probability_table(logits[..., :hi_bits])
    b = code_probability_table(logits[..., hi_bits:])
    return a.transpose(-1, -2) @ b


def entropy_of_sums(sums: Tensor, total: Tensor | float) -> Tensor:
    """Entropy (nats) of the distribution `sums / total`, over every dim but the leading ones.

    sums: (..., r, c). The log is floored at the dtype's smallest normal number so that codes
    of probability 0 contribute 0 to the value and a finite gradient.
    """
    probs = sums / total
    tiny = torch.finfo(probs.dtype).tiny
    return -(probs * probs.clamp_min(tiny).log()).sum(dim=(-2, -1))


def bit_groups(num_bits: int, max_group_bits: int) -> list[tuple[int, int]]:
    """Split `num_bits` into the fewest near-equal contiguous groups of <= max_group_bits."""
    count = max(1, math.ceil(num_bits / max_group_bits))
    base, extra = divmod(num_bits, count)
    groups, start = [], 0
    for g in range(count):
        size = base + (1 if g < extra else 0)
        groups.append((start, start + size))
        start += size
    return groups


def batch_entropy(
    logits: Tensor,
    max_exact_bits: int = MAX_EXACT_BITS,
    reduce_sum: SumReducer | None = None,
) -> Tensor:
    """Entropy of the token-average code distribution, exact up to `max_exact_bits` bits.

    logits: (..., N, d) per-bit logits of N tokens (leading dims, e.g. codebooks, are kept).
    With more than `max_exact_bits` bits, returns the grouped upper bound described in the
    module docstring. `reduce_sum`, if given, sums a tensor over ranks differentiably
    (see `src/quantizers/collectives.py`); it receives the summed probabilities and the
    token count, so the entropy is that of the global average.
    """
    total = logits.new_tensor(float(logits.shape[-2]))
    if reduce_sum is not None:
        total = reduce_sum(total.detach())
    entropy = logits.new_zeros(logits.shape[:-2])
    for start, stop in bit_groups(logits.shape[-1], max_exact_bits):
        sums = code_probability_sums(logits[..., start:stop])
        if reduce_sum is not None:
            sums = reduce_sum(sums)
        entropy = entropy + entropy_of_sums(sums, total)
    return entropy
