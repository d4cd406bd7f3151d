"""Frechet distance and class accuracy of digit images, judged by the cached digit classifier.

The Frechet distance is torchmetrics' ``FrechetInceptionDistance`` with the classifier's
penultimate features in place of Inception (``feature=<nn.Module>``: offline, no torch-fidelity;
float64 statistics, reduced over ranks by torchmetrics under DDP):
``FD = |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance

from src.data.embedded_mnist_labels import mnist_5k_split
from src.metrics.digit_classifier import (
    DigitClassifier,
    check_digit_images,
    load_digit_classifier,
)

__all__ = [
    "DigitFeatures",
    "class_accuracy",
    "digit_fd_metric",
    "frechet_distance",
    "frechet_distance_from_features",
    "mnist_reference_rows",
]

_CHUNK = 1000  # images per forward pass


class DigitFeatures(nn.Module):
    """The classifier's penultimate features as a torchmetrics feature extractor: inputs are
    checked ``(N, 1, 28, 28)`` images in [0, 1]; the classifier stays frozen and in eval mode
    whatever mode its owner sets."""

    def __init__(self, classifier: DigitClassifier | None = None) -> None:
        super().__init__()
        self.classifier = classifier if classifier is not None else load_digit_classifier()
        self.classifier.eval().requires_grad_(False)
        self.num_features = self.classifier.num_features

    def train(self, mode: bool = True) -> DigitFeatures:
        """Always eval: a metric's features must not depend on the training mode."""
        return super().train(False)

    def forward(self, images: Tensor) -> Tensor:
        check_digit_images(images)
        return self.classifier.features(images.float())


class _Identity(nn.Module):
    """Features are the inputs themselves (:func:`frechet_distance_from_features`)."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features


def digit_fd_metric(
    classifier: DigitClassifier | None = None, reset_real_features: bool = False
) -> FrechetInceptionDistance:
    """A torchmetrics Metric: ``update(images, real=True/False)``, ``compute()`` -> FD.

    With ``reset_real_features=False`` (default) the real statistics (e.g. the test digits,
    added once) survive ``reset()``, so each validation only adds its samples.
    """
    return FrechetInceptionDistance(
        feature=DigitFeatures(classifier), reset_real_features=reset_real_features
    )


def _fd(metric: FrechetInceptionDistance, a: Tensor, b: Tensor) -> float:
    for real, values in ((True, a), (False, b)):
        if values.shape[0] < 2:
            raise ValueError(f"the Frechet distance needs >= 2 samples per set, got {len(values)}")
        for chunk in values.split(_CHUNK):
            metric.update(chunk, real=real)
    return float(metric.compute())


def frechet_distance_from_features(features_a: Tensor, features_b: Tensor) -> float:
    """FD between two feature sets ``(N_a, D)`` and ``(N_b, D)`` (float64 statistics)."""
    if features_a.dim() != 2 or features_b.dim() != 2 or features_a.shape[1] != features_b.shape[1]:
        raise ValueError(
            f"feature sets must be (N, D) with the same D, got {tuple(features_a.shape)} and "
            f"{tuple(features_b.shape)}"
        )
    metric = FrechetInceptionDistance(feature=_Identity(features_a.shape[1]))
    return _fd(metric, features_a.double(), features_b.double())


def frechet_distance(
    images_a: Tensor, images_b: Tensor, classifier: DigitClassifier | None = None
) -> float:
    """FD between the classifier features of two image sets ``(N, 1, 28, 28)`` in [0, 1]."""
    check_digit_images(images_a)
    check_digit_images(images_b)
    return _fd(digit_fd_metric(classifier), images_a.cpu(), images_b.cpu())


def class_accuracy(
    images: Tensor, labels: Tensor, classifier: DigitClassifier | None = None
) -> float:
    """Fraction of ``images`` ``(N, 1, 28, 28)`` that the classifier assigns to ``labels``."""
    check_digit_images(images)
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels must be ({images.shape[0]},), got {tuple(labels.shape)}")
    if not len(labels):
        raise ValueError("class_accuracy needs at least one image")
    model = DigitFeatures(classifier).classifier
    with torch.no_grad():
        chunks = images.float().cpu().split(_CHUNK)
        predictions = torch.cat([model(chunk).argmax(-1) for chunk in chunks])
    return float((predictions == labels.cpu()).double().mean())


def mnist_reference_rows(classifier: DigitClassifier | None = None) -> dict[str, float]:
    """The rows printed beside a prior's sample metrics, on the embedded split of
    ``configs/data/mnist_embedded.yaml``: ``fd_val_vs_test`` (real validation digits against
    the test digits: the best a perfect sampler can expect at this sample size) and
    ``class_accuracy_test`` / ``class_accuracy_val`` (the classifier on real digits)."""
    model = classifier if classifier is not None else load_digit_classifier()
    val_images, val_labels = mnist_5k_split("val")
    test_images, test_labels = mnist_5k_split("test")
    return {
        "fd_val_vs_test": frechet_distance(val_images, test_images, model),
        "class_accuracy_val": class_accuracy(val_images, val_labels, model),
        "class_accuracy_test": class_accuracy(test_images, test_labels, model),
    }
