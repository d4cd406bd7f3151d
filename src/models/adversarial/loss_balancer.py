"""EnCodec's loss balancer (Defossez et al. 2022, sec. 3.4): each loss that reaches the decoder
output gets a share of the gradient there fixed by its weight, whatever its scale.

For losses l_i of the output y with gradients g_i = d l_i / d y, the gradient sent into the
decoder is  sum_i  (w_i / sum_j w_j) * total_norm * g_i / <||g_i||>,  where <||g_i||> is an
exponential moving average (decay `ema_decay`, bias-corrected) of the gradient norm, each norm
the mean over batch items of the per-item L2 norm, averaged over ranks before it enters the
EMA. `balance` returns a surrogate loss whose gradient with respect to y is exactly that sum.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn


class LossBalancer(nn.Module):
    """Balances the losses named in `weights` (other names are an error)."""

    def __init__(
        self,
        weights: Mapping[str, float],
        total_norm: float = 1.0,
        ema_decay: float = 0.999,
        eps: float = 1e-12,
    ) -> None:
        super().__init__()
        if not weights or any(float(w) < 0 for w in weights.values()):
            raise ValueError(
                f"model.adversarial.balancer.weights must name losses with weights >= 0, "
                f"got {dict(weights)}"
            )
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"balancer ema_decay must be in [0, 1), got {ema_decay}")
        self.names = list(weights)
        self.weights = {name: float(w) for name, w in weights.items()}
        self.total_norm = float(total_norm)
        self.ema_decay = float(ema_decay)
        self.eps = float(eps)
        # EMA numerator per loss and the shared denominator (bias correction), checkpointed
        self.register_buffer("norm_sums", torch.zeros(len(self.names), dtype=torch.float64))
        self.register_buffer("norm_count", torch.zeros((), dtype=torch.float64))

    def balance(
        self,
        losses: Mapping[str, Tensor],
        output: Tensor,
        average: Callable[[Tensor], Tensor] = lambda t: t,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Surrogate loss (backward gives the balanced gradient at `output`) and the EMA norm
        of each loss's gradient. `average` maps the (len(names),) norms to their mean over
        ranks (identity on one process)."""
        if set(losses) != set(self.names):
            raise ValueError(
                f"the balancer weighs {sorted(self.names)} but got losses {sorted(losses)}"
            )
        grads = []
        norms = []
        for name in self.names:
            (grad,) = torch.autograd.grad(losses[name], output, retain_graph=True)
            grad = grad.float()
            norms.append(grad.flatten(1).norm(dim=1).mean() if grad.ndim > 1 else grad.norm())
            grads.append(grad)
        step_norms = average(torch.stack(norms).detach()).double()
        with torch.no_grad():
            self.norm_sums.mul_(self.ema_decay).add_(step_norms)
            self.norm_count.mul_(self.ema_decay).add_(1.0)
        ema = (self.norm_sums / self.norm_count).float()
        total_weight = sum(self.weights.values())
        balanced = torch.zeros_like(grads[0])
        for i, name in enumerate(self.names):
            scale = self.weights[name] / total_weight * self.total_norm / (self.eps + ema[i])
            balanced = balanced + scale * grads[i]
        surrogate = (output.float() * balanced.detach()).sum()
        return surrogate, {name: ema[i] for i, name in enumerate(self.names)}
