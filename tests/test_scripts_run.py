"""Every entry script under scripts/ starts as `python scripts/<name>.py`: run directly, Python
puts scripts/ first on sys.path, where scripts/tokenize.py (a fixed name) shadows the standard
library's tokenize, which torch imports through linecache; each script drops that path first."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENTRY_SCRIPTS = [
    "bench_prior",
    "bench_quantizers",
    "bench_tokenize",
    "compare",
    "reference_tests",
    "sample",
    "tokenize",
]


@pytest.mark.parametrize("name", ENTRY_SCRIPTS)
def test_entry_script_starts_and_prints_its_help(name: str) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / f"{name}.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "partially initialized module" not in result.stderr
    assert result.stdout.strip(), "printed no help"
