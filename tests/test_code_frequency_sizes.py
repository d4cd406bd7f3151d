"""The code-frequency chart and histograms with a codebook size per codebook (a residual VQ
with `codebook_size=(3, 8)`): each panel and histogram covers its own codebook's codes."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

import src.callbacks.code_frequencies as module
from src.callbacks.code_frequencies import CodeFrequencies, code_frequency_figure
from src.metrics import CodebookUsage


def test_panels_count_each_codebooks_own_codes() -> None:
    frequencies = np.array([[0.5, 0.5, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]])
    figure = code_frequency_figure(frequencies, "val", 3, sizes=[2, 4])
    titles = [ax.get_title() for ax in figure.axes]
    assert titles[0].startswith("codebook 0: 2 of 2 codes used")
    assert titles[1].startswith("codebook 1: 4 of 4 codes used")
    assert [len(ax.patches) for ax in figure.axes] == [2, 4]
    plain = code_frequency_figure(frequencies, "val", 3)  # without sizes: the full rows
    assert [ax.get_title().split(",")[0] for ax in plain.axes] == [
        "codebook 0: 2 of 4 codes used",
        "codebook 1: 4 of 4 codes used",
    ]


def test_histograms_are_cut_to_each_codebooks_size(tmp_path, monkeypatch) -> None:
    usage = CodebookUsage(codebook_size=8, num_codebooks=2, codebook_sizes=(3, 8))
    usage.update(torch.tensor([[0, 7], [2, 1], [2, 1]]))
    logged: dict[str, np.ndarray] = {}
    monkeypatch.setattr(module, "log_image", lambda *args: None)
    monkeypatch.setattr(
        module, "log_histogram", lambda loggers, name, row, step: logged.update({name: row})
    )
    model = SimpleNamespace(codebook_usage=lambda stage: usage)
    trainer = SimpleNamespace(
        sanity_checking=False, is_global_zero=True, global_step=5, current_epoch=0, loggers=[]
    )
    callback = CodeFrequencies(str(tmp_path))
    callback.on_validation_epoch_end(trainer, model)
    np.testing.assert_allclose(logged["val/codebook/0/frequencies"], [1 / 3, 0, 2 / 3], rtol=1e-6)
    assert logged["val/codebook/1/frequencies"].shape == (8,)
    assert logged["val/codebook/1/frequencies"].sum() == pytest.approx(1.0)
    assert callback.last_frequencies["val"].shape == (2, 8)  # the metric's padded rows
    assert callback.last_path is not None and callback.last_path.exists()
