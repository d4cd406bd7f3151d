"""`quantizer=external` end to end on the default experiment with vector-quantize-pytorch's
VectorQuantize, ResidualVQ, FSQ and LFQ: a 3-step training epoch (one validation and one test
batch) logs sane codebook usage, per codebook for the residual stack, and the checkpoint's
tokenizer round-trips codes through the codes API."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from src.models import load_tokenizer
from tests.helpers import read_metrics_csv
from train import train

# target class -> (its keywords on the command line, codebook size of each code slot)
TARGETS = {
    "VectorQuantize": (["quantizer.codebook_size=64"], (64,)),
    "ResidualVQ": (["quantizer.num_quantizers=4", "quantizer.codebook_size=32"], (32,) * 4),
    "FSQ": (["~quantizer.codebook_size", "quantizer.levels=[8,5,5]"], (200,)),
    "LFQ": (["quantizer.codebook_size=256"], (256,)),
}
TINY = [
    "trainer.max_epochs=1",
    "+trainer.limit_train_batches=3",
    "+trainer.limit_val_batches=1",
    "+trainer.limit_test_batches=1",
    "extras.print_config=false",
    "callbacks.model_summary=null",
]


def last_values(run_dir: Path) -> dict[str, float]:
    """The last logged value of every metric in the run's metrics.csv."""
    values: dict[str, float] = {}
    for row in read_metrics_csv(run_dir):
        values.update({k: float(v) for k, v in row.items() if v not in ("", None)})
    return values


@pytest.mark.parametrize("name", TARGETS)
def test_external_module_trains_logs_usage_and_round_trips_codes(
    name: str, train_config, tmp_path: Path
) -> None:
    overrides, sizes = TARGETS[name]
    target = f"quantizer.target=vector_quantize_pytorch.{name}"
    cfg = train_config("quantizer=external", target, *overrides, *TINY)
    metrics = train(cfg)
    assert math.isfinite(metrics["test/psnr"])
    run_dir = tmp_path / "run"
    logged = last_values(run_dir)
    assert logged["step"] == 3  # 3 optimizer steps
    for stage in ("train", "val", "test"):
        per_codebook = []
        for slot, size in enumerate(sizes):
            prefix = f"{stage}/codebook/{slot}/" if len(sizes) > 1 else f"{stage}/codebook/"
            utilization = logged[f"{prefix}utilization"]
            assert 0.0 < utilization <= 1.0
            # dead codes are the codes never used; perplexity lies between 1 and the used codes
            assert logged[f"{prefix}dead_codes"] == pytest.approx(size * (1 - utilization))
            assert 1.0 <= logged[f"{prefix}perplexity"] <= size * utilization + 1e-3
            per_codebook.append(utilization)
        mean = logged[f"{stage}/codebook/utilization"]
        assert mean == pytest.approx(sum(per_codebook) / len(sizes))
    assert f"val/codebook/{len(sizes)}/utilization" not in logged

    tokenizer = load_tokenizer(run_dir / "checkpoints" / "last.ckpt")
    assert tokenizer.codebook_sizes == sizes
    images = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    codes = tokenizer.encode_codes(images)
    assert codes.dtype == torch.int64 and codes.shape == (3, 7, 7, len(sizes))
    assert bool(((codes >= 0) & (codes < torch.tensor(sizes))).all())
    with torch.no_grad():
        reconstructions, _ = tokenizer(images)
    assert torch.equal(tokenizer.decode_codes(codes), reconstructions.clamp(0, 1))
