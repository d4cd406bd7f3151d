"""The project's ImageTokenizer trained by Lightning: DDP on 2 CPU processes (gloo), or one.

`python -m tests.distributed.lightning_tokenizer_job OUT` trains every case of `RUNS` with
`strategy="ddp"` on 2 processes: Lightning starts rank 1 by running this command again, as it
does for `train.py trainer=ddp_sim`. Each model is built before `trainer.fit`, so before the
process group exists; the tokenizer hands its quantizer a StrategyCommunicator in `setup()`.
Each rank saves `OUT/<case>.rank<r>.pt`: its latent tokens before every step, the quantizer's
state after it, and the final model weights. `train_case(name, devices=1)` trains the same
case on one process. The control `vq_unsynced` trains `vq` with no communicator installed.

Every global batch is rank 0's images (patterns 0 and 1) followed by rank 1's (patterns 2 and
3): a quantizer that learned only from its own rank would miss half the clusters.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from src.models.image_tokenizer import ImageTokenizer

STEPS = 4
IMAGES_PER_RANK = 8
PATTERNS_PER_RANK = 2
SIZE = 8  # images 1 x 8 x 8; the encoder downsamples 4x: 2 x 2 tokens of LATENT_DIM
LATENT_DIM = 8
NOISE = 0.01
# EMA cluster size under which a code is revived; a revived code gets it as its size. Not an
# integer, so a code whose EMA size merely stays put cannot look revived
THRESHOLD = 1.5

CASES: dict[str, dict[str, Any]] = {
    "vq": {
        "name": "vq",
        "codebook_size": 32,
        "decay": 0.8,
        "kmeans_init": True,
        "kmeans_iters": 10,
        "threshold_ema_dead_code": THRESHOLD,
        "commitment_weight": 0.25,
    },
    "rvq": {
        "name": "rvq",
        "num_quantizers": 3,
        "codebook_size": 16,
        "decay": 0.8,
        "kmeans_init": True,
        "kmeans_iters": 10,
        "threshold_ema_dead_code": THRESHOLD,
        "quantize_dropout": True,
        "commitment_weight": 0.25,
    },
    # vector-quantize-pytorch's VectorQuantize through quantizer=external: built before the
    # group, the library leaves its own torch.distributed sync off and the wrapper routes its
    # codebook hooks through the StrategyCommunicator (src/quantizers/external.py). Set off
    # explicitly: built after an earlier case's fit, the group would exist and the library
    # would sync itself (sampling per rank, not as one process on the union would)
    "external_vq": {
        "name": "external",
        "target": "vector_quantize_pytorch.VectorQuantize",
        "sync_codebook": False,
        "codebook_size": 32,
        "decay": 0.8,
        "kmeans_init": True,
        "kmeans_iters": 10,
        "threshold_ema_dead_code": THRESHOLD,
        "commitment_weight": 0.25,
    },
    # the latent normalisation's batch statistics and running estimates (FSQ has no state)
    "fsq_norm": {"name": "fsq", "levels": [5, 5, 5]},
}
# tokenizer options of a case besides its quantizer
MODEL_OPTIONS: dict[str, dict[str, Any]] = {"fsq_norm": {"latent_norm": "batch"}}
# control cases: the same quantizer, no communicator
UNSYNCED = {"vq_unsynced": "vq", "fsq_norm_unsynced": "fsq_norm"}
RUNS = [*CASES, *UNSYNCED]


def patterns() -> Tensor:
    """(2 * PATTERNS_PER_RANK, 1, SIZE, SIZE) fixed images in [0, 1]; rank r owns its slice."""
    generator = torch.Generator().manual_seed(7)
    return torch.rand(2 * PATTERNS_PER_RANK, 1, SIZE, SIZE, generator=generator)


def global_batch(step: int) -> Tensor:
    """(2 * IMAGES_PER_RANK, 1, SIZE, SIZE): rank 0's images, then rank 1's, with noise."""
    generator = torch.Generator().manual_seed(100 + step)
    picks = torch.randint(0, PATTERNS_PER_RANK, (2, IMAGES_PER_RANK), generator=generator)
    picks = picks + torch.arange(2).unsqueeze(1) * PATTERNS_PER_RANK
    images = patterns()[picks.reshape(-1)]
    return images + NOISE * torch.randn(images.shape, generator=generator)


class ShardBatches(Dataset):
    """Step `s` -> this rank's shard of `global_batch(s)` (the whole batch on one process)."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        return STEPS

    def __getitem__(self, step: int) -> Tensor:
        return global_batch(step).chunk(self.world_size)[self.rank]


class ShardedImages(L.LightningDataModule):
    """One pre-made batch per step, split by rank here (Lightning's sampler is turned off)."""

    def train_dataloader(self) -> DataLoader:
        data = ShardBatches(self.trainer.global_rank, self.trainer.world_size)
        return DataLoader(data, batch_size=None, shuffle=False)


class UnsyncedImageTokenizer(ImageTokenizer):
    """The control: `setup()` leaves the quantizer without a communicator."""

    def setup(self, stage: str) -> None:
        pass


class RecordQuantizer(L.Callback):
    """Seeds the RNG as training starts (the same on every rank and on one process: DDP
    re-seeds at setup, one process does not); keeps this rank's latent tokens before each
    step and the quantizer's state after it (before the next forward's buffer broadcast)."""

    def __init__(self) -> None:
        self.tokens: list[Tensor] = []
        self.states: list[dict[str, Tensor]] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        torch.manual_seed(1)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Tensor, batch_idx: int
    ) -> None:
        with torch.no_grad():
            latents = pl_module.encoder(batch * 2 - 1)
        self.tokens.append(latents.movedim(1, -1).reshape(-1, latents.shape[1]).clone())

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        state = pl_module.quantizer.state_dict()
        state.update({f"latent_norm.{k}": v for k, v in pl_module.latent_norm.state_dict().items()})
        self.states.append({k: v.detach().clone() for k, v in state.items()})


def build_model(name: str) -> ImageTokenizer:
    """The case's tokenizer with seeded weights (the same on every rank and on one process)."""
    torch.manual_seed(0)
    model_class = UnsyncedImageTokenizer if name in UNSYNCED else ImageTokenizer
    case = UNSYNCED.get(name, name)
    return model_class(
        in_channels=1,
        quantizer=dict(CASES[case]),
        **MODEL_OPTIONS.get(case, {}),
        latent_dim=LATENT_DIM,
        channels=(8, 16, 16),
        lr=2e-3,
        warmup_steps=0,
    )


def train_case(name: str, devices: int = 1) -> dict[str, Any]:
    """Train one case; returns its rank and, per step, this rank's latent tokens before the
    step and the quantizer's state after it, and the final model weights."""
    model = build_model(name)
    recorder = RecordQuantizer()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_epochs=1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[recorder],
    )
    trainer.fit(model, datamodule=ShardedImages())
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {
        "rank": trainer.global_rank,
        "tokens": recorder.tokens,
        "steps": recorder.states,
        "model": weights,
    }


def main(out: Path) -> None:
    """Every case (and control) on 2 DDP ranks; each rank saves what it recorded."""
    torch.set_num_threads(1)  # two ranks on two cores
    for name in RUNS:
        result = train_case(name, devices=2)
        torch.save(result, out / f"{name}.rank{result['rank']}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
