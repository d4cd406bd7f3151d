"""Nearest-code search, always in float32 so bf16/fp16 autocast cannot flip an argmin."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

NORM_EPS = 1e-6  # floor on vector norms: zero vectors normalise to zero, not NaN

# Upper bound on the (rows x codes) distance block held at once (2**28 floats = 1 GiB).
MAX_BLOCK_ELEMENTS = 2**28


def l2_normalize(x: Tensor, dim: int = -1) -> Tensor:
    """Unit vectors along `dim`; an all-zero vector stays zero instead of becoming NaN."""
    return F.normalize(x, p=2.0, dim=dim, eps=NORM_EPS)


def _nearest_block(x: Tensor, codebook: Tensor, code_sq: Tensor | None) -> Tensor:
    if code_sq is None:  # cosine similarity: inputs and codes are unit vectors
        return (x @ codebook.t()).argmax(dim=-1)
    # ||x||^2 - 2 x.c + ||c||^2 with a single matmul; ||x||^2 does not change the argmin but
    # keeps the values true squared distances, which is cheap and easier to reason about.
    dist = torch.addmm(code_sq.unsqueeze(0), x, codebook.t(), beta=1.0, alpha=-2.0)
    dist = dist + x.pow(2).sum(dim=-1, keepdim=True)
    return dist.argmin(dim=-1)


def nearest_code(
    x: Tensor,
    codebook: Tensor,
    use_cosine_sim: bool = False,
    max_block_elements: int = MAX_BLOCK_ELEMENTS,
) -> Tensor:
    """Index of the closest codebook row for every row of `x`.

    x: (N, D), codebook: (K, D). Euclidean distance by default; with `use_cosine_sim` both are
    l2-normalised and the largest dot product wins. Computed in float32 with autocast off.
    Rows are processed in blocks so the (N, K) distance matrix never exceeds
    `max_block_elements`, which keeps K = 65536 codebooks within memory.
    Returns int64 indices of shape (N,).
    """
    with torch.autocast(device_type=x.device.type, enabled=False):
        x = x.float()
        codebook = codebook.float()
        if use_cosine_sim:
            x, codebook, code_sq = l2_normalize(x), l2_normalize(codebook), None
        else:
            code_sq = codebook.pow(2).sum(dim=-1)
        rows = max(1, max_block_elements // max(1, codebook.shape[0]))
        if x.shape[0] <= rows:
            return _nearest_block(x, codebook, code_sq)
        return torch.cat([_nearest_block(b, codebook, code_sq) for b in x.split(rows)])
