"""TorchvisionImageDataModule: no download by default, clear errors, images-only batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from src.data import TorchvisionImageDataModule


def _write_idx(path: Path, array: np.ndarray) -> None:
    """Write an MNIST-format (idx) uint8 file: magic, dims as big-endian int32, then data."""
    magic = 0x0800 + array.ndim
    header = np.array([magic, *array.shape], dtype=">i4").tobytes()
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _fake_mnist(root: Path, n_train: int, n_test: int) -> None:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None], (n, 28, 28))
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)


@pytest.mark.parametrize(
    ("name", "channels", "side"),
    [("MNIST", 1, 28), ("FashionMNIST", 1, 28), ("CIFAR10", 3, 32), ("CIFAR100", 3, 32)],
)
def test_shape_table_without_touching_disk(name: str, channels: int, side: int) -> None:
    dm = TorchvisionImageDataModule(name=name, root="/nonexistent")
    assert dm.num_channels == channels and dm.image_size == (side, side)


def test_unknown_name_lists_supported() -> None:
    with pytest.raises(ValueError, match="MNIST, FashionMNIST, CIFAR10, CIFAR100"):
        TorchvisionImageDataModule(name="ImageNet")


@pytest.mark.parametrize("name", ["MNIST", "CIFAR10"])
def test_missing_data_without_download_explains(tmp_path: Path, name: str) -> None:
    dm = TorchvisionImageDataModule(name=name, root=str(tmp_path), download=False)
    dm.prepare_data()  # must not download anything
    with pytest.raises(FileNotFoundError, match=r"data\.download=true") as info:
        dm.setup()
    assert str(tmp_path) in str(info.value)
    assert list(tmp_path.rglob("*")) == [] or all(p.is_dir() for p in tmp_path.rglob("*"))


def test_loads_local_mnist_files_images_only(tmp_path: Path) -> None:
    _fake_mnist(tmp_path, n_train=50, n_test=10)
    dm = TorchvisionImageDataModule(root=str(tmp_path), val_fraction=0.2, batch_size=16)
    dm.setup()
    assert (len(dm.data_train), len(dm.data_val), len(dm.data_test)) == (40, 10, 10)
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch, torch.Tensor)
    assert batch.shape == (16, 1, 28, 28) and batch.dtype == torch.float32
    # image i is filled with value i: recover ids to check the split and the test set
    ids = {
        split: {round(x.item() * 255) for x in torch.cat(list(loader))[:, 0, 0, 0]}
        for split, loader in (
            ("train", dm.train_dataloader()),
            ("val", dm.val_dataloader()),
            ("test", dm.test_dataloader()),
        )
    }
    assert ids["train"] | ids["val"] == set(range(50)) and not ids["train"] & ids["val"]
    assert ids["test"] == set(range(10))
    again = TorchvisionImageDataModule(root=str(tmp_path), val_fraction=0.2)
    again.setup()
    assert list(again.data_val.indices) == list(dm.data_val.indices)
