"""Adversarial training under 2-process gloo DDP (trainer=ddp_sim): after steps on different
shards, generator and discriminator are equal on both ranks, and the discriminator did train."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.helpers import run_script

RUN = [
    "experiment=mnist_fsq_gan",
    "trainer=ddp_sim",
    "trainer.max_epochs=1",
    "+trainer.limit_train_batches=3",
    "+trainer.limit_val_batches=1",
    "+trainer.limit_test_batches=1",
    "test=false",
    "extras.print_config=false",
    "callbacks.model_summary=null",
    "callbacks.reconstruction_grid=null",
    "callbacks.code_frequencies=null",
    # step 0 without the discriminator (its parameters in DDP's graph with a zero factor), steps
    # 1 and 2 with it, LeCam on (its EMAs are averaged over ranks)
    "model.adversarial.disc_start=1",
    "model.adversarial.lecam_weight=0.1",
    "model.adversarial.discriminators.0.channels=8",
]


def test_discriminator_and_generator_agree_on_both_ranks(tmp_path: Path) -> None:
    states = tmp_path / "states"
    result = run_script(
        "train.py",
        *RUN,
        f"hydra.run.dir={tmp_path / 'run'}",
        f"paths.log_dir={tmp_path / 'logs'}",
        "+callbacks.rank_state._target_=tests.models.adversarial.rank_state.SaveRankState",
        f"+callbacks.rank_state.directory={states}",
        timeout=1800,  # ~1 min on 2 idle cores; generous for a shared box
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    end = [torch.load(states / f"rank{r}_end.pt", weights_only=True) for r in (0, 1)]
    start = torch.load(states / "rank0_start.pt", weights_only=True)
    assert end[0].keys() == end[1].keys()
    for name in end[0]:
        assert torch.equal(end[0][name], end[1][name]), name
    disc = [k for k in end[0] if k.startswith("discriminator.")]
    assert disc and any(not torch.equal(end[0][k], start[k]) for k in disc)
    assert int(end[0]["disc_steps"]) == 2
    assert float(end[0]["lecam.ema_real"]) != 0.0
