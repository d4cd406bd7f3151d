"""Train a model (a tokenizer by default; `model=<name>` picks another kind):
`python train.py [group=option ...] [key=value ...]` (configs/train.yaml)."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))

from src.callbacks import ConfigInCheckpoint
from src.callbacks.preemption import RunPreempted
from src.utils.config_checks import (
    check_monitor,
    check_optimizer_config,
    check_quantizer_config,
    model_overrides,
)
from src.utils.ddp_multirun import ddp_job_scope
from src.utils.instantiate import instantiate_callbacks, instantiate_loggers
from src.utils.launch_rank import is_launch_rank_zero
from src.utils.optional_stacks import check_optional_stacks
from src.utils.report import print_config_tree, print_results
from src.utils.resume import resume_point
from src.utils.run_controller import (
    clear_final_marker,
    controller_callbacks,
    finish_training,
    logger_configs,
    restart_step,
    roll_back_loggers,
    trainer_plugins,
)
from src.utils.run_files import final_metrics, run_files
from src.utils.run_name import register_resolvers
from src.utils.run_status import record_failure
from src.utils.two_stage import run_prior_stage

register_resolvers()

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit (resuming the run directory's newest checkpoint when the run has a run_name), then
    test the best checkpoint; returns the final validation and test metrics and throughput."""
    check_quantizer_config(cfg)
    check_optimizer_config(cfg)
    run_dir = Path(cfg.paths.output_dir)
    resume = resume_point(cfg, run_dir) if cfg.get("train") else None
    ckpt_path = cfg.get("ckpt_path") or (str(resume.path) if resume else None)
    if cfg.get("train"):
        clear_final_marker(run_dir)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)

    datamodule: L.LightningDataModule = hydra.utils.instantiate(cfg.data)
    model: L.LightningModule = hydra.utils.instantiate(
        cfg.model, _convert_="all", **model_overrides(cfg, datamodule)
    )
    check_monitor(cfg, model)
    callbacks = instantiate_callbacks(cfg.get("callbacks"))
    callbacks.append(ConfigInCheckpoint(OmegaConf.to_container(cfg, resolve=True)))
    controller = controller_callbacks(cfg, run_dir)
    callbacks.extend(controller)
    # a resumed run sets aside what was logged after its checkpoint; a named run without a
    # checkpoint starts again at step 0 and sets aside everything logged before
    step = restart_step(cfg, resume)
    loggers = instantiate_loggers(logger_configs(cfg.get("logger"), step))
    if step is not None:
        roll_back_loggers(loggers, step)
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers, **trainer_plugins(cfg)
    )
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    metrics: dict[str, float] = {}
    files: dict[str, Path | None] = {}
    status = "success"
    try:
        if cfg.get("train"):
            trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
            # read now: testing a checkpoint restores the callbacks' state as it was at save time
            metrics.update(final_metrics(trainer))
            metrics.update(finish_training(trainer, controller, run_dir))
            files = run_files(trainer)
        if cfg.get("test"):
            test_ckpt = cfg.get("ckpt_path")
            if cfg.get("train") and trainer.checkpoint_callback:
                test_ckpt = trainer.checkpoint_callback.best_model_path or test_ckpt
            if not test_ckpt:
                log.warning("no checkpoint to test: testing the current weights")
            trainer.test(
                model, datamodule=datamodule, ckpt_path=test_ckpt or None, weights_only=True
            )
            # a prior's sample metrics (sample/...) are computed at test time
            metrics.update(final_metrics(trainer, prefixes=("test/", "sample/")))
            files = files or run_files(trainer)
    except RunPreempted as preempted:
        status = "preempted"
        log.warning(
            "preempted by %s: resume by running the same command (checkpoint %s); exit code %s",
            preempted.signal_name,
            preempted.checkpoint,
            preempted.code,
        )
        raise
    finally:
        if status != "preempted":  # Lightning already closed them, as "failed"
            for logger in loggers:
                logger.finalize("success")

    if trainer.is_global_zero:
        print_results(metrics, files)
    return metrics


@hydra.main(version_base="1.3", config_path="configs", config_name="train.yaml")
def main(cfg: DictConfig) -> Any:
    if cfg.extras.get("ignore_warnings"):
        warnings.filterwarnings("ignore")
    if cfg.extras.get("print_config") and is_launch_rank_zero():  # once per run, not per rank
        print_config_tree(cfg)
    # a run that stops with an error leaves <run dir>/failed.json (scripts/compare.py reads it)
    failure = record_failure(
        Path(cfg.paths.output_dir), write=is_launch_rank_zero(), not_failures=(SIGTERMException,)
    )
    with ddp_job_scope(), failure:  # under DDP, a multirun job's ranks run only that job
        metrics = train(cfg)
        if cfg.get("two_stage"):  # experiment=mnist_two_stage: then a prior on its codes
            metrics.update(run_prior_stage(cfg, train))
    return metrics.get(cfg.get("optimized_metric") or "")


if __name__ == "__main__":
    check_optional_stacks(sys.argv[1:])  # name a missing extra before Hydra composes
    main()
