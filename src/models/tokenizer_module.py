"""What the image and audio tokenizers add to the shared base (src/models/base_module.py): the
quantizer, the codebook-usage metric of every stage, and the token count of a batch."""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor
from torchmetrics import Metric, SumMetric

from src.metrics import CodebookUsage
from src.models.base_module import STAGES, VqzooModule, batch_size_of
from src.models.quantizer_adapter import QuantizedLatents, build_latent_quantizer

USAGE_NAMES = ("utilization", "perplexity", "dead_codes")


class TokenizerModule(VqzooModule):
    """Base of the tokenizers: subclasses build encoder/decoder, call `init_quantizer`, and
    implement `make_stage_metrics`, `shared_step` and `code_grid`.

    Codebook usage is logged per epoch as `<stage>/codebook/{utilization,perplexity,dead_codes}`
    (and `<stage>/codebook/<i>/...` per codebook when there are several).
    """

    def init_quantizer(self, config: dict[str, Any], latent_dim: int) -> None:
        """Build the quantizer and one metric set per stage (call after encoder/decoder)."""
        self.quantizer = build_latent_quantizer(config, latent_dim)
        self.codebook_size = int(self.quantizer.codebook_size)
        self.num_codebooks = int(self.quantizer.num_codebooks)  # the quantizer contract
        self.init_stage_metrics()

    def init_stage_metrics(self) -> None:
        super().init_stage_metrics()
        for stage in STAGES:
            self.metrics_for(stage)["codebook"] = CodebookUsage(
                self.codebook_size,
                self.num_codebooks,
                codebook_sizes=self.quantizer.codebook_sizes,  # a size per slot (the contract)
            )
            # `<stage>/nonfinite_tokens`: latent tokens with a NaN or inf in the epoch, which
            # the quantizer kept out of its codebook statistics (index -1)
            self.metrics_for(stage)["nonfinite_tokens"] = SumMetric()

    def update_quantizer_metrics(self, stage: str, quantized: QuantizedLatents) -> None:
        """Codebook usage and the non-finite token count of one batch (no host sync)."""
        metrics = self.metrics_for(stage)
        if quantized.indices is not None:
            metrics["codebook"].update(quantized.indices)
        if quantized.nonfinite_tokens is not None:
            metrics["nonfinite_tokens"].update(quantized.nonfinite_tokens)

    def codebook_usage(self, stage: str) -> CodebookUsage:
        """The stage's codebook-usage metric (its code counts feed the code-frequency charts)."""
        return self.metrics_for(stage)["codebook"]

    def metric_values(self, stage: str, name: str, metric: Metric) -> dict[str, Tensor]:
        if name != "codebook":
            return super().metric_values(stage, name, metric)
        if metric.update_count == 0:  # quantizers built without indices skip usage
            return {}
        return codebook_log_values(stage, metric.compute())

    def epoch_metric_names(self, stage: str) -> list[str]:
        names = [n for n in super().epoch_metric_names(stage) if n != f"{stage}/codebook"]
        names += [f"{stage}/codebook/{name}" for name in USAGE_NAMES]
        if self.num_codebooks > 1:
            names += [
                f"{stage}/codebook/{i}/{name}"
                for i in range(self.num_codebooks)
                for name in USAGE_NAMES
            ]
        return names

    def tokens_in_batch(self, batch: Tensor) -> int:
        """Code indices of a batch: positions of its code grid x codes per position (a 28x28
        digit with 4x downsampling and 4 residual codebooks: 7 * 7 * 4 = 196 tokens)."""
        grid = self.code_grid(tuple(batch.shape[1:]))
        return batch_size_of(batch) * math.prod(grid) * self.num_codebooks


def codebook_log_values(stage: str, usage: dict[str, Tensor]) -> dict[str, Tensor]:
    """Stable metric names: `<stage>/codebook/<name>` and, with several codebooks, per codebook."""
    values = {f"{stage}/codebook/{name}": usage[name] for name in USAGE_NAMES}
    per_codebook = usage["utilization_per_codebook"]
    if per_codebook.numel() > 1:
        for name in USAGE_NAMES:
            for i, value in enumerate(usage[f"{name}_per_codebook"]):
                values[f"{stage}/codebook/{i}/{name}"] = value
    return values
