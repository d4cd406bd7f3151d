"""scripts/tokenize.py and the code cache (src/data/code_cache.py) on a quickly trained
default-experiment checkpoint; load_tokenizer's errors for files that are not tokenizers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from src.callbacks.config_in_checkpoint import CONFIG_KEY
from src.data import EmbeddedMNISTDataModule
from src.data.code_cache import CodeCache, CodeCacheError, codes_for_checkpoint
from src.data.embedded_mnist_labels import load_mnist_5k_labels
from src.models import load_tokenizer
from src.models.image_tokenizer import ImageTokenizer
from src.models.load import NotATokenizerError
from tests.conftest import compose_config
from tests.helpers import QUICK, run_script

SPLIT_SIZES = {"train": 4000, "val": 500, "test": 500}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """last.ckpt of the default experiment after 3 training steps (one validation batch)."""
    from train import train

    run_dir = tmp_path_factory.mktemp("tokenizer_run")
    overrides = [*QUICK, "test=false", "+trainer.limit_val_batches=1"]
    train(compose_config("train", overrides, output_dir=run_dir))
    return run_dir / "checkpoints" / "last.ckpt"


def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in directory.iterdir()}


def test_tokenize_writes_every_split_then_reuses(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "codes"
    args = [f"ckpt_path={checkpoint}", f"out_dir={out}", f"hydra.run.dir={tmp_path / 'log'}"]
    first = run_script("scripts/tokenize.py", *args)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "wrote the codes of train 4000, val 500, test 500 items" in first.stdout
    assert "tokenizing train" in first.stderr  # the progress bar

    tokenizer = load_tokenizer(checkpoint)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tokenizer"] == {
        "ckpt_path": str(checkpoint.resolve()),
        "fingerprint": tokenizer.fingerprint,
        "modality": "image",
    }
    assert manifest["grid"] == [7, 7] and manifest["num_codebooks"] == 1
    assert manifest["codebook_sizes"] == [240] and manifest["dtype"] == "uint8"  # FSQ 8*6*5
    datamodule = EmbeddedMNISTDataModule()
    datamodule.setup()
    for split, count in SPLIT_SIZES.items():
        assert manifest["splits"][split]["count"] == count
        codes = np.load(out / f"{split}_codes.npy")
        labels = np.load(out / f"{split}_labels.npy")
        assert codes.shape == (count, 7, 7, 1) and codes.dtype == np.uint8
        rows = datamodule.split_indices[split].numpy()
        assert np.array_equal(labels, load_mnist_5k_labels()[rows])
    # the stored codes are the tokenizer's codes of the split's items, in order
    images = torch.stack([datamodule.data_val[i] for i in range(500)])
    cache = CodeCache.open(out, tokenizer.fingerprint)
    assert torch.equal(cache.codes("val"), tokenizer.encode_codes(images))

    before = snapshot(out)
    second = run_script("scripts/tokenize.py", *args)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"reusing the codes in {out}: same tokenizer" in second.stdout
    assert snapshot(out) == before  # files untouched: same inodes and mtimes


def test_another_tokenizer_rewrites_never_mixes(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "codes"
    first = codes_for_checkpoint(checkpoint, out, splits=["val", "test"], progress=False)
    # another tokenizer: the same checkpoint with one weight changed
    stored = torch.load(checkpoint, map_location="cpu", weights_only=True)
    key = next(k for k in stored["state_dict"] if k.startswith("decoder."))
    stored["state_dict"][key] = stored["state_dict"][key] + 0.5
    other = tmp_path / "other.ckpt"
    torch.save(stored, other)
    messages: list[str] = []
    second = codes_for_checkpoint(other, out, splits=["val"], progress=False, log=messages.append)
    assert second.fingerprint != first.fingerprint
    assert any("rewriting the codes" in m and "another tokenizer" in m for m in messages)
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json",
        "val_codes.npy",
        "val_labels.npy",
    ]  # the first tokenizer's test codes are gone, not left beside the new ones
    assert CodeCache.open(out).fingerprint == load_tokenizer(other).fingerprint
    with pytest.raises(CodeCacheError, match="another tokenizer"):
        CodeCache.open(out, first.fingerprint)


def test_tokenizing_leaves_the_global_rng_as_reusing_does(checkpoint: Path, tmp_path: Path) -> None:
    """A prior's weight init follows the codes preparation: it must not depend on whether the
    codes were tokenized now or reused (DataLoader iterators draw a base seed from the global
    RNG; before the fix a fresh tokenization moved it and a resumed run differed from step 0)."""
    after = {}
    for attempt in ("tokenized", "reused"):
        torch.manual_seed(7)
        codes_for_checkpoint(checkpoint, tmp_path / "codes", splits=["val"], progress=False)
        after[attempt] = torch.rand(4)
    assert torch.equal(after["tokenized"], after["reused"])


def test_out_dir_with_foreign_files_is_refused(checkpoint: Path, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(CodeCacheError, match=r"not a code cache \(\['notes.txt'\]\)"):
        codes_for_checkpoint(checkpoint, tmp_path, splits=["val"], progress=False)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_load_tokenizer_round_trip_and_device(checkpoint: Path) -> None:
    tokenizer = load_tokenizer(checkpoint, map_location="cpu")
    assert isinstance(tokenizer, ImageTokenizer) and not tokenizer.training
    again = load_tokenizer(str(checkpoint), map_location=torch.device("cpu"))
    assert again.fingerprint == tokenizer.fingerprint  # stable across loads


def test_files_that_are_not_tokenizers(checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        load_tokenizer(tmp_path / "missing.ckpt")
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint")
    with pytest.raises(NotATokenizerError, match="not a readable torch checkpoint"):
        load_tokenizer(text)
    plain = tmp_path / "plain.pt"
    torch.save({"weight": torch.zeros(3)}, plain)
    with pytest.raises(NotATokenizerError, match="no vqzoo run config"):
        load_tokenizer(plain)
    stored = torch.load(checkpoint, map_location="cpu", weights_only=True)
    stored[CONFIG_KEY] = {**stored[CONFIG_KEY], "model": {"_target_": "torch.nn.Linear"}}
    other_model = tmp_path / "other_model.ckpt"
    torch.save(stored, other_model)
    with pytest.raises(NotATokenizerError, match=r"holds a torch\.nn\.Linear model, not a tok"):
        load_tokenizer(other_model)


def test_tokenize_without_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    from scripts.tokenize import tokenize

    cfg = compose_config("tokenize", [], output_dir=tmp_path)
    with pytest.raises(ValueError, match="pass ckpt_path="):
        tokenize(cfg)
