"""A second kind of model plugs into the training entry with no special case: a toy model on the
generic base (tests/plugin_model.py) with its own metric, minimised, and no quantizer trains
through train.py, is checkpointed by its metric, evaluated by eval.py and tabulated by compare.py;
the tokenizers' monitored metrics are among the names they say they log."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import hydra
import pytest
import torch
import yaml
from omegaconf import OmegaConf

from eval import evaluate
from scripts import compare
from src.quantizers import UnknownQuantizerError
from src.utils.config_checks import check_quantizer_config, model_overrides
from tests.conftest import compose_config
from tests.helpers import read_metrics_csv, run_script
from tests.plugin_model import SEARCH_PATH
from train import train

TOY = [
    SEARCH_PATH,
    "model=toy_regressor",
    # a tokenizer would stop here (UnknownQuantizerError): the toy model takes no quantizer
    "quantizer.name=not_a_quantizer",
    "trainer.max_epochs=2",
    "+trainer.limit_train_batches=3",
    "+trainer.limit_val_batches=2",
    "+trainer.limit_test_batches=2",
    "extras.print_config=false",
    "callbacks.model_summary=null",
]


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, float], Path]:
    run_dir = tmp_path_factory.mktemp("toy") / "run"
    cfg = compose_config("train", TOY, output_dir=run_dir)
    assert (cfg.monitor.metric, cfg.monitor.mode, cfg.optimized_metric) == (
        "val/mae",
        "min",
        "val/mae",
    )
    return train(cfg), run_dir


def logged(rows: list[dict[str, str]], name: str) -> list[float]:
    return [float(row[name]) for row in rows if row.get(name)]


def test_toy_model_trains_and_logs_its_own_metrics(toy_run) -> None:
    metrics, run_dir = toy_run
    rows = read_metrics_csv(run_dir)
    val_mae = logged(rows, "val/mae")
    assert len(val_mae) == 2  # one per epoch
    assert metrics["val/mae"] == pytest.approx(val_mae[-1], rel=1e-6)  # what optimized_metric reads
    assert math.isfinite(metrics["test/mae"])
    assert not any("codebook" in name or "psnr" in name for name in metrics)
    # throughput: steps and samples; the model counts no tokens, so there is no tokens/s
    assert metrics["summary/samples_per_sec"] > 0
    assert "summary/tokens_per_sec" not in metrics
    # no media callbacks come with this model
    assert not (run_dir / "reconstructions").exists()
    assert not (run_dir / "code_frequencies").exists()


def test_best_checkpoint_is_chosen_by_the_minimised_metric(toy_run) -> None:
    _, run_dir = toy_run
    val_mae = logged(read_metrics_csv(run_dir), "val/mae")
    assert val_mae[0] != val_mae[1]  # else min and max would pick the same epoch
    (best,) = (run_dir / "checkpoints").glob("epoch_*.ckpt")
    assert best.name == f"epoch_{val_mae.index(min(val_mae)):03d}.ckpt"
    state = torch.load(best, map_location="cpu", weights_only=True)["callbacks"]
    (key,) = [k for k in state if k.startswith("ModelCheckpoint{'monitor': 'val/mae'")]
    assert "'mode': 'min'" in key
    assert float(state[key]["best_model_score"]) == pytest.approx(min(val_mae), rel=1e-6)


def test_eval_rebuilds_the_toy_model_from_its_checkpoint(toy_run, tmp_path: Path) -> None:
    _, run_dir = toy_run
    best = next((run_dir / "checkpoints").glob("epoch_*.ckpt"))
    cfg = compose_config(
        "eval",
        [f"ckpt_path={best}", "test=false", "logger=csv", "+trainer.limit_val_batches=2"],
        output_dir=tmp_path / "eval",
    )
    reproduced = evaluate(cfg)
    assert reproduced["val/mae"] == pytest.approx(
        min(logged(read_metrics_csv(run_dir), "val/mae")), rel=1e-5
    )


def test_compare_shows_the_toy_models_columns(toy_run, tmp_path: Path) -> None:
    _, run_dir = toy_run
    out = tmp_path / "report"
    assert compare.main([str(run_dir), "--out", str(out), "--no-plot"]) == 0
    with (out / "comparison.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        (row,) = list(reader)
    # its own metric, throughput; no tokenizer columns, losses left out
    assert reader.fieldnames == ["run", "overrides", "mae", "tokens_per_sec"]
    assert float(row["mae"]) == logged(read_metrics_csv(run_dir), "test/mae")[-1]
    assert row["tokens_per_sec"] == ""


def test_a_monitor_the_model_does_not_log_stops_before_training(tmp_path: Path) -> None:
    cfg = compose_config("train", [*TOY, "monitor.metric=val/psnr"], output_dir=tmp_path)
    with pytest.raises(ValueError, match=r"monitor.metric=val/psnr is not logged by ToyRegressor"):
        train(cfg)
    assert not (tmp_path / "checkpoints").exists()
    cfg = compose_config("train", [*TOY, "monitor.mode=bigger"], output_dir=tmp_path)
    with pytest.raises(ValueError, match=r"monitor\.mode must be 'max'"):
        train(cfg)


def test_quantizer_check_still_guards_the_tokenizers(tmp_path: Path) -> None:
    cfg = compose_config("train", ["quantizer.name=not_a_quantizer"], output_dir=tmp_path)
    with pytest.raises(UnknownQuantizerError):
        check_quantizer_config(cfg)
    check_quantizer_config(compose_config("train", TOY, output_dir=tmp_path))  # no quantizer


def test_tokenizers_monitor_metrics_they_log(short_run, tmp_path: Path) -> None:
    """The names a tokenizer declares (what the monitor check accepts) are the names it logs."""
    from tests.short_run import RUN

    _, run_dir = short_run
    cfg = compose_config("train", RUN, output_dir=tmp_path)
    datamodule = hydra.utils.instantiate(cfg.data)
    model = hydra.utils.instantiate(cfg.model, _convert_="all", in_channels=1)
    assert datamodule.num_channels == 1
    rows = read_metrics_csv(run_dir)
    for stage in ("val", "test"):
        written = {
            name
            for name in rows[0]
            if name.startswith(f"{stage}/") and "frequencies" not in name and logged(rows, name)
        }
        assert set(model.epoch_metric_names(stage)) == written
    assert cfg.monitor.metric in model.epoch_metric_names("val")


@pytest.mark.slow  # two real trials of the toy model: ~20 s on 2 idle cores
def test_optuna_minimises_the_toy_models_metric(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "search"
    result = run_script(
        "train.py",
        "hparams_search=mnist_fsq_optuna",
        "hydra.sweeper.n_trials=2",
        *TOY,
        "++trainer.num_sanity_val_steps=0",
        f"hydra.sweep.dir={sweep_dir}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    trials = sorted(p for p in sweep_dir.iterdir() if p.is_dir())
    assert len(trials) == 2
    final = [logged(read_metrics_csv(trial), "val/mae")[-1] for trial in trials]
    assert final[0] != final[1]
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert results["best_value"] == pytest.approx(min(final), rel=1e-6)  # minimised, not maximised


def test_datamodule_fills_the_model_keywords_left_null() -> None:
    class CodesData:
        def model_keywords(self) -> dict[str, object]:
            return {"grid": [7, 7], "lr": 5.0, "not_a_keyword": 1}

    cfg = OmegaConf.create({"model": {"grid": None, "lr": 0.1}})
    # only keys the model config has, and only where it left them null
    assert model_overrides(cfg, CodesData()) == {"grid": [7, 7]}
