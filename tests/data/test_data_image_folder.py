"""ImageFolderDataModule: user image files, nested folders, corrupt files skipped with a warning."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from src.data import ImageFolderDataModule

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]


@pytest.fixture()
def image_dir(tmp_path: Path) -> Path:
    """Six solid-colour images of different sizes/formats/modes, nested, plus junk."""
    layout = [
        ("a.png", (40, 60), "RGB"),
        ("sub/b.jpg", (80, 50), "RGB"),
        ("sub/c.PNG", (33, 33), "RGBA"),
        ("sub/deeper/d.bmp", (20, 90), "RGB"),
        ("e.webp", (64, 64), "RGB"),
        ("f.tif", (50, 70), "RGB"),
    ]
    for (name, size, mode), colour in zip(layout, COLOURS, strict=True):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new(mode, size, colour + ((255,) if mode == "RGBA" else ())).save(path)
    (tmp_path / "sub" / "broken.png").write_bytes(np.random.default_rng(0).bytes(500))
    (tmp_path / "notes.txt").write_text("not an image")
    return tmp_path


def _everything(dm: ImageFolderDataModule) -> torch.Tensor:
    loaders = (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader())
    return torch.cat([batch for loader in loaders for batch in loader])


def test_corrupt_file_skipped_with_warning(
    image_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dm = ImageFolderDataModule(str(image_dir), image_size=16, val_fraction=0.2, test_fraction=0.2)
    with caplog.at_level(logging.WARNING, logger="src.data.image_folder"):
        dm.setup()
    assert any(str(image_dir / "sub" / "broken.png") in r.getMessage() for r in caplog.records)
    files = [p for split in dm.split_files.values() for p in split]
    assert len(files) == len(set(files)) == 6
    assert image_dir / "sub" / "broken.png" not in files
    assert [len(dm.split_files[s]) for s in ("train", "val", "test")] == [4, 1, 1]


@pytest.mark.parametrize("channels", [1, 3])
def test_outputs_resized_cropped_in_unit_range(image_dir: Path, channels: int) -> None:
    dm = ImageFolderDataModule(str(image_dir), image_size=16, channels=channels, batch_size=4)
    assert dm.num_channels == channels and dm.image_size == (16, 16)
    images = _everything(dm)
    assert images.shape == (6, channels, 16, 16) and images.dtype == torch.float32
    assert images.min() >= 0.0 and images.max() <= 1.0


def test_pixel_values_follow_the_files(image_dir: Path) -> None:
    dm = ImageFolderDataModule(str(image_dir), image_size=8, val_fraction=0.0, test_fraction=0.0)
    dm.setup()
    position = dm.split_files["train"].index(image_dir / "a.png")
    red = dm.data_train[position]
    assert torch.allclose(red, torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1).expand(3, 8, 8))


def test_split_is_seeded(image_dir: Path) -> None:
    def split(seed: int) -> dict:
        dm = ImageFolderDataModule(str(image_dir), val_fraction=0.3, test_fraction=0.3, seed=seed)
        dm.setup()
        return dm.split_files

    assert split(0) == split(0)
    assert any(split(s) != split(0) for s in range(1, 5))


def test_non_recursive_and_extension_filter(image_dir: Path) -> None:
    kwargs = {"recursive": False, "extensions": [".png", "webp"]}
    with pytest.raises(ValueError, match="too few"):  # 2 files cannot fill 3 splits
        ImageFolderDataModule(str(image_dir), **kwargs).setup()
    dm = ImageFolderDataModule(str(image_dir), val_fraction=0.0, test_fraction=0.0, **kwargs)
    dm.setup()
    names = sorted(p.name for split in dm.split_files.values() for p in split)
    assert names == ["a.png", "e.webp"]


def test_empty_or_missing_folder_raises_naming_path(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("no images here")
    with pytest.raises(FileNotFoundError, match=r"\.png") as info:
        ImageFolderDataModule(str(tmp_path / "empty")).setup()
    assert str(tmp_path / "empty") in str(info.value)
    with pytest.raises(FileNotFoundError) as info:
        ImageFolderDataModule(str(tmp_path / "nope")).setup()
    assert str(tmp_path / "nope") in str(info.value)


def test_bad_channels_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="channels"):
        ImageFolderDataModule(str(tmp_path), channels=4)
