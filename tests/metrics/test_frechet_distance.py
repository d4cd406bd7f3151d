"""Frechet distance: torchmetrics' machinery with our features against the closed form and a
numpy/scipy reference; the image-level helpers on real digits."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from src.data.embedded_mnist_labels import mnist_5k_split
from src.metrics.digit_classifier import load_digit_classifier
from src.metrics.frechet import (
    digit_fd_metric,
    frechet_distance,
    frechet_distance_from_features,
    mnist_reference_rows,
)


def _reference_fd(mu1, s1, mu2, s2) -> float:
    """FD of two Gaussians with numpy + scipy.linalg.sqrtm (float64)."""
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean))


def _samples_with_moments(mu, cov, n, rng) -> np.ndarray:
    """n samples whose sample mean is exactly ``mu`` and sample covariance (1/(n-1)) ``cov``."""
    z = rng.standard_normal((n, len(mu)))
    z -= z.mean(axis=0)
    z = (
        z @ np.linalg.inv(np.linalg.cholesky(np.atleast_2d(np.cov(z, rowvar=False)))).T
    )  # whitened exactly
    return z @ np.linalg.cholesky(cov).T + mu


def _random_cov(d, rng) -> np.ndarray:
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


@pytest.mark.parametrize("dim", [1, 5, 32])
def test_fd_of_known_gaussians_equals_the_closed_form(dim) -> None:
    rng = np.random.default_rng(dim)
    mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim) + 0.5
    s1, s2 = _random_cov(dim, rng), _random_cov(dim, rng)
    a = _samples_with_moments(mu1, s1, 400, rng)
    b = _samples_with_moments(mu2, s2, 300, rng)
    ours = frechet_distance_from_features(torch.from_numpy(a), torch.from_numpy(b))
    assert ours == pytest.approx(_reference_fd(mu1, s1, mu2, s2), rel=1e-8, abs=1e-9)


def test_fd_of_diagonal_gaussians_has_the_textbook_value() -> None:
    """Diagonal covariances: FD = |mu1 - mu2|^2 + sum (sqrt(v1) - sqrt(v2))^2, no sqrtm."""
    rng = np.random.default_rng(0)
    v1, v2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([3.0, 1.0, -2.0])
    a = _samples_with_moments(mu1, np.diag(v1), 200, rng)
    b = _samples_with_moments(mu2, np.diag(v2), 200, rng)
    expected = 9.0 + 0.0 + 16.0 + (1 - 2) ** 2 + (2 - 1) ** 2 + (3 - 0.5) ** 2
    ours = frechet_distance_from_features(torch.from_numpy(a), torch.from_numpy(b))
    assert ours == pytest.approx(expected, rel=1e-9)
    same = frechet_distance_from_features(torch.from_numpy(a), torch.from_numpy(a))
    assert abs(same) < 1e-8


def test_fd_of_sampled_features_equals_numpy_scipy() -> None:
    rng = np.random.default_rng(7)
    a = rng.standard_normal((500, 16)) * 2.0 + 1.0
    b = rng.gamma(2.0, 1.0, (350, 16)) @ rng.standard_normal((16, 16))
    expected = _reference_fd(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    ours = frechet_distance_from_features(torch.from_numpy(a), torch.from_numpy(b))
    assert ours == pytest.approx(expected, rel=1e-7)
    # float32 features (what the classifier gives) agree to float32 precision
    ours32 = frechet_distance_from_features(
        torch.from_numpy(a).float(), torch.from_numpy(b).float()
    )
    assert ours32 == pytest.approx(expected, rel=1e-4)
    with pytest.raises(ValueError, match="same D"):
        frechet_distance_from_features(torch.zeros(4, 3), torch.zeros(4, 2))
    with pytest.raises(ValueError, match=">= 2 samples"):
        frechet_distance_from_features(torch.zeros(1, 3), torch.zeros(4, 3))


@pytest.fixture(scope="module")
def classifier():
    return load_digit_classifier()


# ReLU units that never fire on these digits make the feature covariance singular; sqrtm warns
# but stays exact enough (compared at 1e-4)
@pytest.mark.filterwarnings("ignore:Matrix is singular")
def test_fd_of_digit_images_uses_the_classifier_features(classifier) -> None:
    val, _ = mnist_5k_split("val")
    test, _ = mnist_5k_split("test")
    with torch.no_grad():
        fa, fb = (
            classifier.features(val).double().numpy(),
            classifier.features(test).double().numpy(),
        )
    expected = _reference_fd(
        fa.mean(0), np.cov(fa, rowvar=False), fb.mean(0), np.cov(fb, rowvar=False)
    )
    fd = frechet_distance(val, test, classifier)
    assert fd == pytest.approx(expected, rel=1e-4)
    # real digits are far closer to real digits than noise or blank images are
    noise = torch.rand(500, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    assert frechet_distance(noise, test, classifier) > 20 * fd
    blurred = torch.nn.functional.avg_pool2d(val, 3, stride=1, padding=1)
    assert fd < frechet_distance(blurred, test, classifier)


def test_metric_keeps_the_real_statistics_across_resets(classifier) -> None:
    val, _ = mnist_5k_split("val")
    test, _ = mnist_5k_split("test")
    metric = digit_fd_metric(classifier)
    metric.train()  # an owner's train mode must not change the features
    assert not metric.inception.classifier.training
    metric.update(test, real=True)
    metric.update(val, real=False)
    first = float(metric.compute())
    metric.reset()
    metric.update(val[:250], real=False)
    metric.update(val[250:], real=False)
    assert float(metric.compute()) == pytest.approx(first, rel=1e-6)
    assert first == pytest.approx(frechet_distance(test, val, classifier), rel=1e-6)


def test_reference_rows(classifier) -> None:
    rows = mnist_reference_rows(classifier)
    val, _ = mnist_5k_split("val")
    test, _ = mnist_5k_split("test")
    assert rows["fd_val_vs_test"] == pytest.approx(frechet_distance(val, test, classifier))
    assert rows["class_accuracy_test"] >= 0.97 and rows["class_accuracy_val"] >= 0.97
