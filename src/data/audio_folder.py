"""The user's own recordings (WAV/FLAC/OGG/AIFF, flat or nested): mono crops at one rate."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from torch import Tensor
from torch.utils.data import Dataset

from src.data.audio_crops import FixedCropDataset, RandomCropDataset
from src.data.audio_io import AUDIO_EXTENSIONS, list_audio_files, load_clips
from src.data.split_datamodule import SplitImageDataModule, as_tuple, seeded_split

__all__ = ["AudioFolderDataModule"]

log = logging.getLogger(__name__)


class AudioFolderDataModule(SplitImageDataModule):
    """Every audio file under ``root``, split by file (seeded), loaded into memory at ``setup``.

    Loaders yield float32 ``(B, 1, T)`` waveforms at ``sample_rate``: files are read with
    soundfile, mixed to mono and resampled with torchaudio. Training items are random crops of
    ``segment_seconds``; validation and test items tile each file with fixed windows of
    ``eval_segment_seconds``. Unreadable files are skipped with a warning naming them; after
    ``setup``, ``split_files[split]`` lists the files of each split. (The loaders and the seeded
    shuffling come from the image base class, which knows nothing about images but the name.)
    """

    num_channels = 1

    def __init__(
        self,
        root: str,
        sample_rate: int = 16000,
        segment_seconds: float = 1.0,
        eval_segment_seconds: float = 2.0,
        extensions: Sequence[str] = AUDIO_EXTENSIONS,
        recursive: bool = True,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        batch_size: int = 16,
        num_workers: int = 0,
        pin_memory: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, pin_memory, seed)
        if sample_rate < 1:
            raise ValueError(f"sample_rate must be >= 1 Hz, got {sample_rate}")
        if segment_seconds <= 0 or eval_segment_seconds <= 0:
            raise ValueError(
                "segment_seconds and eval_segment_seconds must be > 0, got "
                f"{segment_seconds} and {eval_segment_seconds}"
            )
        self.root = Path(root).expanduser()
        self.sample_rate = int(sample_rate)
        self.segment_length = round(segment_seconds * self.sample_rate)
        self.eval_segment_length = round(eval_segment_seconds * self.sample_rate)
        self.extensions = as_tuple(extensions)
        self.recursive = bool(recursive)
        self.val_fraction = float(val_fraction)
        self.test_fraction = float(test_fraction)
        self.split_files: dict[str, list[Path]] = {}

    def list_files(self) -> list[Path]:
        """The candidate files; subclasses with a fixed source override this."""
        return list_audio_files(self.root, self.extensions, self.recursive)

    def build_splits(self) -> tuple[Dataset[Tensor], Dataset[Tensor], Dataset[Tensor]]:
        listed = self.list_files()
        clips = load_clips(listed, self.sample_rate)
        if not clips:
            raise FileNotFoundError(
                f"none of the {len(listed)} audio files in {str(self.root)!r} could be read"
            )
        if len(clips) < len(listed):
            log.warning("skipped %d of %d audio files", len(listed) - len(clips), len(listed))
        splits = seeded_split(len(clips), self.val_fraction, self.test_fraction, self.seed)
        waveforms: dict[str, list[Tensor]] = {}
        for split, indices in zip(("train", "val", "test"), splits, strict=True):
            self.split_files[split] = [clips[i][0] for i in indices.tolist()]
            waveforms[split] = [clips[i][1] for i in indices.tolist()]
        return (
            RandomCropDataset(waveforms["train"], self.segment_length),
            FixedCropDataset(waveforms["val"], self.eval_segment_length),
            FixedCropDataset(waveforms["test"], self.eval_segment_length),
        )
