"""Batches of a tokenizer's codes (and class labels) for training a prior on them (stage 2).

The codes come from the code cache of src/data/code_cache.py: the tokenizer checkpoint's data
(its stored `data` config, or another one) is tokenized once per tokenizer fingerprint into
`<tokenizer run>/codes` (or `codes_dir`) and reused by every later run. Batches are
`(codes, labels)`: codes `(B, *grid, Q)` long, labels `(B,)` long (`-1` when unconditional).

What the prior must know about the tokenizer (checkpoint, fingerprint, code slots, grid, a
multi-scale tokenizer's code scales, classes, modality, sample rate) is `model_keywords()`;
train.py passes it to a model config that leaves those keys null
(src/utils/config_checks.py `model_overrides`).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

from src.data.code_cache import CodeCache, CodeCacheError, codes_for_checkpoint, default_code_dir
from src.data.split_datamodule import SplitImageDataModule
from src.prior import check_codes

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


class CodeDataModule(SplitImageDataModule):
    """Codes of `tokenizer_ckpt`'s data, shuffled (resumably) for training, in order otherwise.

    Args:
        tokenizer_ckpt: a tokenizer checkpoint written by train.py (required).
        labels: condition on class labels (an error if the data has none); False trains an
            unconditional prior (labels are yielded as -1).
        codes_dir: where the codes are cached; null = `<tokenizer run>/codes`.
        data: a datamodule config (`_target_`, ...) to tokenize instead of the one stored in
            the tokenizer checkpoint.
        tokenize_batch_size: images / clips per encoder forward while tokenizing.
    """

    def __init__(
        self,
        tokenizer_ckpt: str | None,
        labels: bool = True,
        codes_dir: str | None = None,
        data: dict[str, Any] | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool = False,
        seed: int = 0,
        tokenize_batch_size: int = 256,
    ) -> None:
        super().__init__(batch_size, num_workers, pin_memory, seed)
        if not tokenizer_ckpt or str(tokenizer_ckpt) == "???":
            raise ValueError(
                "no tokenizer checkpoint: pass tokenizer_ckpt=<tokenizer run>/checkpoints/"
                "<name>.ckpt (a prior trains on the codes of a trained tokenizer)"
            )
        path = Path(tokenizer_ckpt).expanduser().resolve()
        if not path.is_file():
            raise FileNotFoundError(
                f"tokenizer checkpoint not found: {path} (tokenizer_ckpt={tokenizer_ckpt}); "
                "train a tokenizer first (python train.py ...) and pass its checkpoint"
            )
        self.tokenizer_ckpt = path
        self.use_labels = bool(labels)
        self.codes_dir = Path(codes_dir).expanduser() if codes_dir else default_code_dir(path)
        if isinstance(data, DictConfig):  # handed over unbuilt (the config's _recursive_: false)
            data = OmegaConf.to_container(data, resolve=True)
        self.data_config = dict(data) if data else None
        self.tokenize_batch_size = int(tokenize_batch_size)
        self.cache: CodeCache | None = None
        self._keywords: dict[str, Any] | None = None

    # ---- the codes ------------------------------------------------------------------------
    def prepare_codes(self) -> CodeCache:
        """Tokenize (or reuse) the codes once per process. Under torchrun / SLURM, ranks other
        than a node's first wait for the first to write them."""
        if self.cache is None:
            if int(os.environ.get("LOCAL_RANK", "0")) > 0:
                self.cache = self._wait_for_codes()
            else:
                self.cache = codes_for_checkpoint(
                    self.tokenizer_ckpt,
                    self.codes_dir,
                    data_config=self.data_config,
                    batch_size=self.tokenize_batch_size,
                    progress=False,
                    log=log.info,
                )
        return self.cache

    def _wait_for_codes(self, timeout_s: float = 3600.0) -> CodeCache:
        from src.models.load import load_tokenizer

        fingerprint = load_tokenizer(self.tokenizer_ckpt).fingerprint
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return CodeCache.open(self.codes_dir, fingerprint)
            except CodeCacheError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(2.0)

    def model_keywords(self) -> dict[str, Any]:
        """What a prior needs to know about the codes and the tokenizer that made them."""
        if self._keywords is None:
            cache = self.prepare_codes()
            self._keywords = {
                "tokenizer_ckpt": str(self.tokenizer_ckpt),
                "tokenizer_fingerprint": cache.fingerprint,
                "codebook_sizes": list(cache.codebook_sizes),
                "grid": list(cache.grid),
                "code_scales": cache.code_scales,
                "num_classes": self._num_classes(cache),
                "modality": cache.manifest["tokenizer"].get("modality"),
                "sample_rate": self._sample_rate(),
            }
        return self._keywords

    @property
    def sample_rate(self) -> int | None:
        """The audio tokenizer's sample rate (None for images)."""
        return self.model_keywords()["sample_rate"]

    def _num_classes(self, cache: CodeCache) -> int:
        if not self.use_labels:
            return 0
        labels = [cache.labels(split) for split in cache.splits]
        if any(x is None for x in labels):
            target = (self.data_config or cache.manifest.get("data") or {}).get("_target_")
            raise ValueError(
                f"data.labels=true, but the tokenizer's data ({target}) has no class labels: "
                "train an unconditional prior with data.labels=false (as experiment=audio_prior "
                "does), or tokenize labelled data (data.data=<datamodule config>)"
            )
        return int(max(int(x.max()) for x in labels if len(x))) + 1

    def _sample_rate(self) -> int | None:
        from src.models.load import read_checkpoint

        hparams = read_checkpoint(self.tokenizer_ckpt).get("hyper_parameters") or {}
        rate = hparams.get("sample_rate")
        return None if rate is None else int(rate)

    # ---- datasets -------------------------------------------------------------------------
    def build_splits(self) -> tuple[Dataset[Tensor], Dataset[Tensor], Dataset[Tensor]]:
        cache = self.prepare_codes()
        conditional = self.model_keywords()["num_classes"] > 0
        datasets = []
        for split in SPLITS:
            codes = cache.codes(split)
            try:
                check_codes(codes, cache.codebook_sizes)
            except ValueError as error:
                raise CodeCacheError(
                    f"{cache.directory}: the cached {split} codes do not fit the tokenizer's "
                    f"codebooks: {error}; delete the directory to tokenize again"
                ) from None
            if tuple(codes.shape[1:-1]) != cache.grid:
                raise CodeCacheError(
                    f"{cache.directory}: the {split} codes have the grid {list(codes.shape[1:-1])}"
                    f", the others {list(cache.grid)}; a prior needs items of one size in every "
                    "split (audio: tokenize fixed-length clips, e.g. data.data.segment_seconds ="
                    " eval_segment_seconds, as experiment=audio_prior does)"
                )
            labels = cache.labels(split) if conditional else None
            if labels is None:
                labels = torch.full((len(codes),), -1, dtype=torch.long)
            datasets.append(TensorDataset(codes, labels))
        return tuple(datasets)
