"""GAN losses, feature matching, LeCam and the adaptive weight against hand computations."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from src.models.adversarial.adaptive_weight import adaptive_weight
from src.models.adversarial.gan_losses import (
    LeCam,
    discriminator_accuracy,
    discriminator_loss,
    feature_matching_loss,
    generator_loss,
)

REAL = [torch.tensor([2.0, 0.5, -1.0]), torch.tensor([[0.0, 3.0]])]
FAKE = [torch.tensor([-2.0, 0.5, 1.0]), torch.tensor([[-0.5, 0.25]])]


def _relu(x: float) -> float:
    return max(0.0, x)


def _softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


@pytest.mark.parametrize(
    "kind, d_real, d_fake, g",
    [
        ("hinge", lambda r: _relu(1 - r), lambda f: _relu(1 + f), lambda f: -f),
        ("non_saturating", lambda r: _softplus(-r), _softplus, lambda f: _softplus(-f)),
        ("least_squares", lambda r: (r - 1) ** 2, lambda f: f**2, lambda f: (f - 1) ** 2),
    ],
)
def test_losses_equal_the_table_averaged_over_heads(kind, d_real, d_fake, g) -> None:
    d_heads, g_heads = [], []
    for real, fake in zip(REAL, FAKE, strict=True):
        r, f = real.flatten().tolist(), fake.flatten().tolist()
        d_heads.append(0.5 * (_mean(map(d_real, r)) + _mean(map(d_fake, f))))
        g_heads.append(_mean(map(g, f)))
    assert float(discriminator_loss(kind, REAL, FAKE)) == pytest.approx(_mean(d_heads), rel=1e-6)
    assert float(generator_loss(kind, FAKE)) == pytest.approx(_mean(g_heads), rel=1e-6)


def test_unknown_loss_kind_is_refused_naming_the_choices() -> None:
    with pytest.raises(ValueError, match="hinge"):
        generator_loss("wasserstein", FAKE)


def test_discriminator_accuracy_counts_logits_on_the_right_side() -> None:
    acc_real, acc_fake = discriminator_accuracy(REAL, FAKE)
    # real > 0: 2.0, 0.5, 3.0 of 5; fake < 0: -2.0, -0.5 of 5
    assert float(acc_real) == pytest.approx(3 / 5) and float(acc_fake) == pytest.approx(2 / 5)
    acc_real, acc_fake = discriminator_accuracy(REAL, FAKE, threshold=0.5)
    assert float(acc_real) == pytest.approx(2 / 5) and float(acc_fake) == pytest.approx(3 / 5)


def test_feature_matching_is_the_mean_l1_over_every_feature_map() -> None:
    real = [[torch.tensor([1.0, 2.0]), torch.tensor([[0.0, 0.0, 3.0]])], [torch.tensor([5.0])]]
    fake = [[torch.tensor([0.0, 4.0]), torch.tensor([[1.0, 0.0, 0.0]])], [torch.tensor([2.0])]]
    fake = [[f.requires_grad_() for f in maps] for maps in fake]
    loss = feature_matching_loss(real, fake)
    hand = _mean([(1 + 2) / 2, (1 + 0 + 3) / 3, 3.0])
    assert float(loss) == pytest.approx(hand)
    loss.backward()  # the real maps are targets: only the fake ones get gradients
    assert fake[1][0].grad.tolist() == pytest.approx([-1 / 3])  # sign(2 - 5) / 3 maps


def test_lecam_uses_emas_of_the_mean_logits() -> None:
    lecam = LeCam(decay=0.9)
    lecam.update(torch.tensor(1.0), torch.tensor(-1.0))  # first update: the values themselves
    assert (float(lecam.ema_real), float(lecam.ema_fake)) == (1.0, -1.0)
    lecam.update(torch.tensor(2.0), torch.tensor(0.0))
    ema_real, ema_fake = 0.9 * 1.0 + 0.1 * 2.0, 0.9 * -1.0 + 0.1 * 0.0
    assert float(lecam.ema_real) == pytest.approx(ema_real)
    assert float(lecam.ema_fake) == pytest.approx(ema_fake)
    real, fake = [torch.tensor([0.0, -2.0, 1.5])], [torch.tensor([2.0, 0.5])]
    hand = _mean(_relu(r - ema_fake) ** 2 for r in [0.0, -2.0, 1.5])
    hand += _mean(_relu(ema_real - f) ** 2 for f in [2.0, 0.5])
    assert float(lecam(real, fake)) == pytest.approx(hand, rel=1e-6)
    assert "ema_real" in lecam.state_dict()  # checkpointed


class ToyGenerator(nn.Module):
    """latent -> linear layer (the 'decoder's last layer') -> output."""

    def __init__(self) -> None:
        super().__init__()
        self.last = nn.Linear(3, 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(x)


def test_adaptive_weight_equals_the_ratio_of_gradient_norms_at_the_last_layer() -> None:
    torch.manual_seed(0)
    gen = ToyGenerator().double()
    x = torch.randn(5, 3, dtype=torch.float64)
    target = torch.randn(5, 2, dtype=torch.float64)
    v = torch.tensor([0.3, -1.2], dtype=torch.float64)  # a linear 'discriminator'
    y = gen(x)
    recon = (y - target).pow(2).mean()
    gan = -(y @ v).mean()
    weight = adaptive_weight(recon, gan, gen.last.weight, disc_weight=0.8)
    # by hand: d recon / d W = 2 / (5 * 2) (y - t)^T x;  d gan / d W = -(1 / 5) v 1^T x
    with torch.no_grad():
        grad_recon = 2 / 10 * (y - target).T @ x
        grad_gan = -(1 / 5) * torch.outer(v, x.sum(0))
    hand = 0.8 * grad_recon.norm() / (grad_gan.norm() + 1e-4)
    assert float(weight) == pytest.approx(float(hand), rel=1e-6)
    assert not weight.requires_grad
    # the graph is kept: the losses can still be backpropagated
    (recon + weight * gan).backward()
    # clamped: a vanishing GAN gradient gives max_weight * disc_weight
    y = gen(x)
    tiny = adaptive_weight((y - target).pow(2).mean(), 1e-12 * y.sum(), gen.last.weight, 2.0, 5.0)
    assert float(tiny) == pytest.approx(10.0)
