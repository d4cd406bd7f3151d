"""A multi-scale tokenizer (quantizer=hierarchical_vq) through stage 2, end to end at tiny sizes:
its codes API gives codes per scale, the code cache records the scales, the codes datamodule
hands them to a next-scale CodePrior, which trains a few steps (its loss falls), samples valid
multi-scale codes and the tokenizer decodes them into images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch.utils.data import TensorDataset

from src.data.code_cache import CodeCache, tokenize_splits
from src.models.codes_api import CodesAPI
from src.models.image_tokenizer import ImageTokenizer
from src.models.prior import CodePrior
from src.prior import codes_to_scales, scales_to_codes
from tests.models.test_codes_api import tiny_image_tokenizer
from tests.models.test_prior import NET as PRIOR_NET

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "quantizer" / "hierarchical_vq.yaml"
NET = {**PRIOR_NET, "max_position_embeddings": 64}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer() -> ImageTokenizer:
    """The config's hierarchical_vq (32 codes instead of 512) in a 8x8 -> 4x4 tokenizer, a few
    Adam steps on random images so that the levels use several codes."""
    config = {**yaml.safe_load(CONFIG.read_text()), "codebook_size": 32}
    return tiny_image_tokenizer(config, steps=3, image_size=8)


def test_codes_api_gives_codes_per_scale(tokenizer: ImageTokenizer) -> None:
    images = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    codes = tokenizer.encode_codes(images)
    assert tuple(codes.shape) == (5, 4, 4, 6)
    # the config's scales [1, 2, 4, 8, 16, 49] over the 16 positions of the 4x4 grid
    assert tokenizer.code_scales((4, 4)) == [[1], [2], [4], [8], [16], [16]]
    levels = tokenizer.codes_per_scale(codes)
    assert [tuple(level.shape) for level in levels] == [(5, n) for n in (1, 2, 4, 8, 16, 16)]
    # level 1 has 2 cells of 8 positions each (raster order): rows 0-1 and rows 2-3
    assert torch.equal(codes[:, :2, :, 1], levels[1][:, :1, None].expand(5, 2, 4))
    assert torch.equal(codes[:, 2:, :, 1], levels[1][:, 1:, None].expand(5, 2, 4))
    assert torch.equal(tokenizer.codes_from_scales(levels, (4, 4)), codes)
    # the quantizer's own levels layout gives the same codes per scale (the first five: it
    # does not cap a scale at the 16 tokens, its last level has 49 cells over them)
    with tokenizer.eval_no_grad():
        latents = tokenizer.latent_norm(tokenizer.encoder(images * 2 - 1))
        sequence = latents.flatten(2).transpose(1, 2)
        tokenizer.quantizer.indices_layout = "levels"
        try:
            own = tokenizer.quantizer(sequence).indices
        finally:
            tokenizer.quantizer.indices_layout = "slots"
    assert all(torch.equal(a, b) for a, b in zip(levels[:5], own[:5], strict=True))


def test_code_scales_of_other_tokenizers_are_none() -> None:
    model = ImageTokenizer(
        in_channels=1, quantizer={"name": "fsq", "levels": [5, 5]}, channels=(8,), latent_dim=2
    )
    assert model.code_scales((4, 4)) is None
    with pytest.raises(ValueError, match="not a multi-scale quantizer"):
        model.codes_per_scale(torch.zeros(1, 4, 4, 1, dtype=torch.long))


class _Images:
    """A datamodule of random images (no labels): what tokenize_splits reads."""

    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(2)
        for split, count in (("train", 16), ("val", 4), ("test", 4)):
            setattr(self, f"data_{split}", TensorDataset(torch.rand(count, 1, 8, 8, generator=gen)))

    def setup(self, stage: str | None = None) -> None:
        pass


def test_next_scale_prior_trains_samples_and_decodes(
    tokenizer: ImageTokenizer, tmp_path: Path
) -> None:
    cache = tokenize_splits(tokenizer, _Images(), tmp_path / "codes", progress=False)
    manifest = json.loads((tmp_path / "codes" / "manifest.json").read_text())
    assert manifest["code_scales"] == [[1], [2], [4], [8], [16], [16]]
    cache = CodeCache.open(tmp_path / "codes", tokenizer.fingerprint)
    codes = cache.codes("train")
    assert torch.equal(codes, tokenizer.encode_codes(_Images().data_train.tensors[0]))

    torch.manual_seed(0)
    prior = CodePrior(
        NET,
        codebook_sizes=list(cache.codebook_sizes),
        grid=list(cache.grid),
        num_classes=0,
        code_scales=cache.code_scales,
        layout="next_scale",
        warmup_steps=1,
    )
    assert prior.layout.seq_len == 1 + 1 + 2 + 4 + 8 + 16 + 16  # not 1 + 16 * 6 (flatten)
    tokens = prior.encode_batch((codes, torch.full((16,), -1)))
    assert torch.equal(prior.layout.decode(tokens), codes)

    optimizer = torch.optim.Adam(prior.parameters(), lr=3e-3)
    batch = (codes, torch.full((16,), -1))
    losses = []
    for _ in range(25):
        loss = prior.shared_step(batch, "train")["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.6 * losses[0], losses

    samples = prior.sample_codes(3, generator=torch.Generator().manual_seed(0))
    assert tuple(samples.shape) == (3, 4, 4, 6)
    levels = tokenizer.codes_per_scale(samples)  # every cell's positions share its code
    assert torch.equal(tokenizer.codes_from_scales(levels, (4, 4)), samples)
    images = tokenizer.decode_codes(samples)
    assert tuple(images.shape) == (3, 1, 8, 8)
    assert (
        bool(torch.isfinite(images).all()) and 0 <= float(images.min()) <= float(images.max()) <= 1
    )
    # greedy samples are the argmax path: sampling twice gives the same codes
    first = prior.sample_codes(2, temperature=0.0)
    assert torch.equal(first, prior.sample_codes(2, temperature=0.0))
    assert isinstance(tokenizer, CodesAPI)


def test_next_scale_nll_and_guided_sampling_are_exact() -> None:
    """Class-conditional next-scale prior: the logged NLL is the mean cross entropy of each
    target over the ids of its level only (brute force), and guidance at scales 1 / 0 gives
    the conditional / unconditional samples bit for bit."""
    scales, sizes, grid = [[1], [2], [6]], [5, 7, 11], (2, 3)
    torch.manual_seed(0)
    prior = CodePrior(
        NET,
        codebook_sizes=sizes,
        grid=list(grid),
        num_classes=10,
        code_scales=scales,
        layout="next_scale",
    ).eval()
    gen = torch.Generator().manual_seed(3)
    levels = [
        torch.randint(0, n, (4, *s), generator=gen) for s, n in zip(scales, sizes, strict=True)
    ]
    codes = scales_to_codes(levels, scales, grid)
    labels = torch.tensor([0, 4, -1, 9])
    with torch.no_grad():
        prior.shared_step((codes, labels), "val")
        tokens = prior.layout.encode(codes, labels)
        logits, _ = prior.net(tokens[:, :-1])
    offsets = [0, 5, 12]
    total, count = 0.0, 0
    for b in range(4):
        for t in range(tokens.shape[1] - 1):
            level = 0 if t < 1 else 1 if t < 3 else 2
            start, stop = offsets[level], offsets[level] + sizes[level]
            row = F.log_softmax(logits[b, t, start:stop].double(), -1)
            total -= float(row[int(tokens[b, t + 1]) - start])
            count += 1
    assert count == 4 * (1 + 2 + 6)
    nll = float(prior.metrics_for("val")["nll"].compute()["nll"])
    assert nll == pytest.approx(total / count, rel=1e-5)

    def draw(**kw) -> torch.Tensor:
        return prior.sample_codes(4, generator=torch.Generator().manual_seed(0), **kw)

    labels = torch.tensor([3, 1, 4, 1])
    conditional = draw(labels=labels)
    assert torch.equal(draw(labels=labels, cfg_scale=1.0), conditional)
    assert torch.equal(draw(labels=labels, cfg_scale=0.0), draw(labels=torch.full((4,), -1)))
    assert torch.equal(
        scales_to_codes(codes_to_scales(conditional, scales), scales, grid), conditional
    )


def test_next_scale_prior_without_scales_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="needs the tokenizer's scales"):
        CodePrior(NET, codebook_sizes=[8, 8], grid=[2, 2], num_classes=0, layout="next_scale")


@pytest.mark.slow  # a tokenizer and a prior trained by train.py: ~1-2 min on 2 loaded cores
def test_train_py_runs_a_next_scale_prior_on_a_hierarchical_tokenizer(tmp_path: Path) -> None:
    """The plumbing of train.py: the code cache's scales reach model.code_scales (null in the
    config), the prior trains on the 1 + 80 token sequences and its samples decode."""
    from src.models.prior_io import load_prior
    from tests.conftest import compose_config
    from tests.helpers import QUICK
    from train import train

    tokenizer_dir = tmp_path / "tokenizer"
    overrides = [*QUICK, "quantizer=hierarchical_vq", "test=false", "+trainer.limit_val_batches=1"]
    train(compose_config("train", overrides, tokenizer_dir))
    prior_dir = tmp_path / "prior"
    overrides = [
        "experiment=mnist_prior",
        f"tokenizer_ckpt={tokenizer_dir / 'checkpoints' / 'last.ckpt'}",
        "model.layout=next_scale",
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=3",
        "+trainer.limit_val_batches=1",
        "test=false",
        "extras.print_config=false",
        "callbacks.model_summary=null",
        "callbacks.sample_metrics=null",
        "callbacks.prior_samples.num_samples=4",
        "model.net.hidden_size=32",
        "model.net.intermediate_size=32",
        "model.net.num_hidden_layers=1",
        "model.net.num_attention_heads=2",
        "model.net.num_key_value_heads=1",
    ]
    train(compose_config("train", overrides, prior_dir))
    prior = load_prior(prior_dir / "checkpoints" / "last.ckpt")
    assert prior.hparams.code_scales == [[1], [2], [4], [8], [16], [49]]
    assert prior.layout.name == "next_scale" and prior.layout.seq_len == 81
    samples = prior.sample_codes(2, generator=torch.Generator().manual_seed(0))
    assert tuple(samples.shape) == (2, 7, 7, 6)
    assert sorted(p.name for p in prior_dir.rglob("*.png"))  # the sample grid was written
