"""Test aid: a callback that saves this rank's model state at the start and end of training."""

from __future__ import annotations

from pathlib import Path

import torch
from lightning import Callback, LightningModule, Trainer


class SaveRankState(Callback):
    """Writes `<directory>/rank<r>_{start,end}.pt` (the module's state dict, cloned)."""

    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)

    def _save(self, trainer: Trainer, pl_module: LightningModule, when: str) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        torch.save(state, self.directory / f"rank{trainer.global_rank}_{when}.pt")

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._save(trainer, pl_module, "start")

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._save(trainer, pl_module, "end")
