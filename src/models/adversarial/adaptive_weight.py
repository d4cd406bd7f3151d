"""VQGAN's adaptive weight of the adversarial term (Esser et al. 2021, eq. 7)."""

from __future__ import annotations

import torch
from torch import Tensor


def adaptive_weight(
    recon_loss: Tensor,
    gan_loss: Tensor,
    last_layer: Tensor,
    disc_weight: float = 1.0,
    max_weight: float = 1e4,
    eps: float = 1e-4,
) -> Tensor:
    """disc_weight * clamp(||d recon / d W|| / (||d gan / d W|| + eps), 0, max_weight), W the
    decoder's last layer weight: the adversarial gradient is scaled to the size of the
    reconstruction gradient there. Detached (a weight, not a loss); the graphs are kept."""
    (recon_grad,) = torch.autograd.grad(recon_loss, last_layer, retain_graph=True)
    (gan_grad,) = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)
    ratio = recon_grad.float().norm() / (gan_grad.float().norm() + eps)
    return ratio.clamp(0.0, max_weight).detach() * disc_weight
