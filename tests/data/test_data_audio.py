"""Audio datamodules: reading, resampling, skipping bad files, seeded splits by file, crops."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from src.data import AsteriskSpeechDataModule, AudioFolderDataModule
from src.data.audio_crops import FixedCropDataset, RandomCropDataset
from src.data.audio_io import load_audio

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "audio"


def write_tone(path: Path, rate: int, seconds: float, channels: int = 1, freq: float = 440.0):
    t = np.arange(round(rate * seconds)) / rate
    tone = 0.5 * np.sin(2 * np.pi * freq * t)
    sf.write(path, np.stack([tone] * channels, axis=1), rate)


def dominant_frequency(wave: torch.Tensor, rate: int) -> float:
    spectrum = torch.fft.rfft(wave).abs()
    return float(spectrum.argmax()) * rate / len(wave)


@pytest.mark.parametrize(("source_rate", "channels"), [(44100, 2), (8000, 1)])
def test_files_are_resampled_to_the_configured_rate_and_mixed_to_mono(
    tmp_path: Path, source_rate: int, channels: int
) -> None:
    write_tone(tmp_path / "tone.wav", source_rate, 1.0, channels)
    wave = load_audio(tmp_path / "tone.wav", 16000)
    assert wave.ndim == 1 and wave.dtype == torch.float32
    assert abs(len(wave) - 16000) <= 1
    assert dominant_frequency(wave, 16000) == pytest.approx(440, abs=2)


def test_real_clips_load_and_batch(tmp_path: Path) -> None:
    dm = AudioFolderDataModule(
        str(ASSETS),
        sample_rate=16000,
        segment_seconds=0.25,
        batch_size=2,
        val_fraction=0.25,
        test_fraction=0.25,
    )
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch.shape == (2, 1, 4000) and batch.dtype == torch.float32
    assert 0 < batch.abs().max() <= 1
    assert sorted(len(v) for v in dm.split_files.values()) == [1, 1, 2]


def test_corrupt_file_is_skipped_with_a_warning_naming_it(tmp_path: Path, caplog) -> None:
    for clip in sorted(ASSETS.glob("*.wav")):
        (tmp_path / clip.name).write_bytes(clip.read_bytes())
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really audio")
    dm = AudioFolderDataModule(
        str(tmp_path), sample_rate=8000, val_fraction=0.25, test_fraction=0.25
    )
    with caplog.at_level(logging.WARNING):
        dm.setup()
    assert str(bad) in caplog.text
    kept = [p for files in dm.split_files.values() for p in files]
    assert len(kept) == 4 and bad not in kept


def test_empty_folder_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("no audio here")
    dm = AudioFolderDataModule(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no audio files"):
        dm.setup()


def test_missing_speech_package_names_the_install_command(tmp_path: Path) -> None:
    dm = AsteriskSpeechDataModule(root=str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match="apt-get install asterisk-core-sounds-en-wav"):
        dm.setup()


def test_split_is_by_file_seeded_and_deterministic(tmp_path: Path) -> None:
    for i in range(10):
        write_tone(tmp_path / f"{i:02d}.wav", 8000, 0.3, freq=200 + 50 * i)

    def splits(seed: int) -> dict[str, list[Path]]:
        dm = AudioFolderDataModule(
            str(tmp_path), sample_rate=8000, seed=seed, val_fraction=0.2, test_fraction=0.2
        )
        dm.setup()
        return dm.split_files

    first, again, other = splits(0), splits(0), splits(1)
    assert first == again and first != other
    names = [set(first[s]) for s in ("train", "val", "test")]
    assert sum(len(n) for n in names) == 10 and not (names[0] & names[1] | names[0] & names[2])


def test_random_crops_have_fixed_length_and_fixed_crops_cover_every_clip() -> None:
    clips = [torch.arange(1000.0), torch.arange(250.0)]
    random = RandomCropDataset(clips, 400)
    assert len(random) == 3  # 1000 // 400 = 2 crops of the long clip, 1 of the short one
    assert all(random[i].shape == (1, 400) for i in range(len(random)))
    fixed = FixedCropDataset(clips, 400)
    starts = [fixed[i][0, 0].item() for i in range(len(fixed))]
    assert starts == [0, 400, 600, 0]  # the last window of a long clip ends at its end
    assert fixed[3][0, 250:].abs().sum() == 0  # a short clip is zero-padded
    assert math.isclose(fixed[2][0, -1].item(), 999)
