"""Run the reference library's own tests against `src.quantizers` through a module-name shim.

The tests of vector-quantize-pytorch (its repository's `tests/`) import `vector_quantize_pytorch`
and its submodules; this script runs them with those names bound to our modules (entries in
`sys.modules`, made before collection), and reports passed / failed counts. Nothing of the
reference is copied here: point the script at a checkout of its repository (no network at run
time):

    git clone https://github.com/lucidrains/vector-quantize-pytorch /tmp/vqp
    python scripts/reference_tests.py /tmp/vqp                 # our zoo through the shim
    python scripts/reference_tests.py /tmp/vqp --reference     # the installed library itself
    python scripts/reference_tests.py /tmp/vqp --show-failures # each failure's last line

The test ids are collected against the installed reference library first (a file that does not
import through the shim still counts all of its tests, as failures). A test that fails on a
missing package that neither library declares (their `[project]` dependencies and extras, e.g.
`x_transformers` of the reference's `test_fvq`) is counted apart, with the package named.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import types
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# run as a script, Python puts scripts/ first on sys.path, where scripts/tokenize.py would
# shadow the standard library's tokenize (imported by torch through linecache)
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "scripts"]
sys.path.insert(0, str(ROOT))

TEST_FILES = (
    "test_readme.py",
    "test_lfq.py",
    "test_latent_quantization.py",
    "test_beam.py",
    "test_fsp.py",
)
PACKAGE = "vector_quantize_pytorch"
# the reference's submodules -> ours (a module of ours that does not exist is left unbound, so
# a test importing it fails as it would for a user)
SUBMODULES = {
    "vector_quantize_pytorch": "src.quantizers.vector_quantize",
    "residual_vq": "src.quantizers.residual_vq",
    "random_projection_quantizer": "src.quantizers.random_projection",
    "finite_scalar_quantization": "src.quantizers.fsq",
    "finite_scalar_perturbation": "src.quantizers.fsp",
    "lookup_free_quantization": "src.quantizers.lfq",
    "evo_lookup_free_quantization": "src.quantizers.evo_lfq",
    "residual_lfq": "src.quantizers.residual_lfq",
    "residual_fsq": "src.quantizers.residual_fsq",
    "latent_quantization": "src.quantizers.latent_quantize",
    "sim_vq": "src.quantizers.simvq",
    "residual_sim_vq": "src.quantizers.residual_simvq",
    "binary_mapper": "src.quantizers.binary_mapper",
    "hierarchical_vq": "src.quantizers.hierarchical_vq",
    "utils": "src.quantizers.sequential",
}


def install_shim() -> None:
    """Bind `vector_quantize_pytorch` (and its submodules) to `src.quantizers`."""
    import importlib

    import src.quantizers as ours

    package = types.ModuleType(PACKAGE, "vqzoo's src.quantizers under the reference's name")
    package.__path__ = []  # a package: submodules resolve through sys.modules only
    for name in ours.__all__:
        setattr(package, name, getattr(ours, name))
    sys.modules[PACKAGE] = package
    for short, target in SUBMODULES.items():
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as error:
            if error.name != target:
                raise
            continue
        sys.modules[f"{PACKAGE}.{short}"] = module
        setattr(package, short, module)


class Recorder:
    """pytest plugin: the outcome of every test id (a failure keeps its message)."""

    def __init__(self, shim: bool) -> None:
        self.shim = shim
        self.collected: list[str] = []
        self.outcomes: dict[str, dict[str, str]] = {}

    def pytest_configure(self, config: Any) -> None:
        if self.shim:
            install_shim()

    def pytest_collection_modifyitems(self, items: list[Any]) -> None:
        self.collected = [item.nodeid for item in items]

    def pytest_collectreport(self, report: Any) -> None:
        if report.failed:  # a file that does not import: its tests never run
            self.outcomes[f"<collect>{report.nodeid}"] = {
                "outcome": "failed",
                "message": str(report.longrepr),
            }

    def pytest_runtest_logreport(self, report: Any) -> None:
        if report.when == "call" or report.failed or report.skipped:
            previous = self.outcomes.get(report.nodeid, {}).get("outcome")
            if previous == "failed":
                return
            self.outcomes[report.nodeid] = {
                "outcome": report.outcome,
                "message": str(report.longrepr) if report.failed else "",
            }


def run_phase(tests: Path, shim: bool, collect_only: bool, output: Path) -> int:
    """One pytest run in this process; results as JSON in `output`."""
    import pytest

    recorder = Recorder(shim)
    ini = tests / "pytest.ini"  # an empty config: neither project's pytest settings apply
    ini.write_text("[pytest]\n")
    args = [str(tests), "-c", str(ini), "--rootdir", str(tests), "-q", "-p", "no:cacheprovider"]
    args.append("--continue-on-collection-errors")
    if collect_only:
        args.append("--collect-only")
    code = pytest.main(args, plugins=[recorder])
    output.write_text(json.dumps({"collected": recorder.collected, "outcomes": recorder.outcomes}))
    return int(code)


def declared_packages(checkout: Path) -> set[str]:
    """Import names of the packages both projects declare (dependencies and extras)."""
    import tomllib  # Python 3.11+ (the project's venv); the zoo itself supports 3.10

    names: set[str] = set()
    for pyproject in (ROOT / "pyproject.toml", checkout / "pyproject.toml"):
        if not pyproject.is_file():
            continue
        project = tomllib.loads(pyproject.read_text()).get("project", {})
        specs = list(project.get("dependencies", []))
        for extra in project.get("optional-dependencies", {}).values():
            specs.extend(extra)
        for spec in specs:
            name = re.split(r"[\s\[<>=!~;]", spec, maxsplit=1)[0]
            names.add(name.lower().replace("-", "_"))
    return names


def missing_package(message: str) -> str | None:
    found = re.search(r"ModuleNotFoundError: No module named '([\w.]+)'", message)
    return found.group(1).split(".")[0] if found else None


def summarise(checkout: Path, ids: list[str], result: dict[str, Any], show: bool) -> dict:
    declared = declared_packages(checkout) | {PACKAGE, "src"}
    outcomes = result["outcomes"]
    passed, failed, undeclared = [], [], {}
    for test_id in ids:
        outcome = outcomes.get(test_id)
        if outcome is None:  # not collected: its file did not import
            file = test_id.split("::")[0]
            collect = next((v for k, v in outcomes.items() if k.endswith(file)), None)
            outcome = collect or {"outcome": "failed", "message": "not collected"}
        if outcome["outcome"] == "passed":
            passed.append(test_id)
            continue
        package = missing_package(outcome["message"])
        if package is not None and package not in declared:
            undeclared[test_id] = package
            continue
        failed.append(test_id)
        if show:
            lines = [ln for ln in outcome["message"].splitlines() if ln.strip()]
            last = next((ln for ln in reversed(lines) if ln.startswith("E ")), lines[-1:] or [""])
            print(f"FAILED {test_id}: {str(last).strip()[:200]}")
    return {"total": len(ids), "passed": passed, "failed": failed, "undeclared": undeclared}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkout", type=Path, help="a checkout of vector-quantize-pytorch")
    parser.add_argument("--reference", action="store_true", help="run the installed library")
    parser.add_argument("--show-failures", action="store_true")
    parser.add_argument("--phase", choices=["collect", "run"], help=argparse.SUPPRESS)
    parser.add_argument("--tests", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--shim", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.phase:  # a child process: one pytest run
        sys.exit(run_phase(args.tests, args.shim, args.phase == "collect", args.output))

    source = args.checkout / "tests"
    missing = [name for name in TEST_FILES if not (source / name).is_file()]
    if missing:
        sys.exit(f"{source} lacks {', '.join(missing)}: pass a checkout of the reference repo")
    with tempfile.TemporaryDirectory(prefix="reference_tests_") as tmp:
        tests = Path(tmp) / "tests"
        tests.mkdir()
        for name in TEST_FILES:  # only the test files: the checkout's package stays off the path
            (tests / name).write_text((source / name).read_text())

        def child(phase: str, shim: bool) -> dict:
            output = Path(tmp) / f"{phase}.json"
            command = [sys.executable, __file__, str(args.checkout), "--phase", phase]
            command += ["--tests", str(tests), "--output", str(output)]
            subprocess.run([*command, "--shim"] if shim else command, cwd=tmp, check=False)
            return json.loads(output.read_text())

        ids = child("collect", shim=False)["collected"]  # against the installed reference
        result = child("run", shim=not args.reference)
        summary = summarise(args.checkout, ids, result, args.show_failures)

    target = "installed vector_quantize_pytorch" if args.reference else "src.quantizers (shim)"
    print(
        f"\nreference tests against {target}: {len(summary['passed'])} passed of "
        f"{summary['total']}; {len(summary['failed'])} failed; "
        f"{len(summary['undeclared'])} need a package neither library declares"
    )
    for test_id, package in summary["undeclared"].items():
        print(f"  apart: {test_id} (needs {package})")


if __name__ == "__main__":
    main()
