"""Evaluate a checkpoint: `python eval.py ckpt_path=<run>/checkpoints/last.ckpt`, or every
checkpoint a training run writes: `python eval.py watch=<run>/checkpoints` (evaluate-continuously).

The checkpoint carries its run's resolved config, so the model and data are rebuilt exactly as
trained and the validation metrics reproduce those the run logged. In watch mode the metrics of
each checkpoint are logged at that checkpoint's global step (src/utils/checkpoint_watch.py).
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
from src.utils.checkpoint_watch import CheckpointWatcher, checkpoint_directory
from src.utils.config_checks import check_quantizer_config, model_overrides
from src.utils.instantiate import instantiate_loggers
from src.utils.monitor import monitor_of
from src.utils.report import print_results
from src.utils.run_name import register_resolvers

register_resolvers()

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


def build_run(
    checkpoint: dict[str, Any], run_cfg: DictConfig
) -> tuple[L.LightningModule, L.LightningDataModule]:
    """The model (with the checkpoint's weights) and the datamodule of the run config."""
    check_quantizer_config(run_cfg)
    datamodule: L.LightningDataModule = hydra.utils.instantiate(run_cfg.data)
    model: L.LightningModule = hydra.utils.instantiate(
        run_cfg.model, _convert_="all", **model_overrides(run_cfg, datamodule)
    )
    model.load_state_dict(checkpoint["state_dict"])
    return model, datamodule


def run_stages(
    trainer: L.Trainer, model: L.LightningModule, datamodule: L.LightningDataModule, test: bool
) -> dict[str, float]:
    """Validation (and test) metrics of the model's current weights."""
    metrics: dict[str, float] = {}
    for result in trainer.validate(model, datamodule=datamodule, verbose=False):
        metrics.update(result)
    if test:
        for result in trainer.test(model, datamodule=datamodule, verbose=False):
            metrics.update(result)
    return metrics


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Validate (and test) the checkpoint's weights on the data split of the run that wrote it;
    with `watch=<dir>`, every checkpoint appearing there (returns the last one's metrics)."""
    if cfg.get("watch"):
        if cfg.get("ckpt_path"):
            raise ValueError("pass either ckpt_path=<file> or watch=<dir>, not both")
        return watch(cfg)
    if not cfg.get("ckpt_path"):
        raise ValueError(
            "nothing to evaluate: pass ckpt_path=<run>/checkpoints/last.ckpt, or "
            "watch=<run>/checkpoints to evaluate each checkpoint as training writes it"
        )
    checkpoint, run_cfg = load_run(cfg.ckpt_path, cfg.get("run_overrides") or [])
    model, datamodule = build_run(checkpoint, run_cfg)
    loggers = instantiate_loggers(cfg.get("logger"))
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, logger=loggers, callbacks=[])
    metrics = run_stages(trainer, model, datamodule, bool(cfg.get("test")))
    for logger in loggers:
        logger.finalize("success")
    if trainer.is_global_zero:
        print_results(
            metrics, {"checkpoint": cfg.ckpt_path, "step": str(checkpoint.get("global_step"))}
        )
    return metrics


def watch(cfg: DictConfig) -> dict[str, float]:
    """Evaluate each new checkpoint of a directory once, in step order, logging its metrics at
    its global step, until training marks its final checkpoint or the directory stays idle."""
    options = cfg.get("watcher") or {}
    watcher = CheckpointWatcher(
        checkpoint_directory(cfg.watch),
        poll_seconds=float(options.get("poll_seconds", 10)),
        idle_timeout=float(options.get("idle_timeout", 3600)),
    )
    loggers = instantiate_loggers(cfg.get("logger"))
    # the trainer logs nothing itself: its step would be 0; each checkpoint's step is used below
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, logger=False, callbacks=[])
    overrides = cfg.get("run_overrides") or []
    latest: dict[str, float] = {}

    def evaluate_one(path: Path, step: int) -> None:
        checkpoint, run_cfg = load_run(str(path), overrides)
        step = int(checkpoint.get("global_step", step))
        model, datamodule = build_run(checkpoint, run_cfg)
        metrics = run_stages(trainer, model, datamodule, bool(cfg.get("test")))
        for logger in loggers:
            logger.log_metrics(metrics, step=step)
            logger.save()
        log.info("evaluated %s (step %d): %s", path.name, step, _brief(metrics, run_cfg))
        latest.clear()
        latest.update(metrics)
        latest["step"] = float(step)

    reason = watcher.run(evaluate_one)
    for logger in loggers:
        logger.finalize("success")
    if trainer.is_global_zero:
        print_results(
            latest,
            {
                "watched": str(watcher.directory),
                "evaluated steps": " ".join(str(s) for s in watcher.evaluated) or "none",
                "stopped": reason,
            },
        )
    return latest


def _brief(metrics: dict[str, float], run_cfg: DictConfig) -> str:
    """The run's monitored metric (and codebook utilization, for tokenizers)."""
    monitor = monitor_of(run_cfg)
    wanted = [monitor.metric] if monitor else []
    shown = [k for k in (*wanted, "val/codebook/utilization") if k in metrics]
    return ", ".join(f"{k}={metrics[k]:.4f}" for k in shown)


@hydra.main(version_base="1.3", config_path="configs", config_name="eval.yaml")
def main(cfg: DictConfig) -> None:
    if cfg.extras.get("ignore_warnings"):
        warnings.filterwarnings("ignore")
    evaluate(cfg)


if __name__ == "__main__":
    main()
