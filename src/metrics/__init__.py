"""torchmetrics Metrics of tokenizers, reduced over ranks by torchmetrics itself."""

from src.metrics.codebook_usage import CodebookUsage

__all__ = ["CodebookUsage"]
