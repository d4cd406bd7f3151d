"""Under SLURM, only our preemption handler requeues: Lightning's SLURMEnvironment auto-requeue
is turned off when train.py's handler is on (issue 16), so a job is never requeued twice."""

from __future__ import annotations

import lightning as L
import pytest
from lightning.pytorch.plugins.environments import SLURMEnvironment

from src.utils.run_controller import trainer_plugins
from tests.conftest import compose_config


@pytest.fixture
def fake_slurm_job(monkeypatch: pytest.MonkeyPatch) -> None:
    """The variables srun sets for a one-task job step (what SLURMEnvironment.detect reads)."""
    for name, value in {
        "SLURM_NTASKS": "1",
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_JOB_NAME": "train",
        "SLURM_JOB_ID": "1234",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_NODELIST": "node1",
    }.items():
        monkeypatch.setenv(name, value)


def _environments(plugins: dict) -> list[SLURMEnvironment]:
    return [p for p in plugins.get("plugins", []) if isinstance(p, SLURMEnvironment)]


def test_slurm_job_gets_lightnings_environment_without_auto_requeue(fake_slurm_job) -> None:
    plugins = trainer_plugins(compose_config("train"))
    (environment,) = _environments(plugins)
    assert environment.auto_requeue is False
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, **plugins)
    assert isinstance(trainer._accelerator_connector.cluster_environment, SLURMEnvironment)
    assert trainer._accelerator_connector.cluster_environment.auto_requeue is False


def test_without_our_handler_lightning_keeps_its_requeue(fake_slurm_job) -> None:
    assert _environments(trainer_plugins(compose_config("train", ["preemption.signals=[]"]))) == []


def test_outside_slurm_no_cluster_environment_is_forced(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    assert _environments(trainer_plugins(compose_config("train"))) == []
