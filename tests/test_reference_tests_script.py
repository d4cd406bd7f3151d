"""scripts/reference_tests.py: the reference's test files run against src.quantizers through
the `vector_quantize_pytorch` shim; passes, failures (a file that does not import counts all
of its tests) and tests needing an undeclared package are counted apart."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FILES = {
    # resolves to our FSQ through the shim, submodule import included
    "test_readme.py": """
import torch
from vector_quantize_pytorch.finite_scalar_quantization import FSQ as SubmoduleFSQ

def test_ours():
    from vector_quantize_pytorch import FSQ
    assert FSQ.__module__ == "src.quantizers.fsq" and SubmoduleFSQ is FSQ

def test_fails():
    assert False

def test_undeclared():
    import x_transformers_not_a_package  # noqa: F401
""",
    # imports a name the reference has and the shim lacks: both tests count as failures
    "test_lfq.py": """
from vector_quantize_pytorch.utils import QUANTIZE_KLASSES

def test_a():
    pass

def test_b():
    pass
""",
    "test_latent_quantization.py": "def test_x():\n    pass\n",
    "test_beam.py": "",
    "test_fsp.py": "",
}


@pytest.mark.slow  # three Python processes importing torch: ~1 min on a loaded 2-core box
def test_counts_passes_failures_and_undeclared_packages(tmp_path: Path) -> None:
    pytest.importorskip("vector_quantize_pytorch")  # the ids are collected against it
    checkout = tmp_path / "checkout"
    (checkout / "tests").mkdir(parents=True)
    for name, text in FILES.items():
        (checkout / "tests" / name).write_text(text)
    (checkout / "pyproject.toml").write_text('[project]\nname = "x"\ndependencies = []\n')
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "reference_tests.py"), str(checkout)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = result.stdout.strip().splitlines()
    assert "2 passed of 6; 3 failed; 1 need a package neither library declares" in summary[-2]
    assert "test_undeclared (needs x_transformers_not_a_package)" in summary[-1]


def test_refuses_a_checkout_without_the_test_files(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "reference_tests.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode != 0 and "pass a checkout of the reference repo" in result.stderr
