"""Samples of a prior after every validation: a PNG grid (images) or WAVs (audio), decoded by
the tokenizer the prior was trained on, and sent to every logger that shows media."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from lightning import Callback, LightningModule, Trainer

from src.loggers.media import log_audio, log_image
from src.models.prior_io import load_prior_tokenizer, save_samples

log = logging.getLogger(__name__)


class PriorSamples(Callback):
    """Writes `<dirpath>/epoch=EEE-step=SSSSSS.png` (images; conditional priors draw the labels
    0, 1, 2, ... cycling, one class per column with `images_per_row` = classes) or
    `<dirpath>/epoch=EEE-step=SSSSSS/sample_NN.wav`; loggers get `val/samples` (the grid) or
    `val/samples/sample_NN` (clips). The same seed every time, so grids are comparable."""

    media_name = "samples"  # how train.py's closing table names the newest file

    def __init__(
        self,
        dirpath: str,
        num_samples: int = 40,
        images_per_row: int = 10,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        cfg_scale: float | None = None,
        seed: int = 0,
    ) -> None:
        self.dirpath = Path(dirpath)
        self.num_samples = num_samples
        self.images_per_row = images_per_row
        self.settings = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
        self.cfg_scale = cfg_scale
        self.seed = seed
        self.last_path: Path | None = None
        self._tokenizer = None

    def tokenizer(self, pl_module: LightningModule):
        """The prior's tokenizer (fingerprint checked once), on the prior's device."""
        if self._tokenizer is None:
            self._tokenizer = load_prior_tokenizer(pl_module.hparams)
        return self._tokenizer.to(pl_module.device)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        hp = pl_module.hparams
        generator = torch.Generator(device=pl_module.device).manual_seed(self.seed)
        cfg_scale = self.cfg_scale if pl_module.layout.num_classes else None
        codes = pl_module.sample_codes(
            self.num_samples, generator=generator, cfg_scale=cfg_scale, **self.settings
        )
        media = self.tokenizer(pl_module).decode_codes(codes)
        name = f"epoch={trainer.current_epoch:03d}-step={trainer.global_step:06d}"
        step = trainer.global_step
        if hp.modality == "image":
            files, grid = save_samples(
                media, "image", self.dirpath / f"{name}.png", images_per_row=self.images_per_row
            )
            log_image(trainer.loggers, "val/samples", grid, step)
        else:
            files, clips = save_samples(media, "audio", self.dirpath / name, hp.sample_rate)
            rate = int(hp.sample_rate)
            for i, clip in enumerate(clips):
                log_audio(trainer.loggers, f"val/samples/sample_{i:02d}", clip.numpy(), rate, step)
        self.last_path = files[0] if hp.modality == "image" else files[0].parent
