"""Benchmark: tokenizing the 5000 embedded MNIST digits (train + val + test) with the default
experiment's tokenizer, through the code cache that scripts/tokenize.py uses.

    python scripts/bench_tokenize.py [--ckpt <tokenizer.ckpt>] [--threads 2] [--repeats 3]

Without --ckpt the default experiment's ImageTokenizer (configs/train.yaml: FSQ, channels
[16, 32, 64]) is built untrained: the weights do not change the work. Each repeat writes a
fresh cache into a temporary directory (nothing is reused) and reports wall time and the
process's CPU time; the load average is printed beside them, since the box may be shared.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# keep scripts/ off the import path: scripts/tokenize.py would shadow the standard library's
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "scripts"]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PROJECT_ROOT", str(ROOT))

import torch  # noqa: E402

from src.data import EmbeddedMNISTDataModule  # noqa: E402
from src.data.code_cache import tokenize_splits  # noqa: E402


def default_tokenizer() -> torch.nn.Module:
    """The default experiment's model, composed from configs/ as train.py would."""
    import hydra
    from hydra import compose, initialize_config_dir

    from src.utils.run_name import register_resolvers

    register_resolvers()
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "configs")):
        cfg = compose("train", overrides=["model.in_channels=1"])
    return hydra.utils.instantiate(cfg.model, _convert_="all").eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", help="a tokenizer checkpoint (default: untrained default model)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.ckpt:
        from src.models import load_tokenizer

        tokenizer = load_tokenizer(args.ckpt)
    else:
        tokenizer = default_tokenizer()
    datamodule = EmbeddedMNISTDataModule()
    datamodule.setup()
    print(f"torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}")
    for repeat in range(args.repeats):
        load_before = os.getloadavg()[0]
        with tempfile.TemporaryDirectory() as out:
            wall, cpu = time.perf_counter(), time.process_time()
            cache = tokenize_splits(
                tokenizer, datamodule, Path(out), progress=False, log=lambda _: None,
                batch_size=args.batch_size,
            )  # fmt: skip
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        items = sum(cache.count(s) for s in cache.splits)
        print(
            f"repeat {repeat}: {items} items in {wall:.2f} s wall, {cpu:.2f} s CPU "
            f"({items / wall:.0f} items/s); load average {load_before:.1f} -> "
            f"{os.getloadavg()[0]:.1f}"
        )


if __name__ == "__main__":
    main()
