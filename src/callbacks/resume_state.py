"""What a Lightning checkpoint lacks for an exact resume: RNG states and the data order.

Lightning's checkpoint carries weights, buffers (EMA codebooks), optimizer, LR scheduler and loop
counters. This callback adds the Python / NumPy / torch (and CUDA) RNG states and the train
sampler's position, so a run resumed from any checkpoint draws the same random numbers and sees
the same batches as a run that was never stopped. Everything is stored as tensors and plain
Python values, loadable with `weights_only=True`.
"""

from __future__ import annotations

import logging
import random
import warnings
from typing import Any

import numpy as np
import torch
from lightning import Callback, LightningModule, Trainer

log = logging.getLogger(__name__)

RESUME_KEY = "vqzoo_resume_state"
MID_EPOCH_WARNING = ".*resuming from a checkpoint that ended before the epoch ended.*"


def collect_rng_states() -> dict[str, Any]:
    """The global RNG states of Python, NumPy, torch and (when present) CUDA."""
    version, python_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {
        "python": [version, list(python_state), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    """Set the global RNGs to states from `collect_rng_states`."""
    version, python_state, gauss = states["python"]
    random.setstate((version, tuple(python_state), gauss))
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        cuda_states = states["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            log.warning(
                "checkpoint holds CUDA RNG states of %d devices, this process sees %d: "
                "CUDA random numbers will differ from the uninterrupted run",
                len(cuda_states),
                torch.cuda.device_count(),
            )


def consumed_train_samples(trainer: Trainer, batch_size: int) -> int | None:
    """Samples of the current epoch that training has used; None once the epoch is complete."""
    processed = trainer.fit_loop.epoch_loop.batch_progress.current.processed
    if processed >= trainer.num_training_batches:
        return None
    return processed * batch_size


class ResumeState(Callback):
    """Stores RNG states and the train sampler position in every checkpoint; restores them."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if _train_sampler(trainer) is not None and trainer.world_size == 1:
            # Lightning cannot see that the sampler restores its position; on one process it does
            warnings.filterwarnings("ignore", message=MID_EPOCH_WARNING)

    def on_save_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        state: dict[str, Any] = {"rng": collect_rng_states()}
        sampler = _train_sampler(trainer)
        if sampler is not None:
            batch_size = trainer.datamodule.batch_size
            state["sampler"] = sampler.state_dict(consumed_train_samples(trainer, batch_size))
        checkpoint[RESUME_KEY] = state

    def on_load_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        state = checkpoint.get(RESUME_KEY)
        if state is None:
            log.warning(
                "checkpoint has no RNG or data-order state (%s): the resumed run continues "
                "correctly but will not repeat the uninterrupted run's random numbers",
                RESUME_KEY,
            )
            return
        restore_rng_states(state["rng"])
        sampler = _train_sampler(trainer)
        if sampler is not None and "sampler" in state:
            sampler.load_state_dict(state["sampler"])


def _train_sampler(trainer: Trainer) -> Any | None:
    """The datamodule's checkpointable train sampler, if it has one."""
    sampler = getattr(trainer.datamodule, "train_sampler", None)
    return sampler if hasattr(sampler, "load_state_dict") else None
