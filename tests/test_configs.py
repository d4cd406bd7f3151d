"""Every config in configs/ composes and resolves; every registered quantizer has a config."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import DictConfig, OmegaConf, open_dict

from src.quantizers import registered_quantizers
from tests.conftest import CONFIG_DIR, compose_config

GROUPS = ["data", "model", "quantizer", "trainer", "logger", "callbacks", "debug", "experiment"]
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
    assert resolved["model"]["quantizer"]["name"] in registered_quantizers()
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
