"""Fixtures that compose the real configs (as train.py / eval.py do) for fast CPU runs."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from src.utils.run_name import register_resolvers

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = str(ROOT / "configs")
os.environ.setdefault("PROJECT_ROOT", str(ROOT))


@pytest.fixture(autouse=True)
def restore_torch_threads() -> Iterator[None]:
    """Give every test the process's intra-op thread count back: a test that sets one thread and
    leaves it so makes later in-process runs reduce in another order than their subprocess twins
    (test_resume's SIGKILL case then differed from its reference in the 4th digit)."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def compose_config(
    config_name: str, overrides: list[str] | None = None, output_dir: Path | None = None
) -> DictConfig:
    """Compose `configs/<config_name>.yaml` with Hydra's own config set, as a real run would."""
    register_resolvers()  # the run-directory resolvers that train.py / eval.py register
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=CONFIG_DIR):
        cfg = compose(config_name, overrides=overrides or [], return_hydra_config=True)
    if output_dir is not None:
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(output_dir)
            cfg.hydra.job.num = 0
    HydraConfig().set_config(cfg)
    return cfg


@pytest.fixture
def train_config(tmp_path: Path) -> Iterator[callable]:
    """Factory: the train config with overrides, writing into a fresh temporary run dir."""

    def make(*overrides: str) -> DictConfig:
        return compose_config("train", list(overrides), output_dir=tmp_path / "run")

    yield make
    GlobalHydra.instance().clear()


@pytest.fixture(scope="session")
def short_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, float], Path]:
    """Metrics and run directory of tests/short_run.py's run, trained once per session."""
    from tests.short_run import run_short  # imports train.py only when a test needs it

    run_dir = tmp_path_factory.mktemp("short_run")
    return run_short(run_dir), run_dir
