"""Small tensor kernels shared by the quantizers: nearest-code search, k-means, rotation trick."""

from src.quantizers.kernels.kmeans import cluster_statistics, kmeans, kmeans_plusplus_init
from src.quantizers.kernels.nearest import l2_normalize, nearest_code
from src.quantizers.kernels.rotation import rotate_to, straight_through

__all__ = [
    "cluster_statistics",
    "kmeans",
    "kmeans_plusplus_init",
    "l2_normalize",
    "nearest_code",
    "rotate_to",
    "straight_through",
]
