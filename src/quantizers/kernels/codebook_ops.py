"""Codebook-state arithmetic of the vector quantizers, on stacks of C codebooks of K codes.

Pure tensor functions (no module state, no collectives), all float32: the EMA step with
Laplace-smoothed cluster sizes, the choice of batch vectors that replace dead codes, the
orthogonal regulariser and a masked mean squared error. None of them syncs with the host.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from src.quantizers.kernels.nearest import l2_normalize


def masked_mse(a: Tensor, b: Tensor, valid: Tensor | None) -> Tensor:
    """Mean of (a - b)² over the rows of (N, ...) tensors where `valid` (N,) is True."""
    if valid is None:
        return F.mse_loss(a, b)
    sq = (a - b).pow(2)
    sq = sq.reshape(sq.shape[0], -1)
    sq = torch.where(valid.unsqueeze(-1), sq, 0.0)
    return sq.sum() / (valid.sum().clamp_min(1) * sq.shape[-1])


def smoothed_codebook(cluster_size: Tensor, embed_avg: Tensor, embed: Tensor, eps: float) -> Tensor:
    """Codebook from EMA statistics: embed_avg / Laplace-smoothed cluster size, per codebook.

    cluster_size (C, K), embed_avg and embed (C, K, D). Smoothing,
    (n_k + eps) / (n + K·eps) · n with n the codebook's total count, keeps every size positive
    once anything was counted; a codebook whose total is still zero keeps `embed`.
    """
    total = cluster_size.sum(dim=-1, keepdim=True)
    smoothed = (cluster_size + eps) / (total + cluster_size.shape[-1] * eps) * total
    safe = smoothed.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1)
    return torch.where((smoothed > 0).unsqueeze(-1), embed_avg / safe, embed)


def dead_code_replacements(
    cluster_size: Tensor, threshold: float, pool: Tensor
) -> tuple[Tensor, Tensor]:
    """Which codes to replace and by which batch vector, without any host sync.

    cluster_size (C, K); pool (C, M, D): the M vectors available to each codebook, M >= 1.
    A code is dead when its EMA cluster size is below `threshold`. Each codebook's dead codes,
    in index order, take the rows of a random permutation of its pool, so no vector replaces
    two codes; with more dead codes than vectors the last ones stay as they are.
    Returns `take` (C, K) bool and `vectors` (C, K, D) (meaningful where `take`).
    """
    num_books, num_pool = pool.shape[0], pool.shape[1]
    dead = cluster_size < threshold
    rank = dead.long().cumsum(dim=-1) - 1  # position of each dead code among the dead ones
    take = dead & (rank < num_pool)
    if num_books == 1:
        order = torch.randperm(num_pool, device=pool.device).unsqueeze(0)
    else:
        order = torch.rand(num_books, num_pool, device=pool.device).argsort(dim=-1)
    rows = order.gather(1, rank.clamp(0, num_pool - 1))
    vectors = pool.gather(1, rows.unsqueeze(-1).expand(-1, -1, pool.shape[-1]))
    return take, vectors


def orthogonal_loss(codes: Tensor) -> Tensor:
    """Orthogonal regulariser of Shin et al. 2021 (arXiv 2112.00384, eq. 2) for one codebook.

    codes (n, D): |ĈĈᵀ - I|²_F / n² with Ĉ the l2-normalised rows, i.e. the mean squared
    cosine similarity between distinct codes pushed to zero (and unit diagonal kept).
    """
    normed = l2_normalize(codes.float())
    n = normed.shape[0]
    gram = normed @ normed.t()
    eye = torch.eye(n, device=gram.device, dtype=gram.dtype)
    return (gram - eye).pow(2).sum() / max(n, 1) ** 2
