"""Adversarial losses over discriminator heads, feature matching and LeCam regularisation.

Each loss takes the logits of every head (a list, see discriminators.py) and averages over the
heads; every term is computed in float32.

| kind             | discriminator (per head)                        | generator (per head)  |
| ---------------- | ----------------------------------------------- | --------------------- |
| `hinge`          | 0.5 (mean relu(1 - real) + mean relu(1 + fake)) | -mean fake (VQGAN)    |
| `non_saturating` | 0.5 (mean softplus(-real) + mean softplus(fake)) | mean softplus(-fake) |
| `least_squares`  | 0.5 (mean (real - 1)^2 + mean fake^2)           | mean (fake - 1)^2     |
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LOSS_KINDS = ("hinge", "non_saturating", "least_squares")


def check_loss_kind(kind: str) -> None:
    if kind not in LOSS_KINDS:
        raise ValueError(f"model.adversarial.loss must be one of {LOSS_KINDS}, got {kind!r}")


def _d_terms(kind: str, real: Tensor, fake: Tensor) -> tuple[Tensor, Tensor]:
    real, fake = real.float(), fake.float()
    if kind == "hinge":
        return F.relu(1 - real).mean(), F.relu(1 + fake).mean()
    if kind == "non_saturating":
        return F.softplus(-real).mean(), F.softplus(fake).mean()
    return (real - 1).pow(2).mean(), fake.pow(2).mean()


def discriminator_loss(kind: str, real: Sequence[Tensor], fake: Sequence[Tensor]) -> Tensor:
    """Mean over heads of the discriminator loss of `kind` (table above)."""
    check_loss_kind(kind)
    total = sum(sum(_d_terms(kind, r, f)) * 0.5 for r, f in zip(real, fake, strict=True))
    return total / len(real)


def generator_loss(kind: str, fake: Sequence[Tensor]) -> Tensor:
    """Mean over heads of the generator's adversarial loss of `kind` (table above)."""
    check_loss_kind(kind)
    terms = []
    for logits in fake:
        logits = logits.float()
        if kind == "hinge":
            terms.append(-logits.mean())
        elif kind == "non_saturating":
            terms.append(F.softplus(-logits).mean())
        else:
            terms.append((logits - 1).pow(2).mean())
    return sum(terms) / len(terms)


def feature_matching_loss(
    real: Sequence[Sequence[Tensor]], fake: Sequence[Sequence[Tensor]]
) -> Tensor:
    """Mean over every (head, layer) feature map of L1(fake, real) (MelGAN / EnCodec); the real
    features are detached, so only the generator learns from it."""
    terms = [
        F.l1_loss(f.float(), r.detach().float())
        for real_maps, fake_maps in zip(real, fake, strict=True)
        for r, f in zip(real_maps, fake_maps, strict=True)
    ]
    return sum(terms) / len(terms)


def decision_threshold(kind: str) -> float:
    """The logit between "real" and "fake": 0.5 for least squares (targets 1 / 0), else 0."""
    return 0.5 if kind == "least_squares" else 0.0


def discriminator_accuracy(
    real: Sequence[Tensor], fake: Sequence[Tensor], threshold: float = 0.0
) -> tuple[Tensor, Tensor]:
    """Fraction of real logits above `threshold` and of fake logits below it, over all heads'
    outputs (see `decision_threshold`)."""
    real_flat = torch.cat([r.detach().float().flatten() for r in real])
    fake_flat = torch.cat([f.detach().float().flatten() for f in fake])
    return real_flat.gt(threshold).float().mean(), fake_flat.lt(threshold).float().mean()


class LeCam(nn.Module):
    """LeCam regularisation (Tseng et al. 2021): mean relu(real - ema_fake)^2 +
    mean relu(ema_real - fake)^2, with EMAs (decay `decay`) of the mean real and fake logits.

    The EMAs are buffers (checkpointed, equal on every rank when `update` gets rank-averaged
    means); the first update sets them to the values it gets.
    """

    def __init__(self, decay: float = 0.99) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"model.adversarial.lecam_decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.register_buffer("ema_real", torch.zeros(()))
        self.register_buffer("ema_fake", torch.zeros(()))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, real_mean: Tensor, fake_mean: Tensor) -> None:
        decay = self.decay if int(self.updates) > 0 else 0.0
        self.ema_real.mul_(decay).add_((1 - decay) * real_mean.float())
        self.ema_fake.mul_(decay).add_((1 - decay) * fake_mean.float())
        self.updates += 1

    def forward(self, real: Sequence[Tensor], fake: Sequence[Tensor]) -> Tensor:
        terms = [
            F.relu(r.float() - self.ema_fake).pow(2).mean()
            + F.relu(self.ema_real - f.float()).pow(2).mean()
            for r, f in zip(real, fake, strict=True)
        ]
        return sum(terms) / len(terms)
