"""Writes validation clips and their reconstructions as WAV files (and to audio-aware loggers)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import soundfile as sf
import torch
from lightning import Callback, LightningModule, Trainer

from src.loggers.media import log_audio


class AudioReconstructions(Callback):
    """After each validation, `<dirpath>/epoch=EEE-step=SSSSSS/clip_NN_{input,recon}.wav` for the
    first `num_clips` validation items; also logged to TensorBoard and W&B when present, as
    `val/audio/clip_NN_{input,recon}`."""

    # how train.py's closing table names the newest file (src/utils/run_files.py)
    media_name = "reconstructions"

    def __init__(self, dirpath: str, num_clips: int = 4) -> None:
        self.dirpath = Path(dirpath)
        self.num_clips = num_clips
        self._pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.last_path: Path | None = None

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
        missing = self.num_clips - len(self._pairs)
        if missing > 0 and "reconstructions" in outputs:
            inputs = outputs["inputs"][:missing].detach().float().cpu()
            recons = outputs["reconstructions"][:missing].detach().float().cpu()
            self._pairs += list(zip(inputs, recons, strict=True))

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or not self._pairs:
            return
        pairs, self._pairs = self._pairs, []
        if not trainer.is_global_zero:
            return
        rate = int(pl_module.hparams.sample_rate)
        folder = self.dirpath / f"epoch={trainer.current_epoch:03d}-step={trainer.global_step:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i, (clip, recon) in enumerate(pairs):
            for kind, wave in (("input", clip), ("recon", recon)):
                samples = wave.reshape(-1).clamp(-1, 1).numpy()
                sf.write(folder / f"clip_{i:02d}_{kind}.wav", samples, rate, subtype="PCM_16")
                tag = f"val/audio/clip_{i:02d}_{kind}"
                log_audio(trainer.loggers, tag, samples, rate, trainer.global_step)
        self.last_path = folder
