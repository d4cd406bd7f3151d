"""Packaging (issue 16): declared dependencies, the SPDX license, extras for the optional
stacks that name themselves when missing, and `make train` installing no dev tools."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from src.utils import optional_stacks
from src.utils.optional_stacks import OPTIONAL_STACKS, MissingOptionalStack, check_optional_stacks

# the standard library reads TOML from Python 3.11 on (the project allows 3.10)
tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python >= 3.11")
ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[ ;]", r, maxsplit=1)[0].lower() for r in requirements}


def test_imported_yaml_is_declared() -> None:
    assert "pyyaml" in _names(PYPROJECT["dependencies"])


def test_license_is_an_spdx_string_with_its_file() -> None:
    assert PYPROJECT["license"] == "MIT"
    assert PYPROJECT["license-files"] == ["LICENSE"]
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")


def test_optional_stacks_are_extras_that_dev_installs() -> None:
    base = _names(PYPROJECT["dependencies"])
    extras = PYPROJECT["optional-dependencies"]
    assert "hydra-optuna-sweeper" not in base and "hydra-submitit-launcher" not in base
    assert _names(extras["sweep"]) == {"hydra-optuna-sweeper"}
    assert _names(extras["slurm"]) == {"hydra-submitit-launcher"}
    assert "vqzoo[sweep,slurm]" in extras["dev"]  # make test covers them
    assert {stack.extra for stack in OPTIONAL_STACKS} == {"sweep", "slurm"}


def test_make_train_installs_no_extras_and_make_test_installs_dev() -> None:
    makefile = (ROOT / "Makefile").read_text()
    base_recipe = makefile.split("$(STAMP): pyproject.toml", 1)[1].split("\n\n", 1)[0]
    assert "pip install --quiet -e .\n" in base_recipe + "\n" and "[dev]" not in base_recipe
    assert re.search(r"^train: \$\(STAMP\)$", makefile, flags=re.M)
    for target in ("test", "test-slow", "lint"):
        assert re.search(rf"^{target}: \$\(DEV_STAMP\)$", makefile, flags=re.M), target
    assert '-e ".[dev]"' in makefile.split("$(DEV_STAMP): $(STAMP)", 1)[1].split("\n\n", 1)[0]


@pytest.mark.parametrize(
    ("override", "extra"),
    [("hparams_search=mnist_vq_optuna", "sweep"), ("hydra/launcher=slurm", "slurm")],
)
def test_missing_optional_stack_names_its_extra(
    override: str, extra: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(optional_stacks, "_installed", lambda module: False)
    with pytest.raises(MissingOptionalStack, match=re.escape(f"pip install -e '.[{extra}]'")):
        check_optional_stacks(["-m", override, "trainer.max_epochs=3"])
    check_optional_stacks(["quantizer=vq"])  # nothing optional asked for


def test_every_config_that_needs_an_extra_is_guarded() -> None:
    """Configs naming the Optuna sweeper or submitit are selected by a guarded override."""
    for path in (ROOT / "configs").rglob("*.yaml"):
        text = path.read_text()
        group = path.parent.relative_to(ROOT / "configs").as_posix()
        if re.search(r"hydra_optuna_sweeper|/hydra/sweeper: optuna", text):
            assert group == "hparams_search", path
        if re.search(r"submitit_slurm|hydra_submitit_launcher", text):
            assert f"{group}={path.stem}" == "hydra/launcher=slurm", path
    options = {stack.option for stack in OPTIONAL_STACKS}
    assert options == {"hparams_search=", "hydra/launcher=slurm"}
