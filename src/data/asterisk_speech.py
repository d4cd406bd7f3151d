"""Real recorded speech available offline: the Asterisk English prompts read by Allison Smith.

About 25 minutes of one speaker at 8 kHz in 568 WAVs (CC-BY-SA-3.0), shipped by the Debian
package ``asterisk-core-sounds-en-wav``; ``make audio-data`` installs it (as root, via apt-get).
"""

from __future__ import annotations

from pathlib import Path

from src.data.audio_folder import AudioFolderDataModule

__all__ = ["ALLISON_DIR", "INSTALL_HINT", "AsteriskSpeechDataModule"]

ALLISON_DIR = "/usr/share/asterisk/sounds/en_US_f_Allison"
INSTALL_HINT = (
    "install it with `sudo apt-get install asterisk-core-sounds-en-wav` (Debian/Ubuntu), or run "
    "`make audio-data` as root, or pass data.root=<folder of your own recordings>"
)


class AsteriskSpeechDataModule(AudioFolderDataModule):
    """The Allison prompts as an audio folder (every keyword of `AudioFolderDataModule`)."""

    def __init__(self, root: str = ALLISON_DIR, sample_rate: int = 8000, **kwargs: object) -> None:
        super().__init__(root=root, sample_rate=sample_rate, **kwargs)

    def list_files(self) -> list[Path]:
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"the speech recordings are missing: {str(self.root)!r} does not exist; "
                + INSTALL_HINT
            )
        return super().list_files()
