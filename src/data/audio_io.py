"""Audio files in, mono float waveforms at one sample rate out (soundfile + torchaudio)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import soundfile as sf
import torch
import torchaudio.functional as AF
from torch import Tensor

from src.data.file_listing import list_media_files

__all__ = ["AUDIO_EXTENSIONS", "list_audio_files", "load_audio", "load_clips"]

log = logging.getLogger(__name__)

AUDIO_EXTENSIONS: tuple[str, ...] = (".wav", ".flac", ".ogg", ".aiff", ".aif")


def list_audio_files(root: Path, extensions: Sequence[str], recursive: bool = True) -> list[Path]:
    """Sorted audio paths under ``root`` whose suffix (any case) is in ``extensions``."""
    return list_media_files(root, extensions, recursive, kind="audio")


def load_audio(path: Path, sample_rate: int) -> Tensor:
    """Read a file with soundfile, mix to mono, resample to ``sample_rate``: float32 ``(T,)``."""
    data, source_rate = sf.read(str(path), dtype="float32", always_2d=True)
    waveform = torch.from_numpy(data).mean(dim=1)
    if waveform.numel() == 0:  # nothing to resample (torchaudio would fail with a reshape error)
        return waveform
    if source_rate != sample_rate:
        waveform = AF.resample(waveform, source_rate, sample_rate)
    return waveform.contiguous()


def load_clips(files: Sequence[Path], sample_rate: int) -> list[tuple[Path, Tensor]]:
    """Load every file; unreadable, corrupt or empty ones are skipped with a warning naming them."""
    clips = []
    for path in files:
        try:
            waveform = load_audio(path, sample_rate)
        except Exception as err:  # soundfile/libsndfile raise several types for bad files
            log.warning("skipping unreadable audio file %s: %s", path, err)
            continue
        if waveform.numel() == 0:
            log.warning("skipping empty audio file %s: it holds no samples", path)
            continue
        if not bool(torch.isfinite(waveform).all()):
            log.warning("skipping audio file %s: it holds non-finite samples", path)
            continue
        clips.append((path, waveform))
    return clips
