"""Saves a PNG of validation inputs beside their reconstructions after every validation
(and sends the same grid to TensorBoard / W&B when those loggers are on)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer
from torchvision.utils import make_grid, save_image

from src.loggers.media import log_image


class ReconstructionGrid(Callback):
    """Writes `<dirpath>/epoch=EEE-step=SSSSSS.png`: rows alternate inputs and reconstructions;
    loggers that show images get it as `val/reconstructions`."""

    # how train.py's closing table names the newest file (src/utils/run_files.py)
    media_name = "reconstructions"

    def __init__(self, dirpath: str, num_images: int = 32, images_per_row: int = 8) -> None:
        self.dirpath = Path(dirpath)
        self.num_images = num_images
        self.images_per_row = images_per_row
        self._inputs: list[torch.Tensor] = []
        self._reconstructions: list[torch.Tensor] = []
        self.last_path: Path | None = None

    def _collected(self) -> int:
        return sum(len(x) for x in self._inputs)

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if trainer.sanity_checking or not isinstance(outputs, dict):
            return
        missing = self.num_images - self._collected()
        if missing > 0 and "reconstructions" in outputs:
            self._inputs.append(outputs["inputs"][:missing].detach().float().cpu())
            self._reconstructions.append(outputs["reconstructions"][:missing].detach().cpu())

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or not self._inputs:
            return
        inputs = torch.cat(self._inputs).clamp(0, 1)
        recons = torch.cat(self._reconstructions).clamp(0, 1)
        self._inputs, self._reconstructions = [], []
        if not trainer.is_global_zero:
            return
        per_row = min(self.images_per_row, len(inputs))
        kept = len(inputs) - len(inputs) % per_row  # whole rows only, so pairs stay aligned
        inputs, recons = inputs[:kept], recons[:kept]
        rows = []
        for start in range(0, len(inputs), per_row):
            rows += [inputs[start : start + per_row], recons[start : start + per_row]]
        grid = make_grid(torch.cat(rows), nrow=per_row, padding=2, pad_value=1.0)
        self.dirpath.mkdir(parents=True, exist_ok=True)
        path = (
            self.dirpath / f"epoch={trainer.current_epoch:03d}-step={trainer.global_step:06d}.png"
        )
        save_image(grid, path)
        self.last_path = path
        log_image(trainer.loggers, "val/reconstructions", grid, trainer.global_step)
