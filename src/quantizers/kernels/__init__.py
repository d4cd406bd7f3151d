"""Small tensor kernels shared by the quantizers: nearest-code search, k-means, rotation trick,
codebook-state arithmetic."""

from src.quantizers.kernels.codebook_ops import (
    dead_code_replacements,
    masked_mse,
    orthogonal_loss,
    smoothed_codebook,
)
from src.quantizers.kernels.kmeans import cluster_statistics, kmeans, kmeans_plusplus_init
from src.quantizers.kernels.nearest import (
    code_scores_bias,
    l2_normalize,
    nearest_code,
    row_argmax,
    unit_rows,
    unit_rows_and_scale,
)
from src.quantizers.kernels.rotation import (
    cosine_rotate_commit,
    rotate_to,
    rotation_grad,
    straight_through,
)

__all__ = [
    "cluster_statistics",
    "code_scores_bias",
    "cosine_rotate_commit",
    "dead_code_replacements",
    "kmeans",
    "kmeans_plusplus_init",
    "l2_normalize",
    "masked_mse",
    "nearest_code",
    "orthogonal_loss",
    "rotate_to",
    "rotation_grad",
    "row_argmax",
    "smoothed_codebook",
    "straight_through",
    "unit_rows",
    "unit_rows_and_scale",
]
