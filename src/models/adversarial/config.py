"""`model.adversarial`: the settings of adversarial training, checked when the model is built."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from src.models.adversarial.gan_losses import check_loss_kind


@dataclass
class AdversarialConfig:
    """What configs/adversarial/*.yaml set (each key is documented there)."""

    discriminators: list[dict[str, Any]]
    loss: str = "hinge"
    disc_start: int = 0
    disc_weight: float = 0.8
    adaptive_weight: bool = True
    max_adaptive_weight: float = 1e4
    lecam_weight: float = 0.0
    lecam_decay: float = 0.99
    feature_matching_weight: float = 0.0
    balancer: dict[str, Any] | None = None
    lr: float = 2e-4
    betas: tuple[float, float] = (0.5, 0.9)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    min_lr_ratio: float = 1.0
    gen_clip_val: float | None = 1.0
    disc_clip_val: float | None = 1.0

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> AdversarialConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(
                f"model.adversarial has unknown keys {unknown}; known keys: {sorted(known)}"
            )
        if "discriminators" not in config:
            raise ValueError(
                "model.adversarial needs discriminators: a list such as [{name: patchgan}] "
                "(see configs/adversarial/)"
            )
        result = cls(**config)
        result.check()
        return result

    def check(self) -> None:
        check_loss_kind(self.loss)
        if self.disc_start < 0:
            raise ValueError(f"model.adversarial.disc_start must be >= 0, got {self.disc_start}")
        if self.lr <= 0:
            raise ValueError(f"model.adversarial.lr must be > 0, got {self.lr}")
        for name in ("disc_weight", "lecam_weight", "feature_matching_weight", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"model.adversarial.{name} must be >= 0")
        if self.balancer is not None and self.adaptive_weight:
            raise ValueError(
                "model.adversarial: the loss balancer replaces the adaptive weight; set "
                "adaptive_weight=false with a balancer (or balancer=null)"
            )
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("model.adversarial.min_lr_ratio must be in [0, 1]")
