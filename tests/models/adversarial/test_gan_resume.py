"""Kill-and-resume equals the uninterrupted run with adversarial training (one process): both
optimisers, both schedules, the discriminator, its step count and LeCam's EMAs come back."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch

from tests.conftest import compose_config
from tests.run_control_helpers import start_script, wait_for_file
from train import train

# 2 epochs of 3 batches = 6 steps; checkpoints every 2 steps; discriminator from step 1
RUN = [
    "experiment=mnist_fsq_gan",
    "trainer.max_epochs=2",
    "+trainer.limit_train_batches=3",
    "+trainer.limit_val_batches=1",
    "+trainer.limit_test_batches=1",
    "trainer.log_every_n_steps=1",
    "callbacks.periodic_checkpoint.every_n_train_steps=2",
    "callbacks.model_summary=null",
    "callbacks.reconstruction_grid=null",
    "callbacks.code_frequencies=null",
    "extras.print_config=false",
    "model.adversarial.disc_start=1",
    "model.adversarial.lecam_weight=0.1",
    "model.adversarial.warmup_steps=2",
    "model.adversarial.discriminators.0.channels=8",
]
FINAL = ["val/psnr", "val/loss", "test/psnr", "test/loss"]


def test_sigkilled_gan_run_resumes_to_the_uninterrupted_result(tmp_path: Path) -> None:
    reference_dir = tmp_path / "reference"
    expected = train(compose_config("train", RUN, output_dir=reference_dir))

    log_dir, flag = tmp_path / "logs", tmp_path / "held"
    process = start_script(
        "train.py",
        *RUN,
        "run_name=held",
        f"paths.log_dir={log_dir}",
        "+callbacks.hold._target_=tests.run_control_helpers.HoldAtStep",
        "+callbacks.hold.step=5",
        f"+callbacks.hold.flag={flag}",
    )
    wait_for_file(flag, process)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    run_dir = log_dir / "train" / "runs" / "held"
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 4  # mid-epoch 1, the discriminator had stepped 3 times
    assert int(last["state_dict"]["disc_steps"]) == 3

    resumed = train(compose_config("train", [*RUN, "run_name=held"], output_dir=run_dir))
    for name in FINAL:
        assert resumed[name] == pytest.approx(expected[name], rel=1e-5, abs=1e-6), name
    ours = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    ref = torch.load(reference_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ours["global_step"] == ref["global_step"] == 6
    for name, value in ref["state_dict"].items():
        assert torch.allclose(ours["state_dict"][name].float(), value.float(), atol=1e-6), name
    assert int(ours["state_dict"]["disc_steps"]) == 5
    # both optimisers' moments and both schedules
    assert len(ours["optimizer_states"]) == len(ours["lr_schedulers"]) == 2
    for a, b in zip(ours["optimizer_states"], ref["optimizer_states"], strict=True):
        for key, moments in b["state"].items():
            for k, v in moments.items():
                assert torch.allclose(a["state"][key][k].float(), v.float(), atol=1e-6), (key, k)
    assert ours["lr_schedulers"] == ref["lr_schedulers"]
