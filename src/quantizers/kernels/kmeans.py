"""Per-code statistics and k-means, in float32, used for EMA updates and codebook init."""

from __future__ import annotations

import torch
from torch import Tensor

from src.quantizers.kernels.nearest import l2_normalize, nearest_code


def cluster_statistics(
    x: Tensor, indices: Tensor, num_codes: int, weights: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Per-code count and vector sum of the rows of `x` assigned by `indices`.

    x: (N, D); indices: (N,) int64 in [0, num_codes); weights: optional (N,) per-row weights
    (0 drops a row, e.g. a masked one). Uses bincount / index_add_ instead of an (N, K)
    one-hot matmul, so the cost is O(N·D) whatever the codebook size.
    Returns counts (K,) and sums (K, D), both float32.
    """
    x = x.float()
    if weights is None:
        counts = torch.bincount(indices, minlength=num_codes).float()
    else:
        weights = weights.float()
        counts = torch.bincount(indices, weights=weights, minlength=num_codes).float()
        x = x * weights.unsqueeze(-1)
    sums = x.new_zeros(num_codes, x.shape[-1]).index_add_(0, indices, x)
    return counts, sums


def _sq_dists(samples: Tensor, sample_sq: Tensor, centres: Tensor, cosine: bool) -> Tensor:
    """(N, M) squared distances from every sample to each of M centres, via one matmul."""
    dots = samples @ centres.t()
    if cosine:  # unit vectors: |a - b|^2 = 2 - 2 a.b
        return (2.0 - 2.0 * dots).clamp_min(0.0)
    return (sample_sq.unsqueeze(-1) + centres.pow(2).sum(-1) - 2.0 * dots).clamp_min(0.0)


def kmeans_plusplus_init(
    samples: Tensor, num_clusters: int, use_cosine_sim: bool = False, max_rounds: int = 256
) -> Tensor:
    """k-means++ seeding: new centres are drawn with probability ∝ squared distance to the
    nearest centre so far, which finds separated clusters far more reliably than uniform
    sampling.

    Up to `max_rounds` sequential rounds: with more clusters than that, each round draws
    ceil(num_clusters / max_rounds) distinct centres at once (as in k-means||), so seeding a
    65536-code codebook costs about one Lloyd iteration, not 65536 tiny steps.
    samples: (N, D) float32, N >= 1 (unit rows if `use_cosine_sim`). With N <= num_clusters
    every sample becomes a centre and the rest are random duplicates. Returns (K, D).
    """
    n, device = samples.shape[0], samples.device
    if n <= num_clusters:
        extra = torch.randint(n, (num_clusters - n,), device=device)
        return samples[torch.cat([torch.randperm(n, device=device), extra])].clone()
    per_round = -(-num_clusters // max_rounds)
    sample_sq = samples.pow(2).sum(-1)
    chosen = [torch.randint(n, (1,), device=device)]
    min_dist = _sq_dists(samples, sample_sq, samples[chosen[0]], use_cosine_sim).squeeze(-1)
    taken = 1
    while taken < num_clusters:
        count = min(per_round, num_clusters - taken)
        # a floor keeps `count` distinct draws possible when most distances are already zero
        picked = torch.multinomial(min_dist.clamp_min(1e-30), count, replacement=False)
        dists = _sq_dists(samples, sample_sq, samples[picked], use_cosine_sim)
        min_dist = torch.minimum(min_dist, dists.min(dim=-1).values)
        chosen.append(picked)
        taken += count
    return samples[torch.cat(chosen)].clone()


def kmeans(
    samples: Tensor,
    num_clusters: int,
    num_iters: int = 10,
    use_cosine_sim: bool = False,
    init: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means (spherical with `use_cosine_sim`), in float32.

    samples: (N, D) with N >= 1; init: optional (K, D) starting centres (k-means++ otherwise).
    A cluster that ends an iteration empty keeps its previous centre, so nothing becomes NaN.
    Returns centres (K, D) and the number of samples assigned to each (K,) under them.
    """
    with torch.autocast(device_type=samples.device.type, enabled=False):
        samples = samples.detach().float()
        if use_cosine_sim:
            samples = l2_normalize(samples)
        if init is None:
            centres = kmeans_plusplus_init(samples, num_clusters, use_cosine_sim)
        else:
            centres = init.detach().float().clone()
            if use_cosine_sim:
                centres = l2_normalize(centres)
        for _ in range(num_iters):
            counts, sums = cluster_statistics(
                samples, nearest_code(samples, centres, use_cosine_sim), num_clusters
            )
            means = sums / counts.clamp_min(1.0).unsqueeze(-1)
            if use_cosine_sim:
                means = l2_normalize(means)
            centres = torch.where(counts.unsqueeze(-1) > 0, means, centres)
        counts = torch.bincount(
            nearest_code(samples, centres, use_cosine_sim), minlength=num_clusters
        ).float()
    return centres, counts
