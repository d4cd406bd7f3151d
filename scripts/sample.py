"""Sample a trained prior and decode the samples with its tokenizer:

    python scripts/sample.py ckpt_path=<prior ckpt> num_samples=64 [label=3] [temperature=1.0]
        [top_k=...] [top_p=...] [cfg_scale=...] [seed=0] [out=<file.png or folder>]

Images: one PNG grid; audio: one WAV per sample. The tokenizer is the one the prior was trained
on (its checkpoint path and fingerprint are stored in the prior's checkpoint); a missing or
changed tokenizer file is an error naming the path and the fingerprints.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# scripts/tokenize.py shares its name with the standard library's `tokenize`: keep scripts/ off
# the import path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "scripts"]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PROJECT_ROOT", str(ROOT))

import hydra  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from src.models.prior_io import load_prior, load_prior_tokenizer, save_samples  # noqa: E402
from src.utils.run_name import register_resolvers  # noqa: E402

register_resolvers()


def default_out(ckpt_path: Path, cfg: DictConfig, modality: str) -> Path:
    """<prior run>/samples/sample-seed=S[-label=L][-cfg=C](.png)."""
    run = ckpt_path.parent.parent if ckpt_path.parent.name == "checkpoints" else ckpt_path.parent
    name = f"sample-seed={cfg.seed}"
    if cfg.get("label") is not None:
        name += f"-label={cfg.label}"
    if cfg.get("cfg_scale") is not None:
        name += f"-cfg={cfg.cfg_scale}"
    return run / "samples" / (f"{name}.png" if modality == "image" else name)


def sample(cfg: DictConfig) -> list[Path]:
    """Draw, decode and write the samples; returns the files written."""
    if not cfg.get("ckpt_path"):
        raise ValueError("nothing to sample: pass ckpt_path=<prior run>/checkpoints/<name>.ckpt")
    ckpt_path = Path(cfg.ckpt_path).expanduser()
    prior = load_prior(ckpt_path, map_location=cfg.device)
    tokenizer = load_prior_tokenizer(prior.hparams, map_location=cfg.device)
    num = int(cfg.num_samples)
    labels = None
    if prior.layout.num_classes:
        if cfg.get("label") is None:
            labels = torch.arange(num) % prior.layout.num_classes
        else:
            labels = torch.full((num,), int(cfg.label), dtype=torch.long)
    elif cfg.get("label") is not None:
        raise ValueError(f"label={cfg.label} given, but this prior is unconditional")
    generator = torch.Generator(device=cfg.device).manual_seed(int(cfg.seed))
    codes = prior.sample_codes(
        num,
        labels,
        temperature=float(cfg.temperature),
        top_k=cfg.get("top_k"),
        top_p=cfg.get("top_p"),
        cfg_scale=cfg.get("cfg_scale"),
        generator=generator,
    )
    media = tokenizer.decode_codes(codes)
    modality = prior.hparams.modality
    out = Path(cfg.out) if cfg.get("out") else default_out(ckpt_path, cfg, modality)
    files, _ = save_samples(
        media, modality, out, prior.hparams.get("sample_rate"), int(cfg.images_per_row)
    )
    where = files[0] if modality == "image" else f"{len(files)} WAV files in {out}"
    print(f"wrote {num} samples: {where}")
    return files


@hydra.main(version_base="1.3", config_path="../configs", config_name="sample.yaml")
def main(cfg: DictConfig) -> None:
    sample(cfg)


if __name__ == "__main__":
    main()
