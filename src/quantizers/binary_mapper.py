"""Binary mapper (Fleuret 2025, arXiv 2510.17558): `bits` independent Bernoulli bits per token.

`BinaryMapper` keeps the reference library's API: per-bit logits in, a one-hot over the
`2**bits` codes out (bit `i` of code `k` is bit `i` of the integer `k`, least significant
first), sampled (or thresholded at 1/2 when deterministic) with a straight-through gradient
from the soft code probabilities, plus a KL-to-uniform loss that only acts above
`kl_loss_threshold` nats (default one bit), i.e. it leaves the model that many bits of
information per token for free.

`BinaryMapperQuantizer` (registered `binary_mapper`) makes it a tokenizer bottleneck: a linear
map from `dim` features to the logits, and a learned `(2**bits, dim)` codebook that turns the
sampled code back into a vector. Statistics (entropies, the loss) are float32 under autocast;
a token with a NaN or inf gets index -1, a zero one-hot / output, and no part in the loss.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from src.quantizers.contract import MASKED, QuantizerContract, check_index_range
from src.quantizers.float_input import check_float_input, like_input, project
from src.quantizers.registry import register_quantizer

NAT = math.log(2)  # one bit, in nats
_MAX_BITS = 24  # the one-hot (and the soft code probabilities) are (tokens, 2**bits)


def binary_entropy(logits: Tensor) -> Tensor:
    """Entropy in nats of independent bits with these logits, summed over the last axis."""
    prob = logits.sigmoid()
    return -(prob * F.logsigmoid(logits) + (1.0 - prob) * F.logsigmoid(-logits)).sum(-1)


class BinaryMapper(nn.Module):
    """The reference's `BinaryMapper`: logits (..., bits) -> one-hot (..., 2**bits) and the
    thresholded KL loss (`return_indices=True` adds the code indices)."""

    def __init__(
        self,
        bits: int = 1,
        kl_loss_threshold: float = NAT,
        deterministic_on_eval: bool = False,
    ) -> None:
        super().__init__()
        if not 1 <= bits <= _MAX_BITS:
            raise ValueError(
                f"BinaryMapper bits must be in [1, {_MAX_BITS}] (its one-hot has 2**bits "
                f"entries per token); got {bits}"
            )
        self.bits = bits
        self.num_codes = 2**bits
        self.kl_loss_threshold = kl_loss_threshold
        self.deterministic_on_eval = deterministic_on_eval
        power_two = 2 ** torch.arange(bits)
        codes = (torch.arange(self.num_codes).unsqueeze(-1) & power_two) != 0
        self.register_buffer("power_two", power_two, persistent=False)
        self.register_buffer("codes", codes, persistent=False)  # (2**bits, bits) bool

    def binary_entropy(self, logits: Tensor) -> Tensor:
        return binary_entropy(logits)

    def calc_aux_loss(
        self, logits: Tensor, reduce_aux_kl_loss: bool = True, valid: Tensor | None = None
    ) -> Tensor:
        """relu(KL(bits || uniform) - threshold) per token (float32), or its mean over the
        tokens where `valid` holds (all finite ones when None)."""
        logits = logits.float()
        if valid is None:
            valid = torch.isfinite(logits).all(-1)
        safe = torch.where(valid.unsqueeze(-1), logits, 0.0)
        kl = self.bits * NAT - binary_entropy(safe)
        loss = F.relu(kl - self.kl_loss_threshold)
        if not reduce_aux_kl_loss:
            return loss.masked_fill(~valid, 0.0)
        weight = valid.to(loss.dtype)
        return (loss * weight).sum() / weight.sum().clamp_min(1.0)

    def log_prob(
        self,
        logits: Tensor,
        *,
        indices: Tensor | None = None,
        one_hot: Tensor | None = None,
        sum_bits: bool = True,
    ) -> Tensor:
        """Log probability of codes (given as `indices` or a `one_hot`) under the logits."""
        if (indices is None) == (one_hot is None):
            raise ValueError("BinaryMapper.log_prob takes exactly one of indices or one_hot")
        if one_hot is not None:
            indices = one_hot.argmax(dim=-1)
        check_index_range(indices, self.num_codes, self)
        bits = self.codes[indices]
        logits = logits.float()
        log_probs = torch.where(bits, F.logsigmoid(logits), F.logsigmoid(-logits))
        return log_probs.sum(-1) if sum_bits else log_probs

    def sample(self, logits: Tensor, temperature: float, deterministic: bool) -> Tensor:
        """Int64 code indices (...) of logits (..., bits); -1 where a logit is not finite."""
        with torch.autocast(logits.device.type, enabled=False):
            logits = logits.float()
            valid = torch.isfinite(logits).all(-1)
            prob = torch.where(valid.unsqueeze(-1), logits / temperature, 0.0).sigmoid()
            bits = (prob > 0.5) if deterministic else prob.bernoulli().bool()
            indices = (bits.long() * self.power_two).sum(-1)
        return indices.masked_fill(~valid, MASKED)

    def soft_codes(self, logits: Tensor) -> Tensor:
        """Probability of every code (..., 2**bits) under independent bits (float32)."""
        with torch.autocast(logits.device.type, enabled=False):
            logits = logits.float()
            codes = self.codes.float()
            log_prob = F.logsigmoid(logits) @ codes.t() + F.logsigmoid(-logits) @ (1 - codes).t()
            return log_prob.exp()

    def forward(
        self,
        logits: Tensor,
        temperature: float = 1.0,
        straight_through: bool | None = None,
        calc_aux_loss: bool | None = None,
        deterministic: bool | None = None,
        return_indices: bool = False,
        reduce_aux_kl_loss: bool = True,
    ) -> tuple[Tensor, ...]:
        if logits.shape[-1] != self.bits:
            raise ValueError(
                f"BinaryMapper(bits={self.bits}) expects logits (..., {self.bits}); "
                f"got {tuple(logits.shape)}"
            )
        if deterministic is None:
            deterministic = self.deterministic_on_eval and not self.training
        straight_through = self.training if straight_through is None else straight_through
        calc_aux_loss = self.training if calc_aux_loss is None else calc_aux_loss

        indices = self.sample(logits, temperature, deterministic)
        valid = indices != MASKED
        one_hot = F.one_hot(indices.clamp_min(0), self.num_codes).float()
        one_hot = one_hot * valid.unsqueeze(-1)
        loss = logits.new_zeros((), dtype=torch.float32)
        if calc_aux_loss:
            loss = self.calc_aux_loss(logits, reduce_aux_kl_loss, valid)
        if straight_through:
            soft = self.soft_codes(torch.where(valid.unsqueeze(-1), logits, 0.0))
            one_hot = one_hot + (soft - soft.detach())
        if return_indices:
            return one_hot, indices, loss
        return one_hot, loss


class BinaryMapperOutput(NamedTuple):
    """`quantized` in the input's layout; `indices` int64 (-1 for a non-finite token);
    `kl_loss` the float32 thresholded KL loss (0 outside training)."""

    quantized: Tensor
    indices: Tensor
    kl_loss: Tensor


@register_quantizer("binary_mapper")
class BinaryMapperQuantizer(nn.Module, QuantizerContract):
    """A `BinaryMapper` between a linear map to `bits` logits and a learned codebook of
    `2**bits` vectors of width `dim`: a tokenizer bottleneck with `codebook_size = 2**bits`.

    Input `(..., dim)`; indices `(...)`. The output is the codebook row of the sampled code,
    with a straight-through gradient to the logits from the soft code probabilities in
    training (the reference's estimator applied to the codebook lookup).
    """

    num_codebooks = 1

    def __init__(
        self,
        dim: int,
        bits: int = 8,
        kl_loss_threshold: float = NAT,
        deterministic_on_eval: bool = True,
        temperature: float = 1.0,
        kl_loss_weight: float = 1.0,
    ) -> None:
        super().__init__()
        self.mapper = BinaryMapper(bits, kl_loss_threshold, deterministic_on_eval)
        self.dim = dim
        self.bits = bits
        self.codebook_size: int = 2**bits
        self.temperature = temperature
        self.kl_loss_weight = kl_loss_weight
        self.project_in = nn.Linear(dim, bits)
        self.codebook = nn.Parameter(torch.randn(self.codebook_size, dim))

    def decode_indices(self, indices: Tensor) -> Tensor:
        """Codebook rows of indices (...) -> (..., dim); -1 decodes to zeros."""
        check_index_range(indices, self.codebook_size, self, allow_masked=True)
        out = F.embedding(indices.clamp_min(0), self.codebook)
        return out.masked_fill((indices == MASKED).unsqueeze(-1), 0.0)

    get_output_from_indices = decode_indices

    def forward(self, x: Tensor) -> BinaryMapperOutput:
        check_float_input(x, "BinaryMapperQuantizer")
        if x.shape[-1] != self.dim:
            raise ValueError(
                f"BinaryMapperQuantizer expects channel-last input (..., dim={self.dim}); "
                f"got {tuple(x.shape)}"
            )
        logits = project(self.project_in, x)
        deterministic = self.mapper.deterministic_on_eval and not self.training
        indices = self.mapper.sample(logits, self.temperature, deterministic)
        valid = indices != MASKED
        quantized = self.decode_indices(indices)
        loss = x.new_zeros((), dtype=torch.float32)
        if self.training:
            loss = self.mapper.calc_aux_loss(logits, True, valid) * self.kl_loss_weight
            safe = torch.where(valid.unsqueeze(-1), logits, 0.0)
            soft = self.mapper.soft_codes(safe / self.temperature)
            soft_out = soft @ self.codebook.detach().float()
            quantized = quantized + (soft_out - soft_out.detach()).to(quantized.dtype)
        return BinaryMapperOutput(like_input(quantized, x), indices, loss)
