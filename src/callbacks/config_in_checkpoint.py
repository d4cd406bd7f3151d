"""Stores the run's resolved config in every checkpoint so `eval.py` can rebuild the run."""

from __future__ import annotations

from typing import Any

from lightning import Callback, LightningModule, Trainer

CONFIG_KEY = "vqzoo_config"


class ConfigInCheckpoint(Callback):
    """Adds `checkpoint["vqzoo_config"]`: plain dicts and lists, loadable with weights_only=True."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    def on_save_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint[CONFIG_KEY] = self.config
