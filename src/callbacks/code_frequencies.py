"""How often each code was used in a validation / test epoch: a bar chart per codebook as a PNG
in the run directory, and the same chart plus a histogram per codebook for TensorBoard / W&B."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from lightning import Callback, LightningModule, Trainer
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from src.loggers.media import log_histogram, log_image

log = logging.getLogger(__name__)


class CodeFrequencies(Callback):
    """After each validation and test epoch, reads the epoch's code counts from the model's
    codebook-usage metric (`pl_module.codebook_usage(stage)`, src/models/tokenizer_module.py) and
    writes
    `<dirpath>/val_epoch=EEE-step=SSSSSS.png` (tests: `test_step=SSSSSS.png`): per codebook
    (at most `max_codebooks`), the code frequencies sorted from most to least used, on a log
    scale, against the uniform 1/K line.
    Loggers get the chart as `<stage>/codebook/frequencies_chart` and, per codebook, a
    histogram over code indices as `<stage>/codebook/frequencies` (one codebook) or
    `<stage>/codebook/<i>/frequencies`.

    Lightning runs callbacks' epoch-end hooks before the model's, which logs and resets the
    metric; the counts are summed over ranks by the metric, so every rank calls this.
    Codebooks counted sparsely (over 2^24 codes) have no per-code counts and are skipped; a model
    without codebooks (no `codebook_usage`) gets a warning once and no charts.
    """

    def __init__(self, dirpath: str, max_codebooks: int = 8) -> None:
        self.dirpath = Path(dirpath)
        self.max_codebooks = max_codebooks
        self.last_path: Path | None = None
        self.last_frequencies: dict[str, np.ndarray] = {}
        self._warned = False

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self._record(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._record(trainer, pl_module, "test")

    def _record(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        codebook_usage = getattr(pl_module, "codebook_usage", None)
        if not callable(codebook_usage):
            if not self._warned:
                self._warned = True
                log.warning(
                    "code_frequencies: %s has no codebook_usage(stage); no charts are drawn "
                    "(drop the callback with callbacks.code_frequencies=null)",
                    type(pl_module).__name__,
                )
            return
        usage = codebook_usage(stage)
        if usage is None or usage.update_count == 0 or usage.sparse:
            return
        frequencies = usage.compute()["code_frequencies"].cpu().numpy()  # (codebooks, codes)
        if not trainer.is_global_zero:
            return
        self.last_frequencies[stage] = frequencies
        step = trainer.global_step
        shown = frequencies[: self.max_codebooks]
        # each codebook's own size (a residual VQ may have one per depth); rows are padded
        sizes = getattr(usage, "slot_sizes", None) or (usage.codebook_size,) * usage.num_codebooks
        figure = code_frequency_figure(shown, stage, step, sizes[: len(shown)])
        canvas = FigureCanvasAgg(figure)
        self.dirpath.mkdir(parents=True, exist_ok=True)
        # after fit, current_epoch is past the last epoch: tests are named by step only
        epoch = f"epoch={trainer.current_epoch:03d}-" if stage == "val" else ""
        path = self.dirpath / f"{stage}_{epoch}step={step:06d}.png"
        figure.savefig(path)
        canvas.draw()
        chart = np.asarray(canvas.buffer_rgba())[..., :3].copy()
        self.last_path = path
        log_image(trainer.loggers, f"{stage}/codebook/frequencies_chart", chart, step)
        for i, (row, size) in enumerate(zip(shown, sizes, strict=False)):
            key = f"{stage}/codebook/{i}/frequencies" if len(frequencies) > 1 else None
            name = key or f"{stage}/codebook/frequencies"
            log_histogram(trainer.loggers, name, row[:size], step)


def code_frequency_figure(
    frequencies: np.ndarray, stage: str, step: int, sizes: Sequence[int] | None = None
) -> Figure:
    """Rank-frequency bars, one panel per codebook row of `frequencies` (rows sum to 1);
    `sizes` gives each row's codebook size when they differ (the rest of a row is padding)."""
    rows, width = frequencies.shape
    sizes = [width] * rows if sizes is None else [int(n) for n in sizes]
    figure = Figure(figsize=(7, 1.3 + 1.7 * rows), dpi=100, layout="constrained")
    axes = figure.subplots(rows, 1, squeeze=False)[:, 0]
    for i, (ax, padded, size) in enumerate(zip(axes, frequencies, sizes, strict=True)):
        row, ranks = padded[:size], np.arange(1, size + 1)
        used = int((row > 0).sum())
        nonzero = row[row > 0]
        perplexity = float(np.exp(-(nonzero * np.log(nonzero)).sum())) if used else 0.0
        ax.bar(ranks, np.sort(row)[::-1], width=1.0, color="tab:blue", linewidth=0)
        ax.axhline(1.0 / size, color="tab:red", linestyle="--", linewidth=1, label="uniform 1/K")
        name = f"codebook {i}: " if rows > 1 else ""
        ax.set_title(f"{name}{used} of {size} codes used, perplexity {perplexity:.1f}", fontsize=9)
        ax.set_xlim(0.5, size + 0.5)
        ax.set_yscale("log")  # frequencies span orders of magnitude; unused codes show no bar
        ax.set_ylabel("frequency")
    axes[0].legend(loc="upper right", fontsize=8)
    axes[-1].set_xlabel("code rank (most used first)")
    figure.suptitle(f"{stage} code frequencies, step {step}", fontsize=10)
    return figure
