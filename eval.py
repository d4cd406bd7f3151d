"""Evaluate a checkpoint: `python eval.py ckpt_path=<run>/checkpoints/last.ckpt`.

The checkpoint carries its run's resolved config, so the model and data are rebuilt exactly as
trained and the validation metrics reproduce those the run logged.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))

from src.callbacks.config_in_checkpoint import CONFIG_KEY
from src.utils.config_checks import check_quantizer_config, model_overrides
from src.utils.instantiate import instantiate_loggers
from src.utils.report import print_results

log = logging.getLogger(__name__)


def load_run(ckpt_path: str, run_overrides: list[str]) -> tuple[dict[str, Any], DictConfig]:
    """The checkpoint (loaded with weights_only=True) and its run config with overrides applied."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path} (pass ckpt_path=<path to .ckpt>)")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if CONFIG_KEY not in checkpoint:
        raise ValueError(
            f"{path} holds no run config (key {CONFIG_KEY!r}); "
            "it was not written by vqzoo's train.py"
        )
    run_cfg = OmegaConf.create(checkpoint[CONFIG_KEY])
    run_cfg.merge_with_dotlist(list(run_overrides))
    return checkpoint, run_cfg


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Validate (and test) the checkpoint's weights on the data split of the run that wrote it."""
    checkpoint, run_cfg = load_run(cfg.ckpt_path, cfg.get("run_overrides") or [])
    check_quantizer_config(run_cfg)
    datamodule: L.LightningDataModule = hydra.utils.instantiate(run_cfg.data)
    model: L.LightningModule = hydra.utils.instantiate(
        run_cfg.model, _convert_="all", **model_overrides(run_cfg, datamodule)
    )
    model.load_state_dict(checkpoint["state_dict"])
    loggers = instantiate_loggers(cfg.get("logger"))
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, logger=loggers, callbacks=[])
    metrics: dict[str, float] = {}
    for result in trainer.validate(model, datamodule=datamodule, verbose=False):
        metrics.update(result)
    if cfg.get("test"):
        for result in trainer.test(model, datamodule=datamodule, verbose=False):
            metrics.update(result)
    for logger in loggers:
        logger.finalize("success")
    if trainer.is_global_zero:
        print_results(
            metrics, {"checkpoint": cfg.ckpt_path, "step": str(checkpoint.get("global_step"))}
        )
    return metrics


@hydra.main(version_base="1.3", config_path="configs", config_name="eval.yaml")
def main(cfg: DictConfig) -> None:
    if cfg.extras.get("ignore_warnings"):
        warnings.filterwarnings("ignore")
    evaluate(cfg)


if __name__ == "__main__":
    main()
