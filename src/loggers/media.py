"""Send one image, audio clip or histogram to every logger that can show it.

The callbacks write their media as files in the run directory themselves (that is what the
CSV logger, the default, gets); TensorBoard and W&B receive the same media through these
functions, so each callback calls one function instead of branching on logger types.
Loggers of other types are skipped.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger

WANDB_MAX_BINS = 512  # wandb.Histogram refuses more bins than this


def image_to_hwc_uint8(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """A (C, H, W) float image in [0, 1], or an (H, W, C) uint8 array, as (H, W, C) uint8."""
    is_hwc = isinstance(image, np.ndarray) and image.dtype == np.uint8
    channels = image.shape[-1] if is_hwc else image.shape[0]
    if image.ndim != 3 or channels not in (1, 3, 4):
        layout = "(H, W, C) uint8" if is_hwc else "(C, H, W) float"
        raise ValueError(f"expected one {layout} image, C in 1/3/4; got shape {image.shape}")
    if is_hwc:
        return image
    tensor = torch.as_tensor(image).detach().float().cpu().clamp(0, 1)
    return (tensor.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()


def log_image(
    loggers: Iterable[Logger], key: str, image: torch.Tensor | np.ndarray, step: int
) -> None:
    """One image ((C, H, W) float in [0, 1] or (H, W, C) uint8) under `key` at `step`."""
    loggers = list(loggers)
    if not any(isinstance(lg, (TensorBoardLogger, WandbLogger)) for lg in loggers):
        return
    array = image_to_hwc_uint8(image)
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, array, step, dataformats="HWC")
        elif isinstance(logger, WandbLogger):
            logger.log_image(key, [array], step=step)


def log_audio(
    loggers: Iterable[Logger], key: str, samples: np.ndarray, sample_rate: int, step: int
) -> None:
    """One mono clip (float samples in [-1, 1]) under `key` at `step`."""
    samples = np.asarray(samples, dtype=np.float32).reshape(-1)
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_audio(key, samples, step, sample_rate=sample_rate)
        elif isinstance(logger, WandbLogger):
            logger.log_audio(key, [samples], step=step, sample_rate=[sample_rate])


def log_histogram(
    loggers: Iterable[Logger], key: str, weights: np.ndarray | torch.Tensor, step: int
) -> None:
    """A histogram over the integers 0..len(weights)-1 whose bin i has height `weights[i]`,
    e.g. how often each code of a codebook was used.

    W&B histograms hold at most 512 bins: longer ones are summed over runs of consecutive
    integers (bin edges say which)."""
    weights = np.asarray(torch.as_tensor(weights).detach().cpu().double()).reshape(-1)
    size = len(weights)
    edges = np.arange(size + 1, dtype=np.float64)
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            values = np.arange(size, dtype=np.float64)
            logger.experiment.add_histogram_raw(
                key,
                min=0.0,
                max=float(size - 1),
                num=float(weights.sum()),
                sum=float((weights * values).sum()),
                sum_squares=float((weights * values**2).sum()),
                bucket_limits=(values + 0.5).tolist(),  # bucket i: (i - 0.5, i + 0.5]
                bucket_counts=weights.tolist(),
                global_step=step,
            )
        elif isinstance(logger, WandbLogger):
            import wandb

            binned, binned_edges = _rebin(weights, edges, WANDB_MAX_BINS)
            histogram = wandb.Histogram(np_histogram=(binned.tolist(), binned_edges.tolist()))
            logger.log_metrics({key: histogram}, step=step)


def _rebin(weights: np.ndarray, edges: np.ndarray, max_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Sum consecutive bins so that at most `max_bins` remain."""
    if len(weights) <= max_bins:
        return weights, edges
    width = -(-len(weights) // max_bins)  # ceil
    starts = np.arange(0, len(weights), width)
    return np.add.reduceat(weights, starts), np.append(edges[starts], edges[-1])
