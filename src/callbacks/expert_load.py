"""How a MoE prior's experts shared the tokens in a validation / test epoch: per layer, a
histogram over experts for TensorBoard / W&B (as the code-frequency charts are for codebooks),
so expert usage is compared across runs the way codebook usage is."""

from __future__ import annotations

from lightning import Callback, LightningModule, Trainer

from src.loggers.media import log_histogram


class ExpertLoad(Callback):
    """After each validation and test epoch, reads the epoch's routing counts from the model's
    `expert_usage(stage)` metric (src/models/prior.py) and logs `<stage>/moe/<layer>/load` (a
    histogram whose bin e is the fraction of the layer's assignments expert e got).

    Runs before the model's own epoch end (which logs and resets the metric); the metric is
    summed over ranks, so every rank calls compute and rank 0 logs.
    """

    def __init__(self) -> None:
        self.last_load = None

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self._record(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._record(trainer, pl_module, "test")

    def _record(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        usage_of = getattr(pl_module, "expert_usage", None)
        if not callable(usage_of):
            return
        usage = usage_of(stage)
        if usage.update_count == 0:
            return
        load = usage.compute()["load"].cpu()
        if not trainer.is_global_zero:
            return
        self.last_load = load
        for layer, row in enumerate(load):
            log_histogram(trainer.loggers, f"{stage}/moe/{layer}/load", row, trainer.global_step)
