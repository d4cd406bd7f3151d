"""Train a tokenizer: `python train.py [group=option ...] [key=value ...]` (configs/train.yaml)."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))

from src.callbacks import ConfigInCheckpoint
from src.utils.config_checks import check_quantizer_config, model_overrides
from src.utils.ddp_multirun import ddp_job_scope
from src.utils.instantiate import instantiate_callbacks, instantiate_loggers
from src.utils.report import print_config_tree, print_results
from src.utils.run_files import final_metrics, run_files

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit, then test the best checkpoint; returns the final validation and test metrics."""
    check_quantizer_config(cfg)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)

    datamodule: L.LightningDataModule = hydra.utils.instantiate(cfg.data)
    model: L.LightningModule = hydra.utils.instantiate(
        cfg.model, _convert_="all", **model_overrides(cfg, datamodule)
    )
    callbacks = instantiate_callbacks(cfg.get("callbacks"))
    callbacks.append(ConfigInCheckpoint(OmegaConf.to_container(cfg, resolve=True)))
    loggers = instantiate_loggers(cfg.get("logger"))
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    metrics: dict[str, float] = {}
    files: dict[str, Path | None] = {}
    try:
        if cfg.get("train"):
            trainer.fit(
                model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True
            )
            # read now: testing a checkpoint restores the callbacks' state as it was at save time
            metrics.update(final_metrics(trainer))
            files = run_files(trainer)
        if cfg.get("test"):
            ckpt_path = cfg.get("ckpt_path")
            if cfg.get("train") and trainer.checkpoint_callback:
                ckpt_path = trainer.checkpoint_callback.best_model_path or ckpt_path
            if not ckpt_path:
                log.warning("no checkpoint to test: testing the current weights")
            trainer.test(
                model, datamodule=datamodule, ckpt_path=ckpt_path or None, weights_only=True
            )
            metrics.update(final_metrics(trainer, prefixes=("test/",)))
            files = files or run_files(trainer)
    finally:
        for logger in loggers:
            logger.finalize("success")

    if trainer.is_global_zero:
        print_results(metrics, files)
    return metrics


@hydra.main(version_base="1.3", config_path="configs", config_name="train.yaml")
def main(cfg: DictConfig) -> Any:
    if cfg.extras.get("ignore_warnings"):
        warnings.filterwarnings("ignore")
    if cfg.extras.get("print_config"):
        print_config_tree(cfg)
    with ddp_job_scope():  # under DDP, a multirun job's ranks run only that job
        metrics = train(cfg)
    return metrics.get(cfg.get("optimized_metric") or "")


if __name__ == "__main__":
    main()
