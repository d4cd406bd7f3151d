"""Find a user's media files in a folder, with errors that name the folder and the extensions."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def list_media_files(
    root: Path, extensions: Sequence[str], recursive: bool = True, kind: str = "media"
) -> list[Path]:
    """Sorted paths under ``root`` whose suffix (any case) is in ``extensions``.

    ``kind`` ("image", "audio") only words the errors for a missing folder or no match.
    """
    if not root.is_dir():
        raise FileNotFoundError(
            f"{kind} folder {str(root)!r} does not exist or is not a directory "
            f"(looking for {', '.join(extensions)} files)"
        )
    wanted = {ext.lower() if ext.startswith(".") else f".{ext.lower()}" for ext in extensions}
    candidates = root.rglob("*") if recursive else root.iterdir()
    files = [p for p in candidates if p.is_file() and p.suffix.lower() in wanted]
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise FileNotFoundError(
            f"no {kind} files with extensions {', '.join(sorted(wanted))} found in {str(root)!r}"
            f"{' or its subfolders' if recursive else ''}"
        )
    return files
