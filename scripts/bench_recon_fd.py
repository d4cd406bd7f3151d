"""Benchmark (issue 15): how real MNIST reconstructions look to the stage-2 digit classifier.

    python scripts/bench_recon_fd.py <tokenizer.ckpt> [<tokenizer.ckpt> ...] [--threads 2]

For each checkpoint (e.g. the step checkpoints of `experiment=mnist_fsq` and of
`experiment=mnist_fsq_gan`), reconstructs the 500 test digits of the embedded split and prints
the Frechet distance of their classifier features to the test digits' (src/metrics/frechet.py,
the classifier of src/metrics/digit_classifier.py; lower = closer to real digits) and the mean
per-image PSNR (dB) of the clamped reconstructions, one markdown row per checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# keep scripts/ off the import path: scripts/tokenize.py would shadow the standard library's
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "scripts"]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PROJECT_ROOT", str(ROOT))

import torch  # noqa: E402


def evaluate(ckpt: Path, images: torch.Tensor, classifier) -> dict[str, float]:
    """FD to the real test digits and mean per-image PSNR of one checkpoint's reconstructions."""
    from src.metrics.frechet import frechet_distance
    from src.models import load_tokenizer

    tokenizer = load_tokenizer(ckpt)
    recons = torch.cat(
        [tokenizer.decode_codes(tokenizer.encode_codes(c)) for c in images.split(100)]
    )
    mse = (recons - images).pow(2).flatten(1).mean(1).clamp_min(1e-12)
    return {
        "step": int(torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"]),
        "fd": frechet_distance(recons, images, classifier),
        "psnr": float((-10 * mse.log10()).mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ckpts", nargs="+", type=Path, help="tokenizer checkpoints")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from src.data.embedded_mnist_labels import mnist_5k_split
    from src.metrics.digit_classifier import load_digit_classifier

    images, _ = mnist_5k_split("test")
    classifier = load_digit_classifier()  # outside no_grad: trains it (~30 s) if not cached
    print("| checkpoint | step | test recon FD | test PSNR (dB, per image) |")
    print("| --- | --- | --- | --- |")
    for ckpt in args.ckpts:
        with torch.no_grad():
            row = evaluate(ckpt, images, classifier)
        print(f"| {ckpt} | {row['step']} | {row['fd']:.3f} | {row['psnr']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
