"""A small CNN that classifies the embedded MNIST digits: the judge of a prior's image samples.

Trained once on the embedded training split (seeded), then cached on disk under a fingerprint
of its recipe, this file's source and the data, so every run and every process reuses the same
weights. Its penultimate layer (128 ReLU features) is the feature space of the Frechet distance
(:mod:`src.metrics.frechet`), as Inception's pool layer is for FID.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from src.data.embedded_mnist_labels import mnist_5k_split
from src.utils.cache_dir import project_cache_dir

__all__ = [
    "ClassifierRecipe",
    "DigitClassifier",
    "check_digit_images",
    "classifier_fingerprint",
    "load_digit_classifier",
    "train_digit_classifier",
]

log = logging.getLogger(__name__)


def check_digit_images(images: Tensor) -> None:
    """Raise ``ValueError`` unless ``images`` is a float tensor ``(N, 1, 28, 28)`` in [0, 1]."""
    if images.dim() != 4 or tuple(images.shape[1:]) != (1, 28, 28):
        raise ValueError(
            f"digit images must have shape (N, 1, 28, 28), got {tuple(images.shape)}: decode "
            "codes to images first (tokenizer.decode_codes) and keep the channel axis"
        )
    if not images.is_floating_point():
        raise ValueError(f"digit images must be float in [0, 1], got dtype {images.dtype}")
    if images.numel() and (images.min() < -1e-3 or images.max() > 1 + 1e-3):
        raise ValueError(
            f"digit images must lie in [0, 1], found [{float(images.min()):.3f}, "
            f"{float(images.max()):.3f}]: clamp decoder outputs, or divide uint8 pixels by 255"
        )


class DigitClassifier(nn.Module):
    """Three 3x3 conv blocks (16, 32, 64 channels; two 2x2 max-pools) -> 128 features -> 10.

    Input: ``(N, 1, 28, 28)`` in [0, 1]. No batch norm or dropout, so training and eval mode
    compute the same function (a metric holding it may be switched to train mode by its owner).
    """

    num_features = 128

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 14x14
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 7x7
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(64 * 7 * 7, self.num_features),
            nn.ReLU(),
        )
        self.head = nn.Linear(self.num_features, 10)

    def features(self, images: Tensor) -> Tensor:
        """Penultimate-layer features ``(N, 128)``."""
        return self.body((images - 0.13) / 0.31)  # about MNIST's pixel mean and std

    def forward(self, images: Tensor) -> Tensor:
        """Class logits ``(N, 10)``."""
        return self.head(self.features(images))


@dataclass(frozen=True)
class ClassifierRecipe:
    """Everything that determines the trained weights (part of the cache fingerprint)."""

    epochs: int = 8
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    #: random affine augmentation: rotation (degrees), scale, translation (pixels)
    max_rotation: float = 10.0
    max_scale: float = 0.1
    max_shift: float = 2.0
    seed: int = 0
    #: train on the first N digits of the training split only (None = all; quick tests)
    train_samples: int | None = None
    #: the embedded data split (as configs/data/mnist_embedded.yaml)
    split_seed: int = 0
    val_fraction: float = 0.1
    test_fraction: float = 0.1


def classifier_fingerprint(recipe: ClassifierRecipe) -> str:
    """16 hex digits over the recipe, this file's source and the training split's data."""
    images, labels = mnist_5k_split(
        "train", recipe.split_seed, recipe.val_fraction, recipe.test_fraction
    )
    digest = hashlib.sha256()
    digest.update(json.dumps(dataclasses.asdict(recipe), sort_keys=True).encode())
    digest.update(Path(__file__).read_bytes())
    digest.update(images.numpy().tobytes())
    digest.update(labels.numpy().tobytes())
    return digest.hexdigest()[:16]


def _augment(images: Tensor, recipe: ClassifierRecipe, generator: torch.Generator) -> Tensor:
    """Random rotation, scale and shift per image (one batched ``grid_sample``)."""
    n = images.shape[0]

    def uniform(bound: float) -> Tensor:
        return (torch.rand(n, generator=generator) * 2 - 1) * bound

    angle = uniform(math.radians(recipe.max_rotation))
    scale = 1 + uniform(recipe.max_scale)
    shift = uniform(2 * recipe.max_shift / 28), uniform(2 * recipe.max_shift / 28)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[0]], 1), torch.stack([sin, cos, shift[1]], 1)], 1
    )
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, align_corners=False, padding_mode="zeros")


@torch.no_grad()
def _accuracy(model: DigitClassifier, images: Tensor, labels: Tensor) -> float:
    predictions = torch.cat([model(chunk).argmax(-1) for chunk in images.split(1000)])
    return float((predictions == labels).double().mean())


def train_digit_classifier(
    recipe: ClassifierRecipe = ClassifierRecipe(),
) -> tuple[DigitClassifier, dict[str, float]]:
    """Train on the embedded training split with AdamW + one-cycle LR; the global RNG is left
    untouched. Returns the model (eval mode) and ``{val,test}_accuracy`` and ``train_seconds``."""
    split = (recipe.split_seed, recipe.val_fraction, recipe.test_fraction)
    images, labels = mnist_5k_split("train", *split)
    images, labels = images[: recipe.train_samples], labels[: recipe.train_samples]
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        model = DigitClassifier()
    generator = torch.Generator().manual_seed(recipe.seed + 1)
    steps_per_epoch = math.ceil(len(images) / recipe.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), recipe.lr, weight_decay=recipe.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, recipe.lr, total_steps=recipe.epochs * steps_per_epoch
    )
    model.train()
    for _ in range(recipe.epochs):
        order = torch.randperm(len(images), generator=generator)
        for batch in order.split(recipe.batch_size):
            loss = F.cross_entropy(model(_augment(images[batch], recipe, generator)), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    report = {"train_seconds": time.perf_counter() - start}
    for name in ("val", "test"):
        report[f"{name}_accuracy"] = _accuracy(model, *mnist_5k_split(name, *split))
    return model, report


def load_digit_classifier(
    recipe: ClassifierRecipe = ClassifierRecipe(), cache_dir: str | Path | None = None
) -> DigitClassifier:
    """The trained classifier (eval mode, frozen), from ``<cache_dir>/digit_classifier-<fp>.pt``
    or trained and saved there first (~30 s of one CPU core). ``cache_dir`` defaults to
    :func:`~src.utils.cache_dir.project_cache_dir` ``("digit_classifier")``. The measured
    accuracies are in ``model.report``."""
    folder = Path(cache_dir) if cache_dir is not None else project_cache_dir("digit_classifier")
    fingerprint = classifier_fingerprint(recipe)
    path = folder / f"digit_classifier-{fingerprint}.pt"
    if path.is_file():
        payload = torch.load(path, map_location="cpu", weights_only=True)
        model = DigitClassifier()
        model.load_state_dict(payload["state_dict"])
        report = dict(payload["report"])
    else:
        log.info("training the digit classifier (fingerprint %s) for %s", fingerprint, path)
        model, report = train_digit_classifier(recipe)
        folder.mkdir(parents=True, exist_ok=True)
        payload = {"state_dict": model.state_dict(), "report": report, "fingerprint": fingerprint}
        # written beside the target, then renamed: concurrent processes never read half a file
        handle, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        os.close(handle)
        torch.save(payload, tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a cache is for every user
        os.replace(tmp, path)
    model.eval().requires_grad_(False)
    model.report = report  # type: ignore[assignment]
    model.fingerprint = fingerprint  # type: ignore[assignment]
    return model
