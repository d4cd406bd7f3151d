"""The digit classifier: accuracy of the cached model, the on-disk cache and its fingerprint,
the labelled splits it trains on, and input checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from src.data import EmbeddedMNISTDataModule
from src.data.embedded_mnist_labels import load_mnist_5k_labels, mnist_5k_split
from src.metrics import digit_classifier as dc
from src.metrics.digit_classifier import (
    ClassifierRecipe,
    classifier_fingerprint,
    load_digit_classifier,
)
from src.metrics.frechet import class_accuracy

TINY = ClassifierRecipe(epochs=1, train_samples=128)


@pytest.fixture(scope="session")
def classifier() -> dc.DigitClassifier:
    """The real classifier from the project cache (trained there once: ~30 s of one core)."""
    return load_digit_classifier()


def test_cached_classifier_reaches_97_percent_on_the_test_digits(classifier) -> None:
    images, labels = mnist_5k_split("test")
    accuracy = class_accuracy(images, labels, classifier)
    assert accuracy >= 0.97
    # the report saved beside the weights was measured on the same digits
    assert accuracy == pytest.approx(classifier.report["test_accuracy"], abs=1e-6)


def test_labelled_splits_match_the_datamodule() -> None:
    labels = load_mnist_5k_labels()
    assert labels.shape == (5000,) and np.bincount(labels).tolist() == [500] * 10
    datamodule = EmbeddedMNISTDataModule(seed=0)
    datamodule.setup()
    for split, dataset in zip(
        ("train", "val", "test"),
        (datamodule.data_train, datamodule.data_val, datamodule.data_test),
        strict=True,
    ):
        images, split_labels = mnist_5k_split(split)
        assert len(images) == len(dataset) == len(split_labels)
        for i in (0, len(dataset) // 2, len(dataset) - 1):
            assert torch.equal(images[i], dataset[i])
        rows = datamodule.split_indices[split]
        assert torch.equal(split_labels, torch.from_numpy(labels[rows.numpy()]))
    with pytest.raises(ValueError, match="split must be one of"):
        mnist_5k_split("holdout")


def test_cache_is_written_once_and_reloaded(tmp_path, monkeypatch) -> None:
    first = load_digit_classifier(TINY, cache_dir=tmp_path)
    files = list(tmp_path.glob("digit_classifier-*.pt"))
    assert [f.name for f in files] == [f"digit_classifier-{classifier_fingerprint(TINY)}.pt"]

    def no_training(recipe):
        raise AssertionError("a cached classifier must not be trained again")

    monkeypatch.setattr(dc, "train_digit_classifier", no_training)
    second = load_digit_classifier(TINY, cache_dir=tmp_path)
    for (name, a), (_, b) in zip(
        first.state_dict().items(), second.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    assert second.report == first.report and not second.training
    assert not any(p.requires_grad for p in second.parameters())


def test_training_is_seeded_and_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a, _ = dc.train_digit_classifier(TINY)
    assert torch.equal(torch.rand(3), expected)
    b, _ = dc.train_digit_classifier(TINY)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


def test_fingerprint_follows_the_recipe() -> None:
    assert classifier_fingerprint(TINY) == classifier_fingerprint(ClassifierRecipe(**vars(TINY)))
    assert classifier_fingerprint(TINY) != classifier_fingerprint(
        ClassifierRecipe(epochs=1, train_samples=128, seed=1)
    )
    assert classifier_fingerprint(TINY) != classifier_fingerprint(
        ClassifierRecipe(epochs=1, train_samples=128, split_seed=1)
    )


def test_bad_images_are_rejected(classifier) -> None:
    labels = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"\(N, 1, 28, 28\)"):
        class_accuracy(torch.rand(2, 28, 28), labels, classifier)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        class_accuracy(torch.rand(2, 1, 28, 28) * 255, labels, classifier)
    with pytest.raises(ValueError, match="float"):
        class_accuracy(torch.zeros(2, 1, 28, 28, dtype=torch.uint8), labels, classifier)
    with pytest.raises(ValueError, match="labels"):
        class_accuracy(torch.rand(2, 1, 28, 28), torch.zeros(3, dtype=torch.long), classifier)
