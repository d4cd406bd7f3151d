"""CodePrior: a Grok MoE transformer trained on a tokenizer's codes (stage 2), as a VqzooModule.

Batches are ``(codes, labels)`` from src/data/code_datamodule.py: codes ``(B, *grid, Q)`` of the
tokenizer, labels ``(B,)`` (``-1``: none). The layout (src/prior) turns them into token sequences
with a class (or null) prefix, randomly replaced by the null token with probability
``class_dropout`` in training (classifier-free guidance). The loss is the next-token cross
entropy over the code targets, each softmax restricted to the ids its step may hold (the
sampler's constraint), plus the MoE auxiliary loss.

``layout=next_scale`` (a multi-scale tokenizer, quantizer=hierarchical_vq) orders the codes
coarse scale first, as VAR does; its ``code_scales`` come from the code cache.

What the tokenizer is (checkpoint path, fingerprint, code slots, grid, classes, modality) is
stored in the prior's hyperparameters, filled in from the datamodule by train.py, so a prior
checkpoint alone says which tokenizer decodes its samples (src/models/prior_load.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MeanMetric, Metric

from src.models.base_module import VqzooModule
from src.models.grok import GrokConfig
from src.models.prior_metrics import CodeNLL, ExpertUsage, expert_log_values
from src.models.prior_net import CodeSequenceNet
from src.models.prior_sampling import sample_tokens
from src.prior import make_layout

NLL_NAMES = ("nll", "bits_per_token", "perplexity", "bits_per_sample")
MOE_NAMES = ("load_balance_loss", "z_loss", "expert_utilization", "router_entropy")


def grok_config(net: GrokConfig | dict[str, Any], vocab_size: int) -> GrokConfig:
    """The GrokConfig of ``net`` (a config or its fields, ``_target_`` ignored) with the
    layout's vocabulary."""
    fields = dataclasses.asdict(net) if isinstance(net, GrokConfig) else dict(net)
    fields.pop("_target_", None)
    fields["vocab_size"] = int(vocab_size)
    return GrokConfig(**fields)


class CodePrior(VqzooModule):
    """Next-token prior over code sequences; logs `<stage>/nll` (nats per code token),
    `bits_per_token`, `perplexity`, `bits_per_sample`, `loss` and `<stage>/moe/...`."""

    def __init__(
        self,
        net: GrokConfig | dict[str, Any],
        tokenizer_ckpt: str | None = None,
        tokenizer_fingerprint: str | None = None,
        codebook_sizes: list[int] | None = None,
        grid: list[int] | None = None,
        num_classes: int | None = None,
        modality: str | None = None,
        sample_rate: int | None = None,
        code_scales: list[list[int]] | None = None,
        layout: str = "flatten",
        max_factor_bits: int | None = None,
        class_dropout: float = 0.1,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
    ) -> None:
        super().__init__()
        given = {"codebook_sizes": codebook_sizes, "grid": grid, "num_classes": num_classes}
        missing = [key for key, value in given.items() if value is None]
        if missing:
            raise ValueError(
                f"CodePrior needs {', '.join(missing)}: train it with the codes datamodule "
                "(data=tokenizer_codes tokenizer_ckpt=<tokenizer .ckpt>), which fills them in"
            )
        if not 0.0 <= class_dropout <= 1.0:
            raise ValueError(f"class_dropout must be in [0, 1], got {class_dropout}")
        self.save_hyperparameters(ignore=["net"])
        self.layout = make_layout(
            layout, codebook_sizes, grid, num_classes, max_factor_bits, scales=code_scales
        )
        config = grok_config(net, self.layout.vocab_size * self.layout.num_streams)
        # stored as plain fields: the checkpoint loads with weights_only=True
        self.hparams["net"] = dataclasses.asdict(config)
        self.net = CodeSequenceNet(config, self.layout)
        allowed = self.layout.allowed_masks()[1:]  # (L-1, [S,] V): ids each target may take
        self.register_buffer("allowed", allowed, persistent=False)
        self.register_buffer("target_mask", self.layout.target_mask(), persistent=False)
        self.init_stage_metrics()

    # ---- metrics --------------------------------------------------------------------------
    def make_stage_metrics(self) -> dict[str, Metric]:
        cfg = self.net.lm.config
        return {
            "loss": MeanMetric(),
            "nll": CodeNLL(),
            "moe": ExpertUsage(cfg.num_hidden_layers, cfg.num_experts, cfg.num_experts_per_tok),
        }

    def metric_values(self, stage: str, name: str, metric: Metric) -> dict[str, Tensor]:
        if name == "nll":
            return {f"{stage}/{key}": value for key, value in metric.compute().items()}
        if name == "moe":
            return expert_log_values(stage, metric.compute())
        return super().metric_values(stage, name, metric)

    def epoch_metric_names(self, stage: str) -> list[str]:
        cfg = self.net.lm.config
        names = [f"{stage}/loss"] + [f"{stage}/{n}" for n in NLL_NAMES]
        names += [f"{stage}/moe/{n}" for n in MOE_NAMES]
        names += [
            f"{stage}/moe/{layer}/load/{expert}"
            for layer in range(cfg.num_hidden_layers)
            for expert in range(cfg.num_experts)
        ]
        return names

    def expert_usage(self, stage: str) -> ExpertUsage:
        """The stage's routing statistics (src/callbacks/expert_load.py draws them)."""
        return self.metrics_for(stage)["moe"]

    # ---- training -------------------------------------------------------------------------
    def encode_batch(self, batch: Any, class_dropout: float = 0.0) -> Tensor:
        """``(codes, labels)`` -> full token sequences of the layout."""
        codes, labels = batch
        if self.layout.num_classes:
            if bool((labels < 0).all()):
                raise ValueError(
                    "this prior is class-conditional but the batch has no labels (all -1): "
                    "train it on labelled codes, or set data.labels=false"
                )
        else:
            labels = None
        return self.layout.encode(codes.long(), labels, class_dropout=class_dropout)

    def sequence_nll(self, tokens: Tensor) -> tuple[Tensor, Tensor, Any]:
        """Per-target NLL ``(B, L-1[, S])`` (nats; 0 where the target mask is off), the mask,
        and the GrokOutput."""
        logits, out = self.net(tokens[:, :-1])
        logits = logits.float().masked_fill(~self.allowed, float("-inf"))
        targets = tokens[:, 1:]
        nll = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
        ).view(targets.shape)
        mask = self.target_mask.expand_as(nll)
        return nll.masked_fill(~mask, 0.0), mask, out

    def shared_step(self, batch: Any, stage: str) -> dict[str, Tensor]:
        dropout = self.hparams.class_dropout if stage == "train" else 0.0
        tokens = self.encode_batch(batch, dropout)
        nll, mask, out = self.sequence_nll(tokens)
        count = mask.sum()
        lm_loss = nll.sum() / count
        loss = lm_loss + out.aux_loss.float()
        metrics = self.metrics_for(stage)
        size = tokens.shape[0]
        metrics["loss"].update(loss.detach(), weight=size)
        metrics["nll"].update(nll.sum(), count, size)
        metrics["moe"].update(out, size * (tokens.shape[1] - 1))
        return {"loss": loss, "nll": lm_loss.detach()}

    def tokens_in_batch(self, batch: Any) -> int:
        """Codes in a batch (grid positions x code slots per sample)."""
        return int(batch[0].numel())

    # ---- sampling -------------------------------------------------------------------------
    def sample_codes(
        self,
        num_samples: int,
        labels: Tensor | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        cfg_scale: float | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Codes ``(num_samples, *grid, Q)`` drawn from the prior (eval mode, no grad); a
        conditional prior takes ``labels`` (default: 0, 1, 2, ... cycling over the classes)."""
        if self.layout.num_classes and labels is None:
            labels = torch.arange(num_samples) % self.layout.num_classes
        if not self.layout.num_classes and labels is not None:
            raise ValueError("labels given to an unconditional prior (num_classes=0)")
        training = self.training
        self.eval()
        try:
            tokens = sample_tokens(
                self.net, labels, num_samples, temperature, top_k, top_p, cfg_scale, generator
            )
        finally:
            self.train(training)
        return self.layout.decode(tokens)
