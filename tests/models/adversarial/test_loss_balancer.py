"""EnCodec's loss balancer against a hand computation on losses with known gradients."""

from __future__ import annotations

import pytest
import torch

from src.models.adversarial.loss_balancer import LossBalancer


def test_balanced_gradient_is_each_share_over_its_ema_norm() -> None:
    y = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, 1.0]], requires_grad=True)
    a = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 2.0]])  # d l_a / d y
    b = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # d l_b / d y (of 0.5 * sum(b y^2))
    balancer = LossBalancer({"a": 1.0, "b": 3.0}, total_norm=2.0, ema_decay=0.5)

    def losses():
        return {"a": (a * y).sum(), "b": 0.5 * (b * y.pow(2)).sum()}

    grad_b = b * y.detach()
    # per-item L2 norms, averaged over the batch: a -> (5 + 2) / 2; b -> (1 + 3) / 2
    norm_a, norm_b = 3.5, 2.0
    surrogate, norms = balancer.balance(losses(), y)
    (grad,) = torch.autograd.grad(surrogate, y)
    expected = 0.25 * 2.0 / norm_a * a + 0.75 * 2.0 / norm_b * grad_b
    assert torch.allclose(grad, expected, atol=1e-6)
    assert float(norms["a"]) == pytest.approx(norm_a) and float(norms["b"]) == pytest.approx(2.0)

    # second step with the loss 'a' doubled: its norm enters the bias-corrected EMA
    surrogate, norms = balancer.balance({"a": 2 * losses()["a"], "b": losses()["b"]}, y)
    ema_a = (0.5 * norm_a + 2 * norm_a) / (0.5 + 1)
    assert float(norms["a"]) == pytest.approx(ema_a)
    (grad,) = torch.autograd.grad(surrogate, y)
    expected = 0.25 * 2.0 / ema_a * 2 * a + 0.75 * 2.0 / norm_b * grad_b
    assert torch.allclose(grad, expected, atol=1e-6)


def test_rank_average_enters_the_ema() -> None:
    y = torch.ones(1, 2, requires_grad=True)
    balancer = LossBalancer({"a": 1.0})
    _, norms = balancer.balance({"a": y.sum()}, y, average=lambda t: t * 0 + 7.0)
    assert float(norms["a"]) == pytest.approx(7.0)


def test_losses_must_match_the_weights_named() -> None:
    y = torch.ones(1, 2, requires_grad=True)
    with pytest.raises(ValueError, match=r"weighs \['a'\] but got losses \['b'\]"):
        LossBalancer({"a": 1.0}).balance({"b": y.sum()}, y)
    with pytest.raises(ValueError, match="weights >= 0"):
        LossBalancer({"a": -1.0})
