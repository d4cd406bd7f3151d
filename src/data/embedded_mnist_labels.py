"""Labels of the embedded MNIST digits and labelled splits, for metrics that need the classes.

The datamodule yields images only; the sample metrics of a prior (a digit classifier, the
Frechet distance to held-out digits) need the labels and the same seeded split.
"""

from __future__ import annotations

import functools
import gzip

import numpy as np
import torch
from torch import Tensor

from src.data.embedded_mnist import load_mnist_5k, mnist_5k_path
from src.data.split_datamodule import seeded_split

__all__ = ["SPLITS", "load_mnist_5k_labels", "mnist_5k_split"]

SPLITS = ("train", "val", "test")


@functools.cache
def load_mnist_5k_labels() -> np.ndarray:
    """Return the class (0-9) of each of the 5000 digits, ``int64`` ``(5000,)``, read-only.

    It is the last column of the CSV rows that :func:`load_mnist_5k` reads the pixels of.
    """
    with gzip.open(mnist_5k_path(), "rt") as handle:
        labels = np.array([int(line.rsplit(",", 1)[1]) for line in handle], dtype=np.int64)
    if labels.shape != (load_mnist_5k().shape[0],) or labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"unexpected labels in mnist_5k.csv.gz: shape {labels.shape}")
    labels.flags.writeable = False
    return labels


def mnist_5k_split(
    split: str, seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.1
) -> tuple[Tensor, Tensor]:
    """Images ``(N, 1, 28, 28)`` float32 in [0, 1] and labels ``(N,)`` long of one split, in
    the order of ``EmbeddedMNISTDataModule`` with the same ``seed`` and fractions (defaults =
    ``configs/data/mnist_embedded.yaml``)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    indices = seeded_split(len(load_mnist_5k_labels()), val_fraction, test_fraction, seed)
    rows = dict(zip(SPLITS, indices, strict=True))[split]
    images = torch.from_numpy(load_mnist_5k()[rows.numpy()]).unsqueeze(1).float().div_(255.0)
    labels = torch.from_numpy(load_mnist_5k_labels()[rows.numpy()].copy())
    return images, labels
