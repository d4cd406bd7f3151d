"""Write the codes of every split of a dataset with a trained tokenizer:

    python scripts/tokenize.py ckpt_path=<run>/checkpoints/last.ckpt [data=<name>] [out_dir=<dir>]

Writes `<split>_codes.npy` (N, *grid, Q) in the smallest integer dtype, `<split>_labels.npy`
where the dataset has labels, and `manifest.json` (tokenizer checkpoint and fingerprint, grid,
Q, codebook sizes, counts, dtype): see src/data/code_cache.py. Running it again with the same
tokenizer and data reuses the files; another tokenizer's codes in `out_dir` are rewritten.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# This file shares its name with the standard library's `tokenize` (which linecache, inspect
# and others import): keep scripts/ off the import path so they find the real one.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "scripts"]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PROJECT_ROOT", str(ROOT))

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from src.data.code_cache import CodeCache, codes_for_checkpoint  # noqa: E402
from src.utils.run_name import register_resolvers  # noqa: E402

register_resolvers()


def tokenize(cfg: DictConfig) -> CodeCache:
    """Tokenize (or reuse) the splits named in `cfg`; returns the code cache."""
    if not cfg.get("ckpt_path"):
        raise ValueError("nothing to tokenize: pass ckpt_path=<run>/checkpoints/last.ckpt")
    data = cfg.get("data")
    cache = codes_for_checkpoint(
        cfg.ckpt_path,
        cfg.get("out_dir"),
        data_config=None if data is None else OmegaConf.to_container(data, resolve=True),
        splits=list(cfg.splits),
        batch_size=int(cfg.batch_size),
        map_location=str(cfg.device),
        progress=bool(cfg.progress),
    )
    sizes = cache.codebook_sizes
    shown = f"{sizes[0]} x {len(sizes)}" if len(set(sizes)) == 1 else str(list(sizes))
    print(
        f"codes: {cache.directory}  grid {list(cache.grid)}  Q={cache.num_codebooks}  "
        f"codebook sizes {shown}  dtype {cache.manifest['dtype']}  "
        f"fingerprint {cache.fingerprint[:16]}"
    )
    return cache


@hydra.main(version_base="1.3", config_path="../configs", config_name="tokenize.yaml")
def main(cfg: DictConfig) -> None:
    tokenize(cfg)


if __name__ == "__main__":
    main()
