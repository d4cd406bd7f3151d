"""EmbeddedPhotosDataModule: patches of real skimage photos, split by photo."""

from __future__ import annotations

import pytest
import torch

from src.data import EmbeddedPhotosDataModule
from src.data.embedded_photos import PHOTO_NAMES, load_photo


@pytest.fixture(scope="module")
def dm() -> EmbeddedPhotosDataModule:
    module = EmbeddedPhotosDataModule(patches_per_image=16, batch_size=32, seed=0)
    module.setup()
    return module


def test_attributes_and_batches(dm: EmbeddedPhotosDataModule) -> None:
    assert dm.num_channels == 3
    assert dm.image_size == (32, 32)
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch, torch.Tensor)
    assert batch.shape == (32, 3, 32, 32) and batch.dtype == torch.float32
    assert batch.min() >= 0.0 and batch.max() <= 1.0
    assert batch.std() > 0.05  # real photo content, not constant
    n_train = len(dm.train_photos) * 16
    assert (len(dm.data_train), len(dm.data_val), len(dm.data_test)) == (n_train, 16, 16)


def test_held_out_photos_feed_only_val_and_test(dm: EmbeddedPhotosDataModule) -> None:
    split = dm.photo_split
    assert split["val"] == ("rocket",) and split["test"] == ("chelsea",)
    assert set(split["train"]) == set(PHOTO_NAMES) - {"rocket", "chelsea"}
    for name, loader in (("val", dm.val_dataloader()), ("test", dm.test_dataloader())):
        patches = torch.cat(list(loader))
        origins = dm.patch_origins[name]
        assert {photo for photo, _, _ in origins} == set(split[name])
        for patch, (photo, top, left) in zip(patches, origins, strict=True):
            crop = torch.from_numpy(load_photo(photo)[top : top + 32, left : left + 32].copy())
            assert patch.equal(crop.permute(2, 0, 1).float() / 255)
    train_sources = {photo for photo, _, _ in dm.patch_origins["train"]}
    assert train_sources == set(split["train"])


def test_deterministic_per_seed(dm: EmbeddedPhotosDataModule) -> None:
    same = EmbeddedPhotosDataModule(patches_per_image=16, batch_size=32, seed=0)
    same.setup()
    assert torch.cat(list(same.val_dataloader())).equal(torch.cat(list(dm.val_dataloader())))
    assert same.patch_origins == dm.patch_origins
    other = EmbeddedPhotosDataModule(patches_per_image=16, seed=1)
    other.setup()
    assert other.patch_origins["test"] != dm.patch_origins["test"]


def test_photos_configurable_by_name() -> None:
    module = EmbeddedPhotosDataModule(
        patch_size=8,
        patches_per_image=4,
        photos=["astronaut", "coffee", "rocket"],
        val_photos=["coffee"],
        test_photos="rocket",
    )
    assert module.image_size == (8, 8)
    module.setup()
    assert module.photo_split == {"train": ("astronaut",), "val": ("coffee",), "test": ("rocket",)}
    assert next(iter(module.test_dataloader())).shape == (4, 3, 8, 8)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"val_photos": ["lena"]}, "available"),
        ({"val_photos": ["rocket"], "test_photos": ["rocket"]}, "overlap"),
        ({"photos": ["rocket", "chelsea"]}, "at least one photo"),
    ],
)
def test_bad_photo_choices_raise(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EmbeddedPhotosDataModule(**kwargs)
