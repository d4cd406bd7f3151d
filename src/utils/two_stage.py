"""The second stage of a two-stage run (experiment=mnist_two_stage): after train.py has trained
and tested the tokenizer, train a prior on its best checkpoint's codes in `<run dir>/prior`.

The prior stage is train.py's own `train()` on the config `experiment=<two_stage.experiment>
tokenizer_ckpt=<best tokenizer checkpoint>` plus `two_stage.overrides`, composed with the same
seed and run name, so resuming a two-stage run resumes whichever stage it stopped in.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig

log = logging.getLogger(__name__)

PRIOR_DIR = "prior"  # the prior stage's run directory inside the tokenizer's


def best_tokenizer_checkpoint(run_dir: Path) -> Path:
    """The best checkpoint the tokenizer stage kept (`epoch_*.ckpt`, else last.ckpt)."""
    folder = run_dir / "checkpoints"
    best = sorted(folder.glob("epoch_*.ckpt"))
    path = best[-1] if best else folder / "last.ckpt"
    if not path.is_file():
        raise FileNotFoundError(
            f"two-stage run: no tokenizer checkpoint in {folder} for the prior stage"
        )
    return path


def prior_stage_config(cfg: DictConfig, tokenizer_ckpt: Path) -> DictConfig:
    """The prior stage's config, composed like a command line inside the current Hydra job."""
    from hydra import compose

    stage = cfg.two_stage
    out = Path(cfg.paths.output_dir) / PRIOR_DIR
    overrides = [
        f"experiment={stage.experiment}",
        f"tokenizer_ckpt={tokenizer_ckpt}",
        f"seed={cfg.seed}",
        f"paths.output_dir={out}",
    ]
    if cfg.get("run_name") is not None:
        overrides.append(f"run_name={cfg.run_name}")
    overrides += [str(o) for o in stage.get("overrides") or []]
    return compose(config_name="train", overrides=overrides)


def run_prior_stage(cfg: DictConfig, train: Callable[[DictConfig], dict]) -> dict[str, float]:
    """Train and test the prior on the tokenizer stage's best checkpoint; its final metrics
    prefixed `prior/` (its own run files are in `<run dir>/prior`)."""
    tokenizer_ckpt = best_tokenizer_checkpoint(Path(cfg.paths.output_dir))
    log.info("two-stage run: training the prior on %s", tokenizer_ckpt)
    metrics = train(prior_stage_config(cfg, tokenizer_ckpt))
    return {f"{PRIOR_DIR}/{name}": value for name, value in metrics.items()}
