"""The adversarial training step of the image tokenizer (Lightning manual optimisation).

- before `disc_start` the run is the plain one: the generator's gradients and weights equal a
  tokenizer without `adversarial`, and the discriminator keeps its initial weights;
- from `disc_start` on, the generator's optimiser step leaves the discriminator unchanged and the
  discriminator's step leaves the generator unchanged; global_step counts batches;
- the logged `train/gan/...` values are there and finite;
- under bf16-mixed autocast both networks stay float32 and the losses equal float32's closely.
"""

from __future__ import annotations

import copy

import pytest
import torch
from lightning import Callback, Trainer
from torch.utils.data import DataLoader, TensorDataset

from src.models.image_tokenizer import ImageTokenizer

GAN = {
    "discriminators": [{"name": "patchgan", "channels": 8, "num_layers": 2, "norm": "group"}],
    "loss": "hinge",
    "lecam_weight": 0.1,
}


def _model(adversarial: dict | None) -> ImageTokenizer:
    torch.manual_seed(0)
    return ImageTokenizer(
        in_channels=1,
        quantizer={"name": "fsq", "levels": [5, 5]},
        latent_dim=8,
        channels=(8, 16),
        warmup_steps=1,
        adversarial=adversarial,
    )


def _loader() -> DataLoader:
    images = torch.rand(24, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    return DataLoader(TensorDataset(images), batch_size=8)


def _unwrap(model: ImageTokenizer) -> ImageTokenizer:
    """TensorDataset yields 1-tuples: hand the image tensor to the tokenizer."""
    original = model.shared_step
    model.shared_step = lambda batch, stage: original(batch[0], stage)
    return model


def _trainer(
    steps: int, callbacks: list[Callback], clip: float | None, precision: str = "32-true"
) -> Trainer:
    return Trainer(
        max_steps=steps,
        accelerator="cpu",
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        gradient_clip_val=clip,
        callbacks=callbacks,
        log_every_n_steps=1,
    )


class GeneratorGradients(Callback):
    """The generator's gradients at each generator optimiser step (first optimiser)."""

    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if optimizer is trainer.optimizers[0]:
            self.grads.append(
                {
                    n: p.grad.detach().clone()
                    for n, p in pl_module.named_parameters()
                    if p.grad is not None and not n.startswith("discriminator.")
                }
            )


def _generator_state(model: ImageTokenizer) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.startswith("discriminator.")}


def test_before_disc_start_the_run_is_the_plain_run() -> None:
    plain, gan = _unwrap(_model(None)), _unwrap(_model({**GAN, "disc_start": 100}))
    disc_init = copy.deepcopy(gan.discriminator.state_dict())
    # same generator initialisation: the discriminator is drawn without advancing the RNG
    for name, value in _generator_state(plain).items():
        assert torch.equal(value, gan.state_dict()[name]), name
    plain_grads, gan_grads = GeneratorGradients(), GeneratorGradients()
    torch.manual_seed(3)
    _trainer(3, [plain_grads], clip=1.0).fit(plain, _loader())
    torch.manual_seed(3)
    _trainer(3, [gan_grads], clip=None).fit(gan, _loader())  # clipped by gen_clip_val = 1.0
    assert len(plain_grads.grads) == len(gan_grads.grads) == 3
    for step, (a, b) in enumerate(zip(plain_grads.grads, gan_grads.grads, strict=True)):
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), (step, name)
    for name, value in _generator_state(plain).items():
        assert torch.equal(value, gan.state_dict()[name]), name
    for name, value in gan.discriminator.state_dict().items():
        assert torch.equal(value, disc_init[name]), name
    assert int(gan.disc_steps) == 0


class StepIsolation(Callback):
    """Snapshots of generator and discriminator before each optimiser step and at batch end."""

    def __init__(self) -> None:
        self.snapshots: list[tuple[str, dict, dict]] = []

    def _snap(self, pl_module, when: str) -> None:
        gen = {n: p.detach().clone() for n, p in pl_module.named_parameters()
               if not n.startswith("discriminator.")}  # fmt: skip
        disc = {n: p.detach().clone() for n, p in pl_module.discriminator.named_parameters()}
        self.snapshots.append((when, gen, disc))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._snap(pl_module, "before_g" if optimizer is trainer.optimizers[0] else "before_d")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._snap(pl_module, "end")


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_each_optimiser_step_changes_only_its_own_network() -> None:
    gan = _unwrap(_model({**GAN, "disc_start": 1}))
    isolation = StepIsolation()
    trainer = _trainer(3, [isolation], clip=None)
    trainer.fit(gan, _loader())
    assert trainer.global_step == 3  # one step per batch, whatever the discriminator does
    assert int(gan.disc_steps) == 2  # steps 1 and 2 (global step >= disc_start = 1)
    kinds = [when for when, _, _ in isolation.snapshots]
    # step 0: generator only; steps 1, 2: generator then discriminator
    assert kinds == ["before_g", "end"] + ["before_g", "before_d", "end"] * 2
    for i in (2, 5):  # the two adversarial steps
        (_, g0, d0), (_, g1, d1), (_, g2, d2) = isolation.snapshots[i : i + 3]
        assert not _same(g0, g1) and _same(d0, d1)  # generator step: discriminator unchanged
        assert _same(g1, g2) and not _same(d1, d2)  # discriminator step: generator unchanged
    logged = trainer.logged_metrics
    for name in ("g_loss", "d_loss", "adaptive_weight", "d_acc_real", "d_acc_fake", "lecam"):
        assert torch.isfinite(logged[f"train/gan/{name}"]), name
    assert 0 <= float(logged["train/gan/d_acc_real"]) <= 1


def test_bad_adversarial_config_fails_when_the_model_is_built() -> None:
    with pytest.raises(ValueError, match="unknown keys \\['disc_strat'\\]"):
        _model({**GAN, "disc_strat": 5})
    with pytest.raises(ValueError, match="balancer replaces the adaptive weight"):
        _model({**GAN, "balancer": {"weights": {"recon": 1.0}}})


class GanLosses(Callback):
    """The logged `train/gan/{d_loss,g_loss}` after every training batch."""

    def __init__(self) -> None:
        self.values: list[tuple[float, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        logged = trainer.callback_metrics
        if "train/gan/d_loss" in logged:
            self.values.append(
                (float(logged["train/gan/d_loss"]), float(logged["train/gan/g_loss"]))
            )


def _fit(precision: str) -> tuple[ImageTokenizer, GanLosses]:
    gan = _unwrap(_model({**GAN, "disc_start": 1}))
    losses = GanLosses()
    trainer = _trainer(3, [losses], clip=None, precision=precision)
    trainer.fit(gan, _loader())
    return gan, losses


def test_gan_step_under_bf16_autocast_keeps_float32_state_and_the_float32_losses() -> None:
    """`trainer.precision=bf16-mixed` (what `trainer=gpu` uses; autocast on CPU here): both
    networks stay float32 and train, and the adversarial losses of the two adversarial steps
    equal the float32 run's to bf16 accuracy (the discriminator losses are computed in float32
    from bf16 logits)."""
    initial = _model({**GAN, "disc_start": 1})
    bf16, bf16_losses = _fit("bf16-mixed")
    _, fp32_losses = _fit("32-true")
    for name, value in bf16.state_dict().items():
        if value.is_floating_point():
            assert value.dtype == torch.float32, name
            assert bool(torch.isfinite(value).all()), name
    before, after = initial.state_dict(), bf16.state_dict()
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert {"discriminator", "decoder", "encoder"} <= changed
    assert len(bf16_losses.values) == len(fp32_losses.values) == 2
    for (d16, g16), (d32, g32) in zip(bf16_losses.values, fp32_losses.values, strict=True):
        assert d16 == pytest.approx(d32, abs=3e-3)  # the values are ~1 and ~0.05
        assert g16 == pytest.approx(g32, abs=3e-3)
        assert (d16, g16) != (d32, g32)  # autocast did run in bf16
