"""A second kind of model, defined only in tests: it plugs into train.py, eval.py, the callbacks
and compare.py through the generic base (src/models/base_module.py) and a test-only model config
(tests/configs/model/toy_regressor.yaml), with no quantizer, no media and a metric to minimise."""

from __future__ import annotations

from pathlib import Path

import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanAbsoluteError, MeanMetric, Metric

from src.models.base_module import VqzooModule

# the override that makes `model=toy_regressor` composable (tests/configs/model/)
SEARCH_PATH = f"hydra.searchpath=[file://{Path(__file__).resolve().parent / 'configs'}]"


class ToyRegressor(VqzooModule):
    """Predicts each image's mean intensity from its 7x7 average-pooled thumbnail; logs
    `<stage>/loss` and `<stage>/mae` (lower is better)."""

    def __init__(
        self,
        lr: float = 1e-2,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.99),
        warmup_steps: int = 0,
        min_lr_ratio: float = 1.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.head = nn.Linear(49, 1)
        self.init_stage_metrics()

    def make_stage_metrics(self) -> dict[str, Metric]:
        return {"loss": MeanMetric(), "mae": MeanAbsoluteError()}

    def shared_step(self, images: Tensor, stage: str) -> dict[str, Tensor]:
        thumbnails = F.adaptive_avg_pool2d(images.mean(1, keepdim=True), 7).flatten(1)
        target = images.mean(dim=(1, 2, 3))
        prediction = self.head(thumbnails).squeeze(1)
        loss = F.mse_loss(prediction, target)
        metrics = self.metrics_for(stage)
        metrics["loss"].update(loss.detach(), weight=images.shape[0])
        metrics["mae"].update(prediction.detach(), target)
        return {"loss": loss}
