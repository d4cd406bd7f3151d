"""Loggers and the media they receive: one dispatcher per kind of media, vqzoo's W&B logger."""

from src.loggers.media import log_audio, log_histogram, log_image
from src.loggers.wandb_run import WandbRunLogger

__all__ = ["WandbRunLogger", "log_audio", "log_histogram", "log_image"]
