"""Every config in configs/ composes and resolves; every registered quantizer has a config."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import DictConfig, OmegaConf, open_dict

from src.quantizers import registered_quantizers
from src.utils.config_checks import model_takes_quantizer
from tests.conftest import CONFIG_DIR, compose_config

GROUPS = ["data", "model", "quantizer", "trainer", "logger", "callbacks", "debug", "experiment"]
GROUPS += ["adversarial"]
NEEDS = {("data", "image_folder"): ["data.root=/tmp"]}


def resolve_all(cfg: DictConfig) -> dict:
    """Resolve every value but Hydra's own node (which holds deliberately missing help texts)."""
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.pop("hydra")
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))


@pytest.mark.parametrize(
    ("group", "option"), [(g, o) for g in GROUPS for o in options(g)], ids=lambda v: str(v)
)
def test_train_config_composes_and_resolves(group: str, option: str, tmp_path: Path) -> None:
    overrides = [f"{group}={option}", *NEEDS.get((group, option), [])]
    cfg = compose_config("train", overrides, output_dir=tmp_path)
    resolved = resolve_all(cfg)
    if model_takes_quantizer(cfg):  # tokenizers; another kind of model may take none
        assert resolved["model"]["quantizer"]["name"] in registered_quantizers()
    # every model config names the metric its best checkpoint and sweeps follow
    assert resolved["monitor"]["metric"].startswith("val/")
    assert resolved["monitor"]["mode"] in ("max", "min")
    checkpoint = (resolved["callbacks"] or {}).get("model_checkpoint")  # none: callbacks=none
    if checkpoint:
        assert (checkpoint["monitor"], checkpoint["mode"]) == tuple(resolved["monitor"].values())
    if group == "quantizer":  # a variant config `<name>_<what>.yaml` may reuse a name
        name = resolved["model"]["quantizer"]["name"]
        assert option == name or option.startswith(f"{name}_")
    if group == "data":
        assert resolved["data"]["_target_"].startswith("src.data.")


def test_eval_config_composes(tmp_path: Path) -> None:
    cfg = compose_config("eval", ["ckpt_path=some.ckpt"], output_dir=tmp_path)
    resolved = resolve_all(cfg)
    assert resolved["ckpt_path"] == "some.ckpt"
    assert resolved["paths"]["output_dir"] == str(tmp_path)


def test_every_registered_quantizer_has_a_config() -> None:
    assert set(registered_quantizers()) <= set(options("quantizer"))


def test_default_run_dir_is_logs_task_runs_timestamp(tmp_path: Path) -> None:
    cfg = compose_config("train", [])
    run_dir = cfg.hydra.run.dir
    assert run_dir.startswith(f"{cfg.paths.log_dir}/train/runs/")
    assert cfg.hydra.sweep.dir.startswith(f"{cfg.paths.log_dir}/train/multiruns/")


def test_slurm_launcher_follows_the_trainer(tmp_path: Path) -> None:
    overrides = ["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"]
    cfg = compose_config("train", overrides, output_dir=tmp_path)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 4, 4)


@pytest.mark.parametrize(
    ("overrides", "metric", "media"),
    [
        ([], "val/psnr", {"reconstruction_grid", "code_frequencies"}),
        (["experiment=audio_rvq"], "val/si_snr", {"audio_reconstructions", "code_frequencies"}),
        (["model=audio_tokenizer", "data=allison_speech"], "val/si_snr", {"audio_reconstructions"}),
    ],
)
def test_the_model_config_brings_its_monitor_and_media(
    overrides: list[str], metric: str, media: set[str], tmp_path: Path
) -> None:
    cfg = compose_config("train", overrides, output_dir=tmp_path)
    assert (cfg.monitor.metric, cfg.monitor.mode, cfg.optimized_metric) == (metric, "max", metric)
    assert media <= set(cfg.callbacks)
    assert len({"reconstruction_grid", "audio_reconstructions"} & set(cfg.callbacks)) == 1
    assert compose_config("train", [*overrides, "callbacks=none"]).callbacks is None
