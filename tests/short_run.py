"""One short multi-codebook run that several test files read: a 5-step budget across 3-batch
epochs, validation every 2 steps, a checkpoint every step (newest K kept), residual VQ with 4
codebooks, every logger on. The session fixture `short_run` (tests/conftest.py) runs it once."""

from __future__ import annotations

from pathlib import Path

import wandb

from tests.conftest import compose_config
from train import train

K = 2  # periodic checkpoints kept
CODEBOOKS, CODES = 4, 256  # configs/quantizer/rvq.yaml: num_quantizers, codebook_size
# validations after steps 2 and 4 (the second in epoch 1), none at the end of epoch 0 (step 3)
# nor at the end of training (step 5)
RUN = [
    "quantizer=rvq",
    "logger=many",
    "trainer.max_steps=5",
    "trainer.max_epochs=-1",
    "trainer.val_check_interval=2",
    "trainer.check_val_every_n_epoch=null",
    "+trainer.limit_train_batches=3",
    "+trainer.limit_val_batches=1",
    "+trainer.limit_test_batches=1",
    "trainer.log_every_n_steps=1",
    "callbacks.periodic_checkpoint.every_n_train_steps=1",
    f"callbacks.periodic_checkpoint.save_top_k={K}",
    "callbacks.model_summary=null",
    "callbacks.reconstruction_grid=null",
    "extras.print_config=false",
]


def run_short(run_dir: Path) -> dict[str, float]:
    """Train (and test) into ``run_dir``; returns train.py's metrics."""
    metrics = train(compose_config("train", RUN, output_dir=run_dir))
    wandb.finish()  # in-process: no Hydra job end finishes the W&B run
    return metrics
