"""Standard torchvision image datasets (MNIST, FashionMNIST, CIFAR10, CIFAR100), images only."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

from torch import Tensor
from torch.utils.data import Dataset, Subset
from torchvision import datasets, transforms

from src.data.datasets import ImagesOnly
from src.data.split_datamodule import SplitImageDataModule, seeded_split

__all__ = ["TORCHVISION_IMAGE_DATASETS", "TorchvisionImageDataModule"]


class _Spec(NamedTuple):
    channels: int
    side: int
    folder: str  # where torchvision looks for the files, relative to root


TORCHVISION_IMAGE_DATASETS: dict[str, _Spec] = {
    "MNIST": _Spec(1, 28, "MNIST/raw"),
    "FashionMNIST": _Spec(1, 28, "FashionMNIST/raw"),
    "CIFAR10": _Spec(3, 32, "cifar-10-batches-py"),
    "CIFAR100": _Spec(3, 32, "cifar-100-python"),
}


class TorchvisionImageDataModule(SplitImageDataModule):
    """A torchvision dataset: its train split gives train/val (seeded), its test split gives test.

    Nothing is downloaded unless ``download=True`` (then in ``prepare_data``, on one process).
    """

    def __init__(
        self,
        name: str = "MNIST",
        root: str = "data",
        download: bool = False,
        val_fraction: float = 0.1,
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, pin_memory, seed)
        if name not in TORCHVISION_IMAGE_DATASETS:
            raise ValueError(
                f"unknown torchvision dataset {name!r}; supported: "
                f"{', '.join(TORCHVISION_IMAGE_DATASETS)}"
            )
        self.name = name
        self.root = str(Path(root).expanduser())
        self.download = bool(download)
        self.val_fraction = float(val_fraction)
        spec = TORCHVISION_IMAGE_DATASETS[name]
        self.num_channels = spec.channels
        self.image_size = (spec.side, spec.side)

    def _dataset(self, train: bool, download: bool = False) -> Dataset[Any]:
        cls = getattr(datasets, self.name)
        try:
            return cls(self.root, train=train, transform=transforms.ToTensor(), download=download)
        except RuntimeError as err:
            if download:
                raise
            expected = Path(self.root) / TORCHVISION_IMAGE_DATASETS[self.name].folder
            raise FileNotFoundError(
                f"{self.name} was not found under {self.root!r} and data.download=false. "
                f"Set data.download=true to fetch it (needs internet), or put the dataset's "
                f"files where torchvision expects them: {expected}. ({err})"
            ) from err

    def prepare_data(self) -> None:
        """Download both splits when ``download=True`` (Lightning runs this on one process)."""
        if self.download:
            self._dataset(train=True, download=True)
            self._dataset(train=False, download=True)

    def build_splits(self) -> tuple[Dataset[Tensor], Dataset[Tensor], Dataset[Tensor]]:
        full_train = ImagesOnly(self._dataset(train=True))
        train_idx, val_idx, _ = seeded_split(len(full_train), self.val_fraction, 0.0, self.seed)
        test = ImagesOnly(self._dataset(train=False))
        return Subset(full_train, train_idx.tolist()), Subset(full_train, val_idx.tolist()), test
