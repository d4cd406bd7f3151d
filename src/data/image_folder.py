"""The user's own image files (flat or nested folders), resized and center-cropped."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import transforms

from src.data.file_listing import list_media_files
from src.data.split_datamodule import SplitImageDataModule, as_tuple, seeded_split

__all__ = ["IMAGE_EXTENSIONS", "ImageFileDataset", "ImageFolderDataModule", "list_image_files"]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def list_image_files(root: Path, extensions: Sequence[str], recursive: bool = True) -> list[Path]:
    """Sorted image paths under ``root`` whose suffix (any case) is in ``extensions``."""
    return list_media_files(root, extensions, recursive, kind="image")


def readable_images(files: Sequence[Path]) -> list[Path]:
    """Drop files PIL cannot parse, logging a warning that names each one."""
    kept = []
    for path in files:
        try:
            with Image.open(path) as image:
                image.verify()
        except Exception as err:  # PIL raises many types for bad files
            log.warning("skipping unreadable image %s: %s", path, err)
            continue
        kept.append(path)
    return kept


class ImageFileDataset(Dataset[Tensor]):
    """Load image files as float ``(C, size, size)`` tensors: shorter side resized, center crop."""

    def __init__(self, files: Sequence[Path], image_size: int, channels: int) -> None:
        self.files = list(files)
        self.mode = "L" if channels == 1 else "RGB"
        self.transform = transforms.Compose(
            [
                transforms.Resize(image_size, antialias=True),
                transforms.CenterCrop(image_size),
                transforms.ToTensor(),
            ]
        )

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Tensor:
        path = self.files[index]
        try:
            with Image.open(path) as image:
                return self.transform(image.convert(self.mode))
        except OSError as err:
            raise OSError(f"could not load image {path}: {err}") from err


class ImageFolderDataModule(SplitImageDataModule):
    """Every image file under ``root`` (sorted, then a seeded train/val/test split).

    Files PIL cannot read are skipped at ``setup`` with a warning naming them. After ``setup``,
    ``split_files[split]`` lists the paths of each split.
    """

    def __init__(
        self,
        root: str,
        image_size: int = 64,
        channels: int = 3,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        recursive: bool = True,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, pin_memory, seed)
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        self.root = Path(root).expanduser()
        self.extensions = as_tuple(extensions)
        self.recursive = bool(recursive)
        self.val_fraction = float(val_fraction)
        self.test_fraction = float(test_fraction)
        self.num_channels = int(channels)
        self.image_size = (int(image_size), int(image_size))
        self.split_files: dict[str, list[Path]] = {}

    def build_splits(self) -> tuple[Dataset[Tensor], Dataset[Tensor], Dataset[Tensor]]:
        listed = list_image_files(self.root, self.extensions, self.recursive)
        files = readable_images(listed)
        if not files:
            raise FileNotFoundError(
                f"none of the {len(listed)} image files in {str(self.root)!r} could be read"
            )
        splits = seeded_split(len(files), self.val_fraction, self.test_fraction, self.seed)
        for split, indices in zip(("train", "val", "test"), splits, strict=True):
            self.split_files[split] = [files[i] for i in indices.tolist()]
        train, val, test = (
            ImageFileDataset(self.split_files[s], self.image_size[0], self.num_channels)
            for s in ("train", "val", "test")
        )
        return train, val, test
