"""Class labels of a datamodule's split, in the split's item order, where the data has them.

Training batches stay images only; consumers that need classes (the tokenize script's code
cache, a class-conditional prior) ask here. A datamodule may define `split_labels(split)`
itself; otherwise the embedded MNIST digits and torchvision datasets (through `Subset` /
`ImagesOnly`) are read; anything else has no labels (None).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset

from src.data.datasets import ImagesOnly
from src.data.embedded_mnist import EmbeddedMNISTDataModule

SPLITS = ("train", "val", "test")


def split_labels(datamodule: object, split: str) -> Tensor | None:
    """Int64 labels (N,) of `split` ("train", "val" or "test") in item order, or None."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    accessor = getattr(datamodule, "split_labels", None)
    if callable(accessor):
        return accessor(split)
    setup = getattr(datamodule, "setup", None)
    if callable(setup):
        setup()
    if isinstance(datamodule, EmbeddedMNISTDataModule):
        from src.data.embedded_mnist_labels import load_mnist_5k_labels

        rows = datamodule.split_indices[split].numpy()
        return torch.from_numpy(load_mnist_5k_labels()[rows].copy())
    dataset = getattr(datamodule, f"data_{split}", None)
    return None if dataset is None else dataset_labels(dataset)


def dataset_labels(dataset: Dataset) -> Tensor | None:
    """Labels of a torchvision-style dataset (a `targets` attribute), through `Subset` and
    `ImagesOnly` wrappers; None when there are none."""
    if isinstance(dataset, Subset):
        inner = dataset_labels(dataset.dataset)
        return None if inner is None else inner[torch.as_tensor(dataset.indices)]
    if isinstance(dataset, ImagesOnly):
        return dataset_labels(dataset.dataset)
    targets = getattr(dataset, "targets", None)
    if targets is None:
        return None
    return torch.as_tensor(targets, dtype=torch.int64)
