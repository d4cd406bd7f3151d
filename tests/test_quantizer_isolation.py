"""src/quantizers/ stands alone: no module there imports (or reaches through `torch.`)
torch.distributed, Lightning or Hydra, nor anything else from src/; read with `ast`, so
docstrings and comments that name them do not count."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.helpers import ROOT

QUANTIZERS = ROOT / "src" / "quantizers"
FORBIDDEN = ("torch.distributed", "lightning", "pytorch_lightning", "hydra")
OWN_PACKAGE = "src.quantizers"
IMPORT_CALLS = {"import_module", "__import__"}


def _forbidden(module: str) -> bool:
    """A framework module, or a part of src/ other than the quantizers (`src` itself is only
    the namespace: `from src import models` is caught as `src.models`)."""
    own = module == OWN_PACKAGE or module.startswith(f"{OWN_PACKAGE}.")
    if module.startswith("src.") and not own:
        return True
    return any(module == root or module.startswith(f"{root}.") for root in FORBIDDEN)


def _from_module(node: ast.ImportFrom, package: str) -> str:
    """The absolute module of `from <module> import ...`, relative ones resolved in `package`."""
    if node.level == 0:
        return node.module or ""
    parts = package.split(".")
    base = parts[: len(parts) - node.level + 1] if node.level <= len(parts) else []
    return ".".join([*base, node.module] if node.module else base)


def _imported_modules(tree: ast.AST, package: str) -> list[tuple[int, str]]:
    """(line, dotted name) of every import, `from a import b` counted as `a` and `a.b`,
    plus string arguments of importlib.import_module / __import__ calls and `torch.distributed`
    attribute chains."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = _from_module(node, package)
            found.append((node.lineno, module))
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            first = node.args[0]
            if name in IMPORT_CALLS and isinstance(first, ast.Constant):
                found.append((node.lineno, str(first.value)))
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            found.append((node.lineno, f"{node.value.id}.{node.attr}"))
    return found


def violations(source: str, package: str = OWN_PACKAGE) -> list[str]:
    """`line: module` for each forbidden import in the source of a module of `package`."""
    found = _imported_modules(ast.parse(source), package)
    return [f"{line}: {name}" for line, name in found if _forbidden(name)]


def _modules() -> list[Path]:
    return sorted(QUANTIZERS.rglob("*.py"))


def _package(path: Path) -> str:
    folder = path.parent.relative_to(ROOT)
    return ".".join(folder.parts)


def test_the_scan_sees_every_quantizer_module() -> None:
    names = {p.relative_to(QUANTIZERS).as_posix() for p in _modules()}
    assert {"__init__.py", "communicator.py", "vq_state.py", "kernels/__init__.py"} <= names


@pytest.mark.parametrize("path", _modules(), ids=lambda p: p.relative_to(QUANTIZERS).as_posix())
def test_quantizer_module_imports_no_framework(path: Path) -> None:
    assert violations(path.read_text(), _package(path)) == []


@pytest.mark.parametrize(
    "source",
    [
        "import torch.distributed as dist",
        "from torch import distributed",
        "from torch.distributed import all_reduce",
        "import torch\ndef f(t):\n    return torch.distributed.all_reduce(t)",
        "import lightning.pytorch as pl",
        "from pytorch_lightning import LightningModule",
        "def f():\n    from hydra.utils import instantiate",
        "import importlib\nm = importlib.import_module('lightning')",
        "from src.models.image_tokenizer import ImageTokenizer",
        "from ..models import image_tokenizer",
    ],
)
def test_the_scan_catches_each_kind_of_import(source: str) -> None:
    assert violations(source) != []


def test_relative_imports_resolve_in_the_modules_package() -> None:
    assert violations("from ..communicator import Communicator", "src.quantizers.kernels") == []
    assert violations("from .. import models", "src.quantizers") == ["1: src.models"]


def test_the_scan_ignores_text_and_allowed_imports() -> None:
    source = '''"""Needs no torch.distributed, lightning or hydra."""
# import lightning
import torch
from torch import nn
from src.quantizers.communicator import Communicator
from src.quantizers.kernels import cluster_statistics
from . import fsq
NOTE = "import hydra"
x = torch.nn.functional
'''
    assert violations(source) == []
