"""Shared base for the image datamodules: seeded disjoint splits and the three loaders."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from lightning import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from src.data.resumable_sampler import ResumableRandomSampler

__all__ = ["SplitImageDataModule", "as_tuple", "seeded_split", "split_sizes"]


def split_sizes(
    num_samples: int, val_fraction: float, test_fraction: float
) -> tuple[int, int, int]:
    """Return ``(train, val, test)`` sizes; a non-zero fraction always gets at least one sample."""
    for name, fraction in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {fraction}")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"val_fraction + test_fraction must be < 1, got {val_fraction} + {test_fraction}"
        )
    num_val = max(round(num_samples * val_fraction), int(val_fraction > 0))
    num_test = max(round(num_samples * test_fraction), int(test_fraction > 0))
    num_train = num_samples - num_val - num_test
    if num_train < 1:
        raise ValueError(
            f"{num_samples} samples are too few for val_fraction={val_fraction} and "
            f"test_fraction={test_fraction}: nothing would be left to train on"
        )
    return num_train, num_val, num_test


def seeded_split(
    num_samples: int, val_fraction: float, test_fraction: float, seed: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Split ``range(num_samples)`` into disjoint train/val/test index tensors, each in the
    permuted order (sources such as the MNIST table are sorted by label; a shuffled fixed order
    gives varied validation images and grids).

    Uses a private ``torch.Generator`` seeded with ``seed`` (never the global RNG), so the same
    seed gives the same split in any process.
    """
    num_train, num_val, _ = split_sizes(num_samples, val_fraction, test_fraction)
    perm = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed))
    train = perm[:num_train]
    val = perm[num_train : num_train + num_val]
    test = perm[num_train + num_val :]
    return train, val, test


class SplitImageDataModule(LightningDataModule):
    """Base datamodule: subclasses build three image datasets, this class serves the loaders.

    Every loader yields float32 image batches ``(B, C, H, W)`` in [0, 1], nothing else. Subclasses
    set ``num_channels`` and ``image_size`` in ``__init__`` (the model config reads them before
    ``setup``) and implement :meth:`build_splits`.

    The train loader shuffles with its own generator seeded from ``seed`` and
    ``torch.initial_seed()`` (which ``lightning.seed_everything`` sets), so a seeded run repeats
    its batch order exactly while other code drawing from the global RNG cannot change it. Its
    sampler (:attr:`train_sampler`, built once) saves and restores its position, so a resumed
    run continues the same batch order (``src.callbacks.ResumeState``).

    Datamodules save no hyperparameters: the run's composed config (logged by train.py and
    stored in every checkpoint) is the record. Lightning merges a datamodule's hyperparameters
    with the model's for the loggers and refuses keys that differ (``channels`` of an image
    folder against the model's widths), and Hydra's list values in them would not load with
    ``weights_only=True``.
    """

    num_channels: int
    image_size: tuple[int, int]

    def __init__(
        self, batch_size: int = 64, num_workers: int = 0, pin_memory: bool = False, seed: int = 0
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.pin_memory = bool(pin_memory)
        self.seed = int(seed)
        self.data_train: Dataset[Tensor] | None = None
        self.data_val: Dataset[Tensor] | None = None
        self.data_test: Dataset[Tensor] | None = None
        self._train_sampler: ResumableRandomSampler | None = None

    def build_splits(self) -> tuple[Dataset[Tensor], Dataset[Tensor], Dataset[Tensor]]:
        """Return the (train, val, test) datasets; each item is one ``(C, H, W)`` float image."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        """Build all three splits once (they are small or lazy, and eval needs val and test)."""
        if self.data_train is None:
            self.data_train, self.data_val, self.data_test = self.build_splits()

    def shuffle_seed(self) -> int:
        """Seed of the train loader's generator: depends on ``seed`` and ``seed_everything``."""
        return (torch.initial_seed() * 1_000_003 + self.seed) % (2**63 - 1)

    @property
    def train_sampler(self) -> ResumableRandomSampler:
        """The train loader's shuffling sampler: one per datamodule, its position checkpointed."""
        if self._train_sampler is None:
            self.setup()
            if self.data_train is None:
                raise RuntimeError(f"{type(self).__name__}.build_splits() returned None for train")
            self._train_sampler = ResumableRandomSampler(self.data_train, self.shuffle_seed())
        return self._train_sampler

    def _loader(self, dataset: Dataset[Tensor] | None, shuffle: bool) -> DataLoader[Tensor]:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.build_splits() returned None for a split")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=self.train_sampler if shuffle else None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            drop_last=False,
            # its own generator: starting an epoch (which draws the workers' base seed) must not
            # consume the global RNG, or a resumed run would draw different random numbers
            generator=torch.Generator().manual_seed(self.shuffle_seed()),
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader[Tensor]:
        """Shuffled training batches."""
        self.setup()
        return self._loader(self.data_train, shuffle=True)

    def val_dataloader(self) -> DataLoader[Tensor]:
        """Validation batches in fixed order."""
        self.setup()
        return self._loader(self.data_val, shuffle=False)

    def test_dataloader(self) -> DataLoader[Tensor]:
        """Test batches in fixed order."""
        self.setup()
        return self._loader(self.data_test, shuffle=False)


def as_tuple(names: Sequence[str] | str) -> tuple[str, ...]:
    """Turn a name or a sequence of names (list, tuple, OmegaConf ListConfig) into a tuple."""
    return (names,) if isinstance(names, str) else tuple(str(n) for n in names)
