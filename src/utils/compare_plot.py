"""The comparison plot: reconstruction quality against codebook utilization (and against
bitrate when the runs log one), one labelled point per run; for two-stage runs
(experiment=mnist_two_stage) also the prior's sample FD against reconstruction PSNR."""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from src.utils.run_table import Comparison, label

QUALITY_AXES = {"psnr": "PSNR (dB)", "si_snr": "SI-SNR (dB)"}
X_AXES = {"utilization": "codebook utilization (%)", "bitrate_kbps": "bitrate (kbit/s)"}


def quality_column(comparison: Comparison) -> str | None:
    """The quality metric most runs have (PSNR for images, SI-SNR for audio)."""
    counts = {
        name: sum(row.get(name) is not None for row in comparison.rows) for name in QUALITY_AXES
    }
    best = max(counts, key=counts.get)
    return best if counts[best] else None


def comparison_figure(comparison: Comparison, title: str = "") -> Figure:
    """One panel per x axis that some run has a value for; points lacking x or y are left out."""
    quality = quality_column(comparison)
    if quality is None:
        raise ValueError("no run logged PSNR or SI-SNR: nothing to plot against utilization")
    panels = [
        x
        for x in X_AXES
        if any(row.get(x) is not None and row[quality] is not None for row in comparison.rows)
    ]
    if not panels:
        raise ValueError("no run logged codebook utilization or bitrate: nothing to plot")
    fd_points = [
        (float(row[quality]), float(row["sample_fd"]), label(row))
        for row in comparison.rows
        if row.get("sample_fd") is not None and row[quality] is not None
    ]
    count = len(panels) + bool(fd_points)
    figure = Figure(figsize=(5.5 * count, 4.2), dpi=110, layout="constrained")
    axes = figure.subplots(1, count, squeeze=False)[0]
    for ax, x in zip(axes, panels, strict=False):
        scale = 100.0 if x == "utilization" else 1.0
        points = [
            (float(row[x]) * scale, float(row[quality]), label(row))
            for row in comparison.rows
            if row.get(x) is not None and row[quality] is not None
        ]
        _scatter(ax, points, X_AXES[x], f"{comparison.stage} {QUALITY_AXES[quality]}")
    if fd_points:  # what the tokens are worth for generation against how well they reconstruct
        label_y = "prior sample FD (lower is better)"
        _scatter(axes[-1], fd_points, f"{comparison.stage} {QUALITY_AXES[quality]}", label_y)
    if title:
        figure.suptitle(title, fontsize=10)
    return figure


def _scatter(ax, points: list[tuple[float, float, str]], xlabel: str, ylabel: str) -> None:
    """One labelled point per run."""
    xs = [p[0] for p in points]
    middle = (min(xs) + max(xs)) / 2
    for px, py, text in points:
        ax.scatter(px, py, s=36, zorder=3)
        right_half = px > middle  # labels point inwards so they stay inside the axes
        ax.annotate(
            text,
            (px, py),
            xytext=(-5 if right_half else 5, 4),
            textcoords="offset points",
            ha="right" if right_half else "left",
            fontsize=8,
        )
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.margins(x=0.15, y=0.15)


def save_comparison_plot(comparison: Comparison, path: Path, title: str = "") -> Path:
    """Draw the comparison and write it as a PNG (no display needed)."""
    figure = comparison_figure(comparison, title)
    FigureCanvasAgg(figure)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path
