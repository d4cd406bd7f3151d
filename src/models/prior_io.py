"""A trained prior from its checkpoint, the tokenizer that decodes its samples, and the files
its samples are written to (a PNG grid of images, or one WAV per clip).

The prior's hyperparameters name its tokenizer (`tokenizer_ckpt`) and that tokenizer's
`tokenizer_fingerprint` (hash of config + weights): samples are decoded only by that exact
tokenizer; a missing or changed file is an error naming the path and both fingerprints.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import soundfile as sf
import torch
from torch import Tensor
from torchvision.utils import make_grid, save_image

from src.models.codes_api import CodesAPI
from src.models.load import load_tokenizer, read_checkpoint
from src.models.prior import CodePrior


class TokenizerMismatchError(ValueError):
    """The tokenizer file a prior names is missing or holds another tokenizer."""


def load_prior(ckpt_path: str | Path, map_location: str | torch.device = "cpu") -> CodePrior:
    """The CodePrior stored in a checkpoint written by train.py (eval mode)."""
    path = Path(ckpt_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"prior checkpoint not found: {path}")
    checkpoint = read_checkpoint(path)
    hparams = checkpoint.get("hyper_parameters") or {}
    if "net" not in hparams or "codebook_sizes" not in hparams:
        raise ValueError(
            f"{path} is not a prior checkpoint (its hyperparameters have no net / "
            "codebook_sizes): pass the .ckpt of a run of experiment=mnist_prior or audio_prior"
        )
    prior = CodePrior(**hparams)
    prior.load_state_dict(checkpoint["state_dict"])
    return prior.to(map_location).eval()


def load_prior_tokenizer(
    hparams: Mapping[str, Any], map_location: str | torch.device = "cpu"
) -> CodesAPI:
    """The tokenizer named by a prior's hyperparameters, after checking its fingerprint."""
    path = hparams.get("tokenizer_ckpt")
    expected = hparams.get("tokenizer_fingerprint")
    if not path:
        raise TokenizerMismatchError("the prior names no tokenizer checkpoint (tokenizer_ckpt)")
    if not Path(path).is_file():
        raise TokenizerMismatchError(
            f"the prior's tokenizer checkpoint {path} (fingerprint {expected}) is missing: "
            "restore that file; samples can only be decoded by the tokenizer the prior learned"
        )
    tokenizer = load_tokenizer(path, map_location=map_location)
    found = tokenizer.fingerprint
    if expected and found != expected:
        raise TokenizerMismatchError(
            f"the tokenizer checkpoint {path} has changed: its fingerprint is {found}, the prior "
            f"was trained on the codes of {expected}; restore the original file (its codes "
            "would be decoded into the wrong images / audio)"
        )
    return tokenizer


def save_samples(
    media: Tensor,
    modality: str,
    out: str | Path,
    sample_rate: int | None = None,
    images_per_row: int = 8,
) -> tuple[list[Path], Tensor]:
    """Write decoded samples: images (B, C, H, W) in [0, 1] as one PNG grid at `out` (a .png
    path), audio (B, 1, T) as `out/sample_NN.wav`. Returns the files and what loggers get (the
    grid image, or the clips)."""
    out = Path(out)
    if modality == "image":
        grid = make_grid(media.float().cpu().clamp(0, 1), nrow=images_per_row, pad_value=1.0)
        out.parent.mkdir(parents=True, exist_ok=True)
        save_image(grid, out)
        return [out], grid
    if modality == "audio":
        if not sample_rate:
            raise ValueError("audio samples need the tokenizer's sample_rate")
        out.mkdir(parents=True, exist_ok=True)
        clips = media.float().cpu().reshape(media.shape[0], -1).clamp(-1, 1)
        files = []
        for i, clip in enumerate(clips):
            files.append(out / f"sample_{i:02d}.wav")
            sf.write(files[-1], clip.numpy(), int(sample_rate), subtype="PCM_16")
        return files, clips
    raise ValueError(f"unknown modality {modality!r}: expected 'image' or 'audio'")
