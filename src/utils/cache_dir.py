"""Where derived artefacts that are costly to rebuild (trained helper models, code caches) live."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["project_cache_dir"]

_REPO_ROOT = Path(__file__).resolve().parents[2]


def project_cache_dir(*parts: str) -> Path:
    """``$VQZOO_CACHE_DIR``, else ``$PROJECT_ROOT/.cache``, else ``<repo>/.cache`` (gitignored),
    joined with ``parts``; not created here (writers create what they write)."""
    root = os.environ.get("VQZOO_CACHE_DIR")
    if root is None:
        root = str(Path(os.environ.get("PROJECT_ROOT", _REPO_ROOT)) / ".cache")
    return Path(root).joinpath(*parts)
