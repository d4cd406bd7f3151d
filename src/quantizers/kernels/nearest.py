"""Nearest-code search, always in float32 so bf16/fp16 autocast cannot flip an argmin.

The search maximises the score 2·x·c - |c|² (the negative squared distance up to the per-row
constant |x|², which changes neither the argmax nor a softmax over codes). Rows go through in
blocks small enough that each (rows, K) score block stays in cache while `max` scans it, one
`addmm` per block and no (N, K) matrix kept: the search is never part of the autograd graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

NORM_EPS = 1e-6  # floor on vector norms: zero vectors normalise to zero, not NaN

# Upper bound on the (rows x codes) score block held at once (2**28 floats = 1 GiB).
MAX_BLOCK_ELEMENTS = 2**28
# Preferred block: about 1 MiB of scores, which fits in L2 so `max` reads it from cache;
# never fewer rows than MIN_BLOCK_ROWS, where the matmul would lose efficiency.
CACHE_BLOCK_ELEMENTS = 2**18
MIN_BLOCK_ROWS = 64


def l2_normalize(x: Tensor, dim: int = -1) -> Tensor:
    """Unit vectors along `dim`; an all-zero vector stays zero instead of becoming NaN."""
    return F.normalize(x, p=2.0, dim=dim, eps=NORM_EPS)


def code_scores_bias(codebook: Tensor, use_cosine_sim: bool) -> Tensor | None:
    """The per-code term of the score: -|c|² (K,) (Euclidean), None (cosine: unit rows)."""
    if use_cosine_sim:
        return None
    return -codebook.pow(2).sum(dim=-1)


# Codes per chunk of the two-level argmax: a chunk's maximum is one vectorised `amax`; the
# index search then touches only the winning chunk of each row.
ARGMAX_CHUNK = 64


def row_argmax(scores: Tensor) -> Tensor:
    """First index of each row's maximum of a (rows, K) float tensor, as `argmax(dim=-1)`.

    On CPU a value-and-index reduction runs at a fraction of the speed of `amax`, so rows
    are cut into chunks of ARGMAX_CHUNK codes: `amax` finds each chunk's maximum, the first
    chunk holding the row maximum is picked, and only its codes are searched for the index.
    """
    rows, num_codes = scores.shape
    if num_codes < 4 * ARGMAX_CHUNK or num_codes % ARGMAX_CHUNK:
        return scores.argmax(dim=-1)
    chunk_max = scores.view(rows, num_codes // ARGMAX_CHUNK, ARGMAX_CHUNK).amax(dim=-1)
    chunk = chunk_max.argmax(dim=-1, keepdim=True)
    offsets = chunk * ARGMAX_CHUNK
    columns = offsets + torch.arange(ARGMAX_CHUNK, device=scores.device)
    return (offsets + scores.gather(1, columns).argmax(dim=-1, keepdim=True)).squeeze(-1)


def _block_argmax(x: Tensor, codebook_t: Tensor, bias: Tensor | None, temperature: float) -> Tensor:
    if bias is None:  # cosine: unit rows, the score is 2·x·c
        scores = torch.mm(x, codebook_t).mul_(2.0) if temperature > 0 else torch.mm(x, codebook_t)
    else:
        scores = torch.addmm(bias, x, codebook_t, beta=1.0, alpha=2.0)
    if temperature > 0:
        # Gumbel-max: argmax(s/T + G) with G = -log(E), E ~ Exp(1), samples softmax(s/T) and
        # s/T = -|x - c|²/T + const, i.e. softmax(-distance / T) as documented.
        noise = torch.empty_like(scores).exponential_().log_()
        scores = (scores / temperature).sub_(noise)
    return row_argmax(scores)


def nearest_code(
    x: Tensor,
    codebook: Tensor,
    use_cosine_sim: bool = False,
    max_block_elements: int = MAX_BLOCK_ELEMENTS,
    temperature: float = 0.0,
    bias: Tensor | None = None,
    normalized: bool = False,
) -> Tensor:
    """Index of the closest codebook row for every row of `x` (or a sample, with temperature).

    x: (N, D), codebook: (K, D). Euclidean distance by default; with `use_cosine_sim` both are
    l2-normalised and the largest dot product wins. With `temperature > 0` the index is drawn
    from softmax(-|x - c|² / temperature) (cosine: |x - c|² = 2 - 2 x·c on unit vectors) by
    the Gumbel-max trick, in float32. `bias` may pass a precomputed `code_scores_bias`;
    `normalized=True` says cosine inputs are unit rows already (saves normalising them again).
    Computed in float32 with autocast off and without autograd. Returns int64 (N,).
    """
    with torch.no_grad(), torch.autocast(device_type=x.device.type, enabled=False):
        x = x.detach().float()
        codebook = codebook.detach().float()
        if use_cosine_sim:
            if not normalized:
                x, codebook = l2_normalize(x), l2_normalize(codebook)
            bias = None
        elif bias is None:
            bias = code_scores_bias(codebook, use_cosine_sim)
        num_codes = max(1, codebook.shape[0])
        limit = max(1, max_block_elements // num_codes)
        rows = min(limit, max(MIN_BLOCK_ROWS, CACHE_BLOCK_ELEMENTS // num_codes))
        codebook_t = codebook.t()
        if x.shape[0] <= rows or torch.compiler.is_compiling():
            return _block_argmax(x, codebook_t, bias, temperature)
        out = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
        for start in range(0, x.shape[0], rows):
            block = x[start : start + rows]
            out[start : start + block.shape[0]] = _block_argmax(
                block, codebook_t, bias, temperature
            )
        return out


def unit_rows_and_scale(x: Tensor) -> tuple[Tensor, Tensor]:
    """x / |x| along the last dim and the norm it divided by (floored at NORM_EPS, so zero
    rows stay zero), without autograd: the pieces a fused backward needs."""
    with torch.no_grad():
        scale = torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min_(NORM_EPS)
        return x / scale, scale


class _UnitRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        y, scale = unit_rows_and_scale(x)
        ctx.save_for_backward(y, scale, scale > NORM_EPS)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        y, scale, moving = ctx.saved_tensors
        radial = torch.einsum("...d,...d->...", y, grad).unsqueeze(-1) * moving
        return torch.addcmul(grad, y, radial, value=-1.0) / scale


def unit_rows(x: Tensor) -> Tensor:
    """`l2_normalize(x)` along the last dim with a closed-form backward, (g - y(y·g)) / |x|
    (g / eps below the norm floor): three passes over the rows instead of autograd's eight."""
    return _UnitRows.apply(x)
