"""Forward+backward throughput and peak memory: vqzoo quantizers vs vector-quantize-pytorch.

    python scripts/bench_quantizers.py                 # every case, table on stdout
    python scripts/bench_quantizers.py --only vq       # cases whose name contains "vq"
    python scripts/bench_quantizers.py --no-reference  # ours only

The reference library is a bench-only dependency: `pip install vector-quantize-pytorch==1.32.0`.
Each family contributes its cases from its own module (scripts/bench_cases_*.py).
"""

from __future__ import annotations

import argparse
import importlib
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# run as a script, Python puts scripts/ first on sys.path, where scripts/tokenize.py would
# shadow the standard library's tokenize (imported by torch through linecache)
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "scripts"]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from scripts.bench_common import Case, bench_case, markdown_table  # noqa: E402

CASE_MODULES = (
    "scripts.bench_cases_vq",
    "scripts.bench_cases_scalar",
    "scripts.bench_cases_search",
)


def all_cases() -> list[Case]:
    cases: list[Case] = []
    for name in CASE_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as error:
            if error.name != name:
                raise
            continue
        cases.extend(module.cases())
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="run cases whose name contains this text")
    parser.add_argument("--no-reference", action="store_true", help="skip the reference library")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, python {platform.python_version()}",
        flush=True,
    )
    rows = []
    for case in all_cases():
        if args.only and args.only not in case.name:
            continue
        print(f"running {case.name} ...", file=sys.stderr, flush=True)
        rows.append((case, bench_case(case, with_reference=not args.no_reference)))
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
