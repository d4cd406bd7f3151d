"""Random patches of real RGB photos bundled in ``skimage.data`` (no download), split by photo."""

from __future__ import annotations

import functools
import zlib
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from src.data.datasets import UInt8ImageDataset
from src.data.split_datamodule import SplitImageDataModule, as_tuple

__all__ = ["PHOTO_NAMES", "EmbeddedPhotosDataModule", "load_photo"]


def _read_skimage_photo(name: str) -> np.ndarray:
    import skimage.data  # lazy: only this module needs scikit-image

    if name == "motorcycle":  # the left view of the stereo pair
        return skimage.data.stereo_motorcycle()[0]
    return getattr(skimage.data, name)()


# Real RGB photographs whose files ship inside the scikit-image wheel (checked offline).
# Left out: colorwheel/logo (synthetic), cat (alias of chelsea), motorcycle's right view
# (near-duplicate of the left one), and the gallery images that need a pooch download.
PHOTO_NAMES: tuple[str, ...] = (
    "astronaut",
    "chelsea",
    "coffee",
    "hubble_deep_field",
    "immunohistochemistry",
    "motorcycle",
    "retina",
    "rocket",
)


@functools.cache
def load_photo(name: str) -> np.ndarray:
    """Return one bundled photo as a read-only ``uint8`` array ``(H, W, 3)`` (cached)."""
    if name not in PHOTO_NAMES:
        raise ValueError(f"unknown photo {name!r}; available: {', '.join(PHOTO_NAMES)}")
    try:
        image = _read_skimage_photo(name)
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            f"loading the bundled photo {name!r} needs scikit-image: run `pip install "
            f"scikit-image` (a vqzoo dependency). Original error: {err}"
        ) from err
    image = np.ascontiguousarray(np.asarray(image, dtype=np.uint8)[..., :3])
    image.flags.writeable = False
    return image


class EmbeddedPhotosDataModule(SplitImageDataModule):
    """``patch_size`` RGB crops of real photos; val and test photos are never seen in training.

    Each photo gets ``patches_per_image`` crops at positions drawn from a generator seeded by
    ``seed`` and the photo's name, so a photo's patches do not depend on the split. After
    ``setup``, ``patch_origins[split]`` lists ``(photo, top, left)`` for every patch.
    """

    def __init__(
        self,
        patch_size: int = 32,
        patches_per_image: int = 256,
        photos: Sequence[str] | None = None,
        val_photos: Sequence[str] = ("rocket",),
        test_photos: Sequence[str] = ("chelsea",),
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, pin_memory, seed)
        if patch_size < 1 or patches_per_image < 1:
            raise ValueError("patch_size and patches_per_image must be >= 1")
        self.patch_size = int(patch_size)
        self.patches_per_image = int(patches_per_image)
        chosen = PHOTO_NAMES if photos is None else as_tuple(photos)
        self.val_photos, self.test_photos = as_tuple(val_photos), as_tuple(test_photos)
        for name in (*chosen, *self.val_photos, *self.test_photos):
            if name not in PHOTO_NAMES:
                raise ValueError(f"unknown photo {name!r}; available: {', '.join(PHOTO_NAMES)}")
        if set(self.val_photos) & set(self.test_photos):
            raise ValueError(f"val_photos {self.val_photos} and test_photos overlap")
        held_out = set(self.val_photos) | set(self.test_photos)
        self.train_photos = tuple(sorted(set(chosen) - held_out))
        if not self.train_photos or not self.val_photos or not self.test_photos:
            raise ValueError(
                f"each split needs at least one photo, got train={self.train_photos}, "
                f"val={self.val_photos}, test={self.test_photos}"
            )
        self.num_channels = 3
        self.image_size = (self.patch_size, self.patch_size)
        self.patch_origins: dict[str, list[tuple[str, int, int]]] = {}

    @property
    def photo_split(self) -> dict[str, tuple[str, ...]]:
        """Which photos feed each split."""
        return {"train": self.train_photos, "val": self.val_photos, "test": self.test_photos}

    def _patches(self, name: str) -> tuple[Tensor, list[tuple[str, int, int]]]:
        photo = torch.from_numpy(load_photo(name).copy()).permute(2, 0, 1)  # (3, H, W)
        height, width = photo.shape[1:]
        size = self.patch_size
        if height < size or width < size:
            raise ValueError(f"photo {name!r} ({height}x{width}) is smaller than patch_size={size}")
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))
        tops = torch.randint(0, height - size + 1, (self.patches_per_image,), generator=generator)
        lefts = torch.randint(0, width - size + 1, (self.patches_per_image,), generator=generator)
        origins = [(name, t, x) for t, x in zip(tops.tolist(), lefts.tolist(), strict=True)]
        patches = torch.stack([photo[:, t : t + size, x : x + size] for _, t, x in origins])
        return patches, origins

    def build_splits(self) -> tuple[Dataset[Tensor], Dataset[Tensor], Dataset[Tensor]]:
        datasets: list[Dataset[Tensor]] = []
        for split, names in self.photo_split.items():
            parts = [self._patches(name) for name in names]
            self.patch_origins[split] = [origin for _, origins in parts for origin in origins]
            datasets.append(UInt8ImageDataset(torch.cat([patches for patches, _ in parts])))
        train, val, test = datasets
        return train, val, test
