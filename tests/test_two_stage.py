"""experiment=mnist_two_stage: the prior stage's checkpoint choice, compare.py's one row per job
with the prior's columns and the sample-FD-against-PSNR panel (hand-written run directories),
and (slow) the real 2-quantizer multirun."""

from __future__ import annotations

from pathlib import Path

import pytest

from src.utils.compare_plot import comparison_figure
from src.utils.run_table import Run, compare, find_run_dirs
from src.utils.two_stage import best_tokenizer_checkpoint
from tests.helpers import QUICK, run_script
from tests.test_run_table import make_run

PRIOR_COLUMNS = ["prior_bits_per_image", "sample_class_accuracy", "sample_fd", "recon_fd_floor"]


def two_stage_job(path: Path, quantizer: str, psnr: float, fd: float) -> Path:
    """A job as train.py leaves it: the tokenizer's run, its prior's run in <job>/prior."""
    make_run(
        path,
        ["experiment=mnist_two_stage", f"quantizer={quantizer}"],
        [{"test/psnr": psnr, "test/codebook/utilization": 0.5, "step": 3}],
    )
    prior = path / "prior" / "csv" / "version_0"
    prior.mkdir(parents=True)
    (prior / "metrics.csv").write_text(
        "step,test/nll,test/bits_per_sample,sample/class_accuracy,sample/fd,"
        "sample/fd_reconstructions\n"
        f"6,2.0,140.5,0.91,{fd},{fd / 10}\n"
    )
    return path


def test_one_row_per_job_with_the_prior_columns_and_an_fd_panel(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    two_stage_job(sweep / "0", "fsq", 20.0, 30.0)
    two_stage_job(sweep / "1", "vq", 21.0, 12.0)
    runs = find_run_dirs([sweep])
    assert runs == [sweep / "0", sweep / "1"]  # the prior stages are not rows of their own
    comparison = compare([Run.load(p) for p in runs])
    assert comparison.columns[-5:] == [*PRIOR_COLUMNS, "tokens_per_sec"]
    first = comparison.rows[0]
    assert (first["psnr"], first["prior_bits_per_image"]) == (20.0, 140.5)
    assert (first["sample_class_accuracy"], first["sample_fd"], first["recon_fd_floor"]) == (
        0.91,
        30.0,
        3.0,
    )
    figure = comparison_figure(comparison)
    fd_axes = figure.axes[-1]
    assert fd_axes.get_ylabel().startswith("prior sample FD")
    points = sorted(tuple(p) for c in fd_axes.collections for p in c.get_offsets())
    assert points == [(20.0, 30.0), (21.0, 12.0)]
    # tokenizer runs alone keep their table
    plain_row = {"test/psnr": 19.0, "test/codebook/utilization": 0.4, "step": 3}
    make_run(tmp_path / "plain", ["quantizer=vq"], [plain_row])
    plain = compare([Run.load(tmp_path / "plain")])
    assert not set(PRIOR_COLUMNS) & set(plain.columns)
    assert len(comparison_figure(plain).axes) == 1


def test_the_prior_stage_reads_the_best_tokenizer_checkpoint(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    with pytest.raises(FileNotFoundError, match="no tokenizer checkpoint"):
        best_tokenizer_checkpoint(tmp_path)
    (folder / "last.ckpt").write_text("x")
    assert best_tokenizer_checkpoint(tmp_path) == folder / "last.ckpt"
    (folder / "epoch_003.ckpt").write_text("x")
    assert best_tokenizer_checkpoint(tmp_path) == folder / "epoch_003.ckpt"


PRIOR_QUICK = [
    "trainer.max_epochs=1",
    "+trainer.limit_train_batches=3",
    "+trainer.limit_val_batches=1",
    "+trainer.limit_test_batches=1",
    "callbacks.sample_metrics.num_samples=20",
    "callbacks.sample_metrics.batch_size=20",
    "callbacks.prior_samples.num_samples=10",
    "model.net.hidden_size=32",
    "model.net.intermediate_size=32",
    "model.net.num_hidden_layers=1",
    "model.net.num_attention_heads=2",
    "model.net.num_key_value_heads=1",
    "callbacks.model_summary=null",
    "extras.print_config=false",
]


@pytest.mark.slow  # two tokenizers and two priors trained in subprocesses: minutes on 2 cores
def test_two_stage_multirun_trains_both_stages_and_compares(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    stage2 = ",".join(f'"{o}"' for o in PRIOR_QUICK)
    result = run_script(
        "train.py",
        "-m",
        "experiment=mnist_two_stage",
        "quantizer=fsq,vq",
        *QUICK,
        "+trainer.limit_val_batches=1",
        "+trainer.limit_test_batches=1",
        f"two_stage.overrides=[{stage2}]",
        f"hydra.sweep.dir={sweep}",
        timeout=1800,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for job in ("0", "1"):
        assert (sweep / job / "codes" / "manifest.json").is_file()
        assert list((sweep / job / "prior" / "samples").glob("epoch=*.png"))
    out = run_script("scripts/compare.py", str(sweep), "--out", str(tmp_path / "cmp"))
    assert out.returncode == 0, out.stderr[-3000:]
    table = (tmp_path / "cmp" / "comparison.md").read_text()
    for column in ["psnr", *PRIOR_COLUMNS]:
        assert column in table
    assert "quantizer=fsq" in table and "quantizer=vq" in table
