"""Adversarial training of a tokenizer with Lightning manual optimisation.

`AdversarialTraining` is a mixin placed before the tokenizer's other bases. Without
`model.adversarial` (config None) every hook defers to the plain tokenizer, so that path is
unchanged. With it, each training step:

1. runs the tokenizer's `shared_step` (reconstruction + quantizer losses, train metrics);
2. before `disc_start` (global step < disc_start): backward of that loss alone, the generator
   optimiser steps, the discriminator neither runs nor steps (under DDP its parameters enter the
   graph with a zero factor, so every rank's reducer sees all parameters);
3. from `disc_start` on: the discriminator scores real media and detached reconstructions
   (its loss, + LeCam), and, with its parameters frozen, the reconstructions again (the
   generator's adversarial loss, + feature matching), weighted by VQGAN's adaptive weight, a
   fixed weight, or EnCodec's balancer. One backward of generator + discriminator loss: the
   frozen pass sends no gradient into the discriminator and the detached pass none into the
   generator, so each optimiser's gradients are its own loss's and DDP syncs both in one
   reduction. Then the generator optimiser steps, then the discriminator's (each with its own
   warmup + cosine schedule).

Only the generator's step counts as a Lightning optimiser step (`trainer.global_step` = batches,
so max_steps, step checkpoints and schedules mean what they mean without adversarial training);
the discriminator steps through the strategy (precision plugin and `on_before_optimizer_step`
hooks included). Each optimiser's gradients are clipped by its own max norm after the
callbacks' `on_before_optimizer_step` hooks, as Lightning clips in automatic optimisation. Both
optimisers, both schedules and the discriminator's step count are in the checkpoint, so a
resumed run continues exactly.

Logged per step: `train/gan/{g_loss,d_loss,adaptive_weight,d_acc_real,d_acc_fake}` and, when
used, `train/gan/{lecam,feature_matching}` and `train/gan/balancer/<loss>_grad_norm`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from src.models.adversarial.adaptive_weight import adaptive_weight
from src.models.adversarial.config import AdversarialConfig
from src.models.adversarial.discriminators import Discriminators
from src.models.adversarial.gan_losses import (
    LeCam,
    decision_threshold,
    discriminator_accuracy,
    discriminator_loss,
    feature_matching_loss,
    generator_loss,
)
from src.models.adversarial.loss_balancer import LossBalancer
from src.models.base_module import adamw, batch_size_of
from src.models.schedules import warmup_cosine

DISCRIMINATOR_PREFIX = "discriminator."


@contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Parameters of `module` do not require grad inside the block (restored after)."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def decoder_last_layer(decoder: nn.Module) -> Tensor:
    """Weight of the decoder's last convolution (where the adaptive weight compares gradients)."""
    convs = [m for m in decoder.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    if not convs:
        raise ValueError("the decoder has no convolution for the adaptive weight to read")
    return convs[-1].weight


class AdversarialTraining:
    """Mixin for tokenizers (needs `decoder`, `shared_step` returning `generated`,
    `recon_loss`, `quantizer_loss`, `recon_parts`, and `discriminator_input(media)`)."""

    gan: AdversarialConfig | None = None

    def init_adversarial(self, config: dict[str, Any] | None, in_channels: int) -> None:
        """Build the discriminators, LeCam EMAs and balancer of `config` (None: no GAN). The
        discriminators' initial weights are drawn without advancing the global RNG, so the
        generator sees the random numbers (data order, quantizer draws) of the plain run."""
        self.gan = None
        if config is None:
            return
        gan = AdversarialConfig.from_dict(dict(config))
        with torch.random.fork_rng(devices=[]):
            self.discriminator = Discriminators(gan.discriminators, in_channels)
        self.lecam = LeCam(gan.lecam_decay) if gan.lecam_weight > 0 else None
        self.balancer = LossBalancer(**gan.balancer) if gan.balancer is not None else None
        # discriminator steps taken (checkpointed; equals max(0, step - disc_start))
        self.register_buffer("disc_steps", torch.zeros((), dtype=torch.long))
        self.automatic_optimization = False
        self.gan = gan

    # ---- optimisers ------------------------------------------------------------------------

    def generator_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if not n.startswith(DISCRIMINATOR_PREFIX)]

    def configure_optimizers(self) -> Any:
        if self.gan is None:
            return super().configure_optimizers()
        hp, gan = self.hparams, self.gan
        total = int(self.trainer.estimated_stepping_batches)
        gen = adamw(self.generator_parameters(), hp.lr, hp.weight_decay, hp.betas)
        disc = adamw(self.discriminator.parameters(), gan.lr, gan.weight_decay, gan.betas)
        gen_schedule = warmup_cosine(gen, hp.warmup_steps, total, hp.min_lr_ratio)
        disc_total = max(1, total - gan.disc_start)
        disc_schedule = warmup_cosine(disc, gan.warmup_steps, disc_total, gan.min_lr_ratio)
        return [gen, disc], [
            {"scheduler": gen_schedule, "interval": "step", "name": "lr-generator"},
            {"scheduler": disc_schedule, "interval": "step", "name": "lr-discriminator"},
        ]

    # ---- the step --------------------------------------------------------------------------

    def gan_active(self) -> bool:
        """Whether this step trains the discriminator and uses it (global step >= disc_start)."""
        return self.gan is not None and self.global_step >= self.gan.disc_start

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        if self.gan is None:
            return super().training_step(batch, batch_idx)
        gen_opt, disc_opt = self.optimizers()
        gen_schedule, disc_schedule = self.lr_schedulers()
        size = batch_size_of(batch)
        out = self.shared_step(batch, "train")
        self.log("train/loss_step", out["loss"].detach(), prog_bar=True, batch_size=size)
        active = self.gan_active()
        if active:
            gen_loss, disc_loss = self.adversarial_losses(out, size)
            total = gen_loss + disc_loss
        else:
            gen_loss = total = out["loss"]
            if self.trainer.world_size > 1:  # every parameter in the graph for DDP's reducer
                total = total + 0.0 * sum(p.sum() for p in self.discriminator.parameters())
        gen_opt.zero_grad()
        disc_opt.zero_grad()
        self.manual_backward(total)
        gen_opt.step()  # clipped in on_before_optimizer_step
        gen_schedule.step()
        if active:
            # through the strategy, not LightningOptimizer.step: global_step counts batches
            self.trainer.strategy.optimizer_step(disc_opt.optimizer, closure=lambda: None)
            disc_schedule.step()
            self.disc_steps += 1
        return {"loss": gen_loss.detach()}

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        """Clip each optimiser's gradients by its own max norm, where Lightning clips in
        automatic optimisation: after the callbacks' hooks saw the raw gradients."""
        if self.gan is None:
            return super().on_before_optimizer_step(optimizer)
        is_generator = optimizer is self.trainer.optimizers[0]
        clip = self.gan.gen_clip_val if is_generator else self.gan.disc_clip_val
        if clip is not None:
            self.clip_gradients(optimizer, clip, "norm")
        return None

    def adversarial_losses(self, out: dict[str, Any], size: int) -> tuple[Tensor, Tensor]:
        """The generator's total loss and the discriminator's loss of one step (logs them)."""
        gan = self.gan
        real = self.discriminator_input(out["inputs"])
        fake = self.discriminator_input(out["generated"])
        real_heads = self.discriminator(real)
        fake_heads = self.discriminator(fake.detach())
        real_logits = [logits for logits, _ in real_heads]
        fake_logits = [logits for logits, _ in fake_heads]
        disc_loss = discriminator_loss(gan.loss, real_logits, fake_logits)
        logs: dict[str, Tensor] = {"d_loss": disc_loss.detach()}
        if self.lecam is not None:
            self.lecam.update(self.mean_logit(real_logits), self.mean_logit(fake_logits))
            lecam = self.lecam(real_logits, fake_logits)
            disc_loss = disc_loss + gan.lecam_weight * lecam
            logs["lecam"] = lecam.detach()
        with frozen(self.discriminator):
            gen_heads = self.discriminator(fake)
        g_adv = generator_loss(gan.loss, [logits for logits, _ in gen_heads])
        logs["g_loss"] = g_adv.detach()
        fm = None
        if gan.feature_matching_weight > 0:
            fm = feature_matching_loss(
                [feats for _, feats in real_heads], [feats for _, feats in gen_heads]
            )
            logs["feature_matching"] = fm.detach()
        if self.balancer is not None:
            losses = dict(out["recon_parts"])
            losses["adversarial"] = g_adv
            if fm is not None:
                losses["feature_matching"] = fm
            surrogate, norms = self.balancer.balance(losses, out["generated"], self.rank_mean)
            gen_loss = surrogate + out["quantizer_loss"]
            logs.update({f"balancer/{name}_grad_norm": n for name, n in norms.items()})
        else:
            if gan.adaptive_weight:
                weight = adaptive_weight(
                    out["recon_loss"],
                    g_adv,
                    decoder_last_layer(self.decoder),
                    gan.disc_weight,
                    gan.max_adaptive_weight,
                )
            else:
                weight = torch.tensor(gan.disc_weight, device=g_adv.device)
            logs["adaptive_weight"] = weight
            gen_loss = out["loss"] + weight * g_adv
            if fm is not None:
                gen_loss = gen_loss + gan.feature_matching_weight * fm
        acc_real, acc_fake = discriminator_accuracy(
            real_logits, fake_logits, decision_threshold(gan.loss)
        )
        logs["d_acc_real"], logs["d_acc_fake"] = acc_real, acc_fake
        self.log_dict({f"train/gan/{k}": v for k, v in logs.items()}, batch_size=size)
        return gen_loss, disc_loss

    def mean_logit(self, logits: list[Tensor]) -> Tensor:
        """Mean over heads of each head's mean logit, averaged over ranks (LeCam's EMAs)."""
        return self.rank_mean(torch.stack([x.detach().float().mean() for x in logits]).mean())

    def rank_mean(self, value: Tensor) -> Tensor:
        """Mean over ranks (identity on one process)."""
        return self.trainer.strategy.reduce(value, reduce_op="mean")
