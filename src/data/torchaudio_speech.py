"""torchaudio's downloadable datasets (LibriSpeech, LJSpeech, YESNO, ...) as audio folders.

torchaudio only fetches and unpacks the archive; the files are then read like any folder
(soundfile, mono, resampled), so no torchaudio audio backend is needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torchaudio

from src.data.audio_folder import AudioFolderDataModule
from src.data.audio_io import list_audio_files

__all__ = ["TorchaudioSpeechDataModule"]


class TorchaudioSpeechDataModule(AudioFolderDataModule):
    """`torchaudio.datasets.<name>(root, download=..., **dataset_kwargs)`, split by file."""

    def __init__(
        self,
        name: str,
        root: str,
        download: bool = False,
        dataset_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(root=root, **kwargs)
        if not hasattr(torchaudio.datasets, name):
            raise ValueError(f"torchaudio.datasets has no dataset {name!r}")
        self.name = name
        self.download = bool(download)
        self.dataset_kwargs = dict(dataset_kwargs or {})

    def list_files(self) -> list[Path]:
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            dataset = getattr(torchaudio.datasets, self.name)(
                str(self.root), download=self.download, **self.dataset_kwargs
            )
        except (FileNotFoundError, RuntimeError) as err:
            raise FileNotFoundError(
                f"torchaudio dataset {self.name} not found under {str(self.root)!r}; "
                "pass data.download=true (needs internet) or point data.root at a copy"
            ) from err
        folder = Path(getattr(dataset, "_path", self.root))
        return list_audio_files(folder, self.extensions, self.recursive)
