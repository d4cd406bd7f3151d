"""Sweeps: `experiment=glob(*)` expands to every experiment, each composing into a runnable
job; the Optuna searches compose onto real config keys; a 2-trial Optuna search runs and each
trial returns the optimized metric."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from src.utils.config_checks import model_takes_quantizer
from tests.conftest import CONFIG_DIR, compose_config
from tests.helpers import QUICK, last_logged, read_metrics_csv, run_script
from tests.test_configs import resolve_all

SEARCHES = sorted(p.stem for p in (Path(CONFIG_DIR) / "hparams_search").glob("*.yaml"))


def expand(override: str) -> list[str]:
    """The job overrides a sweep override stands for, as Hydra's sweepers expand it."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=CONFIG_DIR):
        loader = GlobalHydra.instance().config_loader()
        (parsed,) = OverridesParser.create(config_loader=loader).parse_overrides([override])
        return [f"{parsed.get_key_element()}={value}" for value in parsed.sweep_string_iterator()]


def test_experiment_glob_expands_to_every_experiment_and_each_composes(tmp_path: Path) -> None:
    jobs = expand("experiment=glob(*)")
    on_disk = sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml"))
    assert jobs == [f"experiment={name}" for name in on_disk]
    for job in jobs:
        cfg = compose_config("train", [job], output_dir=tmp_path)
        resolved = resolve_all(cfg)
        assert resolved["data"]["_target_"].startswith("src.data.")
        if model_takes_quantizer(cfg):  # tokenizers; a prior on their codes takes none
            assert resolved["model"]["quantizer"]["name"] == resolved["quantizer"]["name"]
        assert resolved["callbacks"]["model_checkpoint"]["monitor"] == resolved["monitor"]["metric"]


def test_quantizer_list_sweep_expands_in_order() -> None:
    assert expand("quantizer=vq,fsq,lfq,bsq") == [
        "quantizer=vq",
        "quantizer=fsq",
        "quantizer=lfq",
        "quantizer=bsq",
    ]


@pytest.mark.parametrize("search", SEARCHES)
def test_optuna_search_composes_onto_real_keys(search: str, tmp_path: Path) -> None:
    cfg = compose_config("train", [f"hparams_search={search}"], output_dir=tmp_path)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper")
    assert cfg.hydra.mode.name == "MULTIRUN"
    assert cfg.optimized_metric.startswith("val/")
    assert sweeper.params, "an empty search space"
    for key in sweeper.params:
        assert OmegaConf.select(cfg, key, default="<absent>") != "<absent>", (
            f"{search} tunes {key}, which the composed config does not have (a typo?)"
        )


@pytest.mark.slow  # two real trials in one process: ~25 s on 2 idle cores, over the 20 s budget
def test_two_trial_optuna_search_returns_the_metric_of_each_trial(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "search"
    result = run_script(
        "train.py",
        "hparams_search=mnist_fsq_optuna",
        "hydra.sweeper.n_trials=2",
        *QUICK,
        "+trainer.limit_val_batches=2",
        "++trainer.num_sanity_val_steps=0",
        f"hydra.sweep.dir={sweep_dir}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    trials = sorted(p for p in sweep_dir.iterdir() if p.is_dir())
    assert [p.name for p in trials] == ["0", "1"]
    metrics = []
    for trial in trials:
        overrides = yaml.safe_load((trial / ".hydra" / "overrides.yaml").read_text())
        sampled = {o.split("=", 1)[0]: o.split("=", 1)[1] for o in overrides}
        assert sampled["quantizer.levels"] in {"[8,8]", "[8,6,5]", "[8,5,5,5]", "[7,5,5,5,5]"}
        assert 5.0e-4 <= float(sampled["model.lr"]) <= 4.0e-3
        metrics.append(last_logged(read_metrics_csv(trial), "val/psnr"))
    # train.py returned each trial's val/psnr to Optuna, which reports the best of them
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert results["best_value"] == pytest.approx(max(metrics), rel=1e-6)
    assert f"Best value: {results['best_value']}" in result.stdout + result.stderr
