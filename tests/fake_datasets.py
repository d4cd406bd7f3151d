"""Tiny on-disk stand-ins for the datasets the data configs read, laid out where each reader
(torchvision, torchaudio, the folder datamodules) looks, so every data config can run offline."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image

AUDIO_ASSETS = Path(__file__).resolve().parent / "assets" / "audio"


def write_idx(path: Path, array: np.ndarray) -> None:
    """An MNIST-format (idx) uint8 file: magic, dims as big-endian int32, then the data."""
    header = np.array([0x0800 + array.ndim, *array.shape], dtype=">i4").tobytes()
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def fake_mnist(root: Path, n_train: int = 40, n_test: int = 8) -> Path:
    """torchvision MNIST's raw idx files under ``root/MNIST/raw`` (random digits)."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    return root


def fake_cifar10(root: Path, per_batch: int = 8) -> Path:
    """torchvision CIFAR-10's pickled batches under ``root/cifar-10-batches-py``. torchvision
    checks the real archive's MD5 sums, which these files cannot match: callers bypass only that
    check (``torchvision.datasets.cifar.check_integrity``)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        batch = {
            "data": rng.integers(0, 256, (per_batch, 3 * 32 * 32), dtype=np.uint8),
            "labels": [i % 10 for i in range(per_batch)],
        }
        (folder / name).write_bytes(pickle.dumps(batch))
    meta = {"label_names": [f"class{i}" for i in range(10)]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    return root


def png_folder(root: Path, count: int = 12, side: int = 20) -> Path:
    """``count`` random RGB PNGs, half of them in a subfolder."""
    rng = np.random.default_rng(0)
    for i in range(count):
        path = root / ("sub" if i % 2 else ".") / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(path)
    return root


def audio_copy(folder: Path, suffix: str = ".wav") -> Path:
    """The four real test clips (tests/assets/audio) copied into ``folder`` as ``suffix``."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, clip in enumerate(sorted(AUDIO_ASSETS.glob("*.wav"))):
        if suffix == ".wav":
            shutil.copy(clip, folder / clip.name)
        else:
            wave, rate = sf.read(clip)
            sf.write(folder / f"{i}{suffix}", wave, rate)
    return folder


def fake_librispeech(root: Path, subset: str = "dev-clean") -> Path:
    """torchaudio LibriSpeech's ``root/LibriSpeech/<subset>/<speaker>/<chapter>/*.flac``."""
    audio_copy(root / "LibriSpeech" / subset / "19" / "198", suffix=".flac")
    return root


def fake_yesno(root: Path) -> Path:
    """torchaudio YESNO's ``root/waves_yesno/*.wav``."""
    audio_copy(root / "waves_yesno")
    return root
