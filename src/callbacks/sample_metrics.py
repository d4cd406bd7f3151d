"""What a prior's image samples are worth, at test time (after fit: on the best checkpoint).

For a prior on the codes of embedded MNIST digits: `num_samples` samples (labels 0..9 cycling
for a conditional prior) decoded by the prior's tokenizer and judged by the cached digit
classifier (src/metrics): `sample/class_accuracy` (fraction classified as the requested digit)
and `sample/fd` (Frechet distance of classifier features to the held-out test digits), with the
reference rows `sample/fd_real_val` (real validation digits against the test digits: what a
perfect sampler reaches at this sample size) and `sample/fd_reconstructions` (the tokenizer's
reconstructions of the test digits: the floor a prior on these codes can reach).
Other data (not the embedded digits) gets a warning and no sample metrics.
"""

from __future__ import annotations

import logging

import torch
from lightning import Callback, LightningModule, Trainer
from torch import Tensor

from src.models.prior_io import load_prior_tokenizer

log = logging.getLogger(__name__)

DIGITS = "src.data.EmbeddedMNISTDataModule"


class SampleMetrics(Callback):
    """Logs `sample/class_accuracy`, `sample/fd`, `sample/fd_real_val`,
    `sample/fd_reconstructions` at the end of the test epoch (and prints them)."""

    def __init__(
        self,
        num_samples: int = 1000,
        batch_size: int = 250,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        cfg_scale: float | None = None,
        seed: int = 0,
    ) -> None:
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.settings = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
        self.cfg_scale = cfg_scale
        self.seed = seed
        self.values: dict[str, float] = {}

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._is_digits(trainer, pl_module):
            return
        self.values = self.compute(pl_module)
        for name, value in self.values.items():
            pl_module.log(name, value, sync_dist=False)
        shown = ", ".join(f"{k} {v:.4g}" for k, v in self.values.items())
        log.info("sample metrics over %d samples: %s", self.num_samples, shown)
        if trainer.is_global_zero:
            print(f"sample metrics ({self.num_samples} samples): {shown}")

    def _is_digits(self, trainer: Trainer, pl_module: LightningModule) -> bool:
        cache = getattr(trainer.datamodule, "cache", None)
        target = ((cache.manifest.get("data") or {}) if cache else {}).get("_target_")
        if pl_module.hparams.get("modality") == "image" and target == DIGITS:
            return True
        log.warning(
            "sample_metrics: the digit classifier judges priors on %s codes only; this prior's "
            "data is %s: no sample/ metrics", DIGITS, target,
        )  # fmt: skip
        return False

    @torch.no_grad()
    def compute(self, pl_module: LightningModule) -> dict[str, float]:
        """The four values (every rank computes the same ones: same seed, same weights)."""
        from src.data.embedded_mnist_labels import mnist_5k_split
        from src.metrics.digit_classifier import load_digit_classifier
        from src.metrics.frechet import class_accuracy, frechet_distance

        tokenizer = load_prior_tokenizer(pl_module.hparams).to(pl_module.device)
        classifier = load_digit_classifier()
        images, labels = self.sample_images(pl_module, tokenizer)
        val_images, _ = mnist_5k_split("val")
        test_images, _ = mnist_5k_split("test")
        recons = torch.cat(
            [
                tokenizer.decode_codes(tokenizer.encode_codes(chunk.to(pl_module.device))).cpu()
                for chunk in test_images.split(self.batch_size)
            ]
        )
        values = {"sample/fd": frechet_distance(images, test_images, classifier)}
        if labels is not None:
            values["sample/class_accuracy"] = class_accuracy(images, labels, classifier)
        values["sample/fd_real_val"] = frechet_distance(val_images, test_images, classifier)
        values["sample/fd_reconstructions"] = frechet_distance(recons, test_images, classifier)
        return values

    def sample_images(self, pl_module: LightningModule, tokenizer) -> tuple[Tensor, Tensor | None]:
        """`num_samples` decoded samples (and their requested labels, if conditional)."""
        generator = torch.Generator(device=pl_module.device).manual_seed(self.seed)
        classes = pl_module.layout.num_classes
        labels = torch.arange(self.num_samples) % classes if classes else None
        cfg_scale = self.cfg_scale if classes else None
        chunks = []
        for start in range(0, self.num_samples, self.batch_size):
            count = min(self.batch_size, self.num_samples - start)
            chunk_labels = None if labels is None else labels[start : start + count]
            codes = pl_module.sample_codes(
                count, chunk_labels, cfg_scale=cfg_scale, generator=generator, **self.settings
            )
            chunks.append(tokenizer.decode_codes(codes).cpu())
        return torch.cat(chunks), labels
