"""The run controller's parts on their own: sampler position, RNG states, atomic writes, choice
of the checkpoint to resume, config checks, run names. Fast: no training."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf, open_dict
from omegaconf.errors import InterpolationResolutionError

from src.callbacks.config_in_checkpoint import CONFIG_KEY
from src.callbacks.resume_state import collect_rng_states, restore_rng_states
from src.data.resumable_sampler import ResumableRandomSampler
from src.utils.checkpoint_io import AtomicCheckpointIO
from src.utils.resume import ResumeError, newest_checkpoint, resume_point
from src.utils.run_name import BadRunNameError, check_run_name, run_dir_name, run_id
from tests.conftest import compose_config


def test_sampler_resumes_mid_pass_and_after_a_pass() -> None:
    data = range(50)
    sampler = ResumableRandomSampler(data, seed=3)
    first = iter(sampler)
    head = [next(first) for _ in range(17)]
    state = sampler.state_dict(consumed=17)
    rest = list(first)
    second_pass = list(sampler)

    restored = ResumableRandomSampler(data, seed=99)  # the seed is replaced by the state
    restored.load_state_dict(state)
    assert list(restored) == rest
    assert sorted(head + rest) == list(data)

    after_pass = ResumableRandomSampler(data, seed=3)
    list(after_pass)
    state = after_pass.state_dict(consumed=None)  # pass complete: the next one starts afresh
    again = ResumableRandomSampler(data, seed=99)
    again.load_state_dict(state)
    assert list(again) == second_pass != rest


def test_sampler_refuses_a_position_beyond_its_data() -> None:
    sampler = ResumableRandomSampler(range(10), seed=0)
    list(sampler)
    state = sampler.state_dict(consumed=5)
    with pytest.raises(ValueError, match="data changed"):
        ResumableRandomSampler(range(4), seed=0).load_state_dict(state)


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    torch.save({"rng": collect_rng_states()}, tmp_path / "s.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(2), np.random.seed(2), random.seed(2)
    restore_rng_states(torch.load(tmp_path / "s.pt", weights_only=True)["rng"])
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0])
    assert np.array_equal(got[1], expected[1]) and got[2] == expected[2]


def test_atomic_save_keeps_the_old_file_when_the_write_dies(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "ckpts" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 1}, target)
    assert torch.load(target, weights_only=True) == {"global_step": 1}

    def dies_halfway(obj, file) -> None:
        file.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt  # stands in for the process being killed mid-write

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"global_step": 2}, target)
    monkeypatch.undo()
    assert torch.load(target, weights_only=True) == {"global_step": 1}
    assert [p.name for p in target.parent.iterdir()] == ["last.ckpt"]


def write_checkpoint(path: Path, step: int, config: dict | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"global_step": step, CONFIG_KEY: config or {}}, path)


def test_resume_skips_a_truncated_checkpoint_for_the_newest_loadable(tmp_path: Path, caplog):
    ckpts = tmp_path / "checkpoints"
    write_checkpoint(ckpts / "step_0000004.ckpt", 4)
    write_checkpoint(ckpts / "step_0000006.ckpt", 6)
    whole = (ckpts / "step_0000006.ckpt").read_bytes()
    (ckpts / "last.ckpt").write_bytes(whole[: len(whole) // 2])  # killed while being copied
    (ckpts / "step_0000008.ckpt").write_bytes(b"")
    point = newest_checkpoint(ckpts)
    assert point is not None and (point.path.name, point.global_step) == ("step_0000006.ckpt", 6)
    assert "skipping checkpoint" in caplog.text and "last.ckpt" in caplog.text


def test_resume_refuses_when_no_checkpoint_loads(tmp_path: Path) -> None:
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    (ckpts / "last.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ResumeError, match="none of the checkpoints") as error:
        newest_checkpoint(ckpts)
    assert "last.ckpt" in str(error.value) and "ckpt_path=" in str(error.value)
    assert (ckpts / "last.ckpt").read_bytes() == b"not a checkpoint"  # nothing removed
    assert newest_checkpoint(tmp_path / "absent") is None


def test_resume_with_an_incompatible_config_lists_the_differences(tmp_path: Path) -> None:
    cfg = compose_config("train", ["run_name=mine", "quantizer=vq"], output_dir=tmp_path)
    stored = OmegaConf.to_container(cfg, resolve=True)
    stored.pop("hydra", None)
    write_checkpoint(tmp_path / "checkpoints" / "last.ckpt", 10, stored)
    assert resume_point(cfg, tmp_path).global_step == 10

    with open_dict(cfg):
        cfg.quantizer.codebook_size = 1024
        cfg.trainer.max_epochs = 50  # a longer budget may change between attempts
    with pytest.raises(ResumeError) as error:
        resume_point(cfg, tmp_path)
    message = str(error.value)
    assert "model.quantizer.codebook_size: 512 -> 1024" in message
    assert "max_epochs" not in message and "new run_name" in message
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


def test_resume_needs_a_run_name_or_is_off(tmp_path: Path) -> None:
    write_checkpoint(tmp_path / "checkpoints" / "last.ckpt", 3)
    assert resume_point(compose_config("train", [], output_dir=tmp_path), tmp_path) is None
    cfg = compose_config("train", ["run_name=x", "resume.auto=false"], output_dir=tmp_path)
    assert resume_point(cfg, tmp_path) is None


@pytest.mark.parametrize("name", ["a/b", "../up", "..", ".hidden", "with space", "x" * 200, ""])
def test_bad_run_names_are_refused(name: str) -> None:
    with pytest.raises(BadRunNameError, match="run_name="):
        check_run_name(name)


def test_run_name_names_the_run_dir_and_the_logger_id(tmp_path: Path) -> None:
    assert check_run_name("fsq_8x6x5-v2.1") == "fsq_8x6x5-v2.1"
    assert run_dir_name(None, "2026-01-01_00-00-00") == "2026-01-01_00-00-00"
    assert run_id(None) is None
    cfg = compose_config("train", ["run_name=long_vq"])
    assert cfg.hydra.run.dir == f"{cfg.paths.log_dir}/train/runs/long_vq"
    assert cfg.hydra.sweep.dir == f"{cfg.paths.log_dir}/train/multiruns/long_vq"
    assert cfg.run_id == "long_vq"
    assert compose_config("train", []).run_id is None


def test_a_run_name_with_a_separator_stops_before_the_run_dir_exists(tmp_path: Path) -> None:
    # Hydra resolves the run directory before it creates it or calls train(): the error is
    # raised there (train.py prints it as Hydra's interpolation error)
    cfg = compose_config("train", ["run_name=a/b", f"paths.log_dir={tmp_path}"])
    with pytest.raises(InterpolationResolutionError, match="run_name='a/b' contains a path"):
        _ = cfg.hydra.run.dir
    assert not any(tmp_path.iterdir())
