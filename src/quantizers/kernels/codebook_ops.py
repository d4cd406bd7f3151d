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

# A normalised latent counts as a direction when its norm is at least this: l2_normalize(x)
# has norm 1 once |x| >= NORM_EPS and |x| / NORM_EPS below, so this admits |x| > NORM_EPS / 2.
UNIT_ROW_MIN_NORM = 0.5


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
    cluster_size: Tensor, threshold: float, pool: Tensor, usable: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Which codes to replace and by which batch vector, without any host sync.

    cluster_size (C, K); pool (C, M, D): the M vectors available to each codebook, M >= 1;
    usable: optional (C, M) bool, the pool rows that may become codes (default: all).
    A code is dead when its EMA cluster size is below `threshold`. Each codebook's dead codes,
    in index order, take the usable rows of a random permutation of its pool, so no vector
    replaces two codes; with more dead codes than usable vectors the last ones stay as they are.
    Returns `take` (C, K) bool and `vectors` (C, K, D) (meaningful where `take`).
    """
    num_books, num_pool = pool.shape[0], pool.shape[1]
    dead = cluster_size < threshold
    rank = dead.long().cumsum(dim=-1) - 1  # position of each dead code among the dead ones
    if num_books == 1:
        order = torch.randperm(num_pool, device=pool.device).unsqueeze(0)
    else:
        order = torch.rand(num_books, num_pool, device=pool.device).argsort(dim=-1)
    if usable is None:
        available: Tensor | int = num_pool
    else:
        # usable rows first, in their random order: a random permutation of the usable rows
        unusable = (~usable.gather(1, order)).to(torch.uint8)
        order = order.gather(1, unusable.argsort(dim=-1, stable=True))
        available = usable.sum(dim=-1, keepdim=True)
    take = dead & (rank < available)
    rows = order.gather(1, rank.clamp(0, num_pool - 1))
    vectors = pool.gather(1, rows.unsqueeze(-1).expand(-1, -1, pool.shape[-1]))
    return take, vectors


def refill_candidates(pool: Tensor, use_cosine_sim: bool) -> Tensor | None:
    """(C, M) bool: the rows of a (C, M, D) pool that may replace a dead code (None: all).

    Cosine pools hold l2-normalised latents, so a (near-)zero latent appears as a row of norm
    below one (exactly zero for a zero latent); it has no direction and would make a code that
    is not unit-norm, so only rows of norm about one qualify. In Euclidean mode every vector,
    the origin included, is a point a code may sit on, so all rows qualify.
    """
    if not use_cosine_sim:
        return None
    return torch.linalg.vector_norm(pool, dim=-1) > UNIT_ROW_MIN_NORM


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
