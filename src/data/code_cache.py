"""Codes of a dataset's splits on disk, keyed by the tokenizer's fingerprint.

`scripts/tokenize.py` writes them; a stage-2 prior reads them (`codes_for_checkpoint`). Layout
of a cache directory:

    manifest.json          written last: its presence means the files below are complete
    <split>_codes.npy      (N, *grid, Q), the smallest unsigned dtype holding every code
    <split>_labels.npy     (N,) class labels where the dataset has them (same dtype rule)

for split in train / val / test, items in the split's fixed (unshuffled) order. The manifest
(format "vqzoo-codes/1") records the tokenizer (checkpoint path, fingerprint, modality), the
data config, grid, Q, codebook sizes, dtype, `code_scales` (a multi-scale tokenizer's cells per
level, for a next-scale prior; null for others, absent in older caches) and per split the
count and file names. A run
with the same fingerprint and data reuses the files untouched; anything else rewrites them
all (the old manifest is removed first, so a directory never mixes two tokenizers' codes).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from src.data.split_labels import SPLITS, split_labels

FORMAT = "vqzoo-codes/1"
MANIFEST = "manifest.json"
# fields of a data config that do not change which items a split holds
LOADER_KEYS = ("batch_size", "num_workers", "pin_memory")


class CodeCacheError(ValueError):
    """A directory that cannot serve as, or does not hold, the expected code cache."""


def smallest_dtype(max_value: int) -> np.dtype:
    """The smallest of uint8 / uint16 / uint32 / int64 that holds 0..max_value."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if max_value <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.int64)


def codes_file(split: str) -> str:
    return f"{split}_codes.npy"


def labels_file(split: str) -> str:
    return f"{split}_labels.npy"


def _ours(name: str) -> bool:
    """Whether a file name is one this module writes (complete or partial)."""
    name = name.removeprefix(".").split(".partial")[0]
    return name == MANIFEST or any(name in (codes_file(s), labels_file(s)) for s in SPLITS)


class CodeCache:
    """A complete code cache directory (read side): codes, labels and the manifest."""

    def __init__(self, directory: Path, manifest: dict[str, Any]) -> None:
        self.directory = directory
        self.manifest = manifest

    @classmethod
    def open(cls, directory: str | Path, fingerprint: str | None = None) -> CodeCache:
        """The cache in `directory`; CodeCacheError when there is none, it is incomplete, or
        (with `fingerprint`) it was made by another tokenizer."""
        directory = Path(directory).expanduser()
        manifest = read_manifest(directory)
        if manifest is None:
            raise CodeCacheError(
                f"{directory} holds no code cache ({MANIFEST} missing): run "
                f"`python scripts/tokenize.py ckpt_path=<tokenizer ckpt> out_dir={directory}`"
            )
        problem = _completeness_problem(directory, manifest)
        if problem:
            raise CodeCacheError(f"{directory}: {problem}; tokenize again to rewrite it")
        found = manifest["tokenizer"]["fingerprint"]
        if fingerprint is not None and found != fingerprint:
            raise CodeCacheError(
                f"{directory} holds codes of another tokenizer (fingerprint {found[:16]}, "
                f"expected {fingerprint[:16]})"
            )
        return cls(directory, manifest)

    @property
    def fingerprint(self) -> str:
        return self.manifest["tokenizer"]["fingerprint"]

    @property
    def grid(self) -> tuple[int, ...]:
        return tuple(self.manifest["grid"])

    @property
    def num_codebooks(self) -> int:
        return int(self.manifest["num_codebooks"])

    @property
    def codebook_sizes(self) -> tuple[int, ...]:
        return tuple(self.manifest["codebook_sizes"])

    @property
    def code_scales(self) -> list[list[int]] | None:
        """A multi-scale tokenizer's cells per level (None for others and older caches)."""
        return self.manifest.get("code_scales")

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self.manifest["splits"])

    def count(self, split: str) -> int:
        return int(self._split(split)["count"])

    def codes(self, split: str) -> Tensor:
        """LongTensor (N, *grid, Q) of `split`."""
        array = np.load(self.directory / self._split(split)["codes"])
        return torch.from_numpy(array.astype(np.int64))

    def labels(self, split: str) -> Tensor | None:
        """LongTensor (N,) of `split`'s labels, or None when the data has none."""
        name = self._split(split)["labels"]
        if name is None:
            return None
        return torch.from_numpy(np.load(self.directory / name).astype(np.int64))

    def _split(self, split: str) -> dict[str, Any]:
        if split not in self.manifest["splits"]:
            raise KeyError(f"no {split!r} split in {self.directory}; it has {self.splits}")
        return self.manifest["splits"][split]


def read_manifest(directory: Path) -> dict[str, Any] | None:
    """The manifest of `directory`, None when absent; CodeCacheError when unreadable."""
    path = directory / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CodeCacheError(f"unreadable {path}: {error}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CodeCacheError(f"{path} is not a {FORMAT} manifest")
    return manifest


def _completeness_problem(directory: Path, manifest: dict[str, Any]) -> str | None:
    """Why the files do not match the manifest (None when they do); reads headers only."""
    grid, q = tuple(manifest["grid"]), int(manifest["num_codebooks"])
    for split, entry in manifest["splits"].items():
        expected = {entry["codes"]: (entry["count"], *grid, q)}
        if entry["labels"] is not None:
            expected[entry["labels"]] = (entry["count"],)
        for name, shape in expected.items():
            path = directory / name
            if not path.is_file():
                return f"{split} file {name} is missing"
            found = np.load(path, mmap_mode="r").shape
            if tuple(found) != tuple(shape):
                return f"{name} has shape {tuple(found)}, the manifest says {tuple(shape)}"
    return None


def data_key(data_config: dict[str, Any] | None, datamodule: object) -> dict[str, Any]:
    """What identifies the items of the splits: the data config without loader settings
    (or, without a config, the datamodule's class)."""
    if data_config is None:
        cls = type(datamodule)
        return {"_target_": f"{cls.__module__}.{cls.__qualname__}"}
    return {k: v for k, v in sorted(data_config.items()) if k not in LOADER_KEYS}


def reuse_problem(
    directory: Path, fingerprint: str, data: dict[str, Any], splits: Sequence[str]
) -> str | None:
    """None when `directory` already holds these codes, else why it must be (re)written."""
    manifest = read_manifest(directory)
    if manifest is None:
        return "no codes there yet"
    found = manifest["tokenizer"]["fingerprint"]
    if found != fingerprint:
        return (
            f"they are another tokenizer's codes (fingerprint {found[:16]}, this tokenizer "
            f"{fingerprint[:16]}, checkpoint {manifest['tokenizer'].get('ckpt_path')})"
        )
    if manifest.get("data") != data:
        return f"they were made from other data ({manifest.get('data')})"
    missing = [s for s in splits if s not in manifest["splits"]]
    if missing:
        return f"they lack the split(s) {missing}"
    return _completeness_problem(directory, manifest)


def tokenize_splits(
    tokenizer: Any,
    datamodule: Any,
    out_dir: str | Path,
    *,
    ckpt_path: str | Path | None = None,
    data_config: dict[str, Any] | None = None,
    splits: Sequence[str] = SPLITS,
    batch_size: int = 256,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> CodeCache:
    """Encode every item of `splits` with `tokenizer` (a model with the codes API) into
    `out_dir`, or reuse the codes already there when the fingerprint and data match."""
    directory = Path(out_dir).expanduser()
    fingerprint = tokenizer.fingerprint
    data = data_key(data_config, datamodule)
    problem = reuse_problem(directory, fingerprint, data, splits)
    if problem is None:
        log(f"reusing the codes in {directory}: same tokenizer ({fingerprint[:16]}) and data")
        return CodeCache.open(directory, fingerprint)
    _check_writable(directory)
    if (directory / MANIFEST).exists():
        log(f"rewriting the codes in {directory}: {problem}")
    _clear(directory)

    sizes = tuple(int(s) for s in tokenizer.codebook_sizes)
    dtype = smallest_dtype(max(sizes) - 1)
    # tokenizing leaves the global RNG as it found it (each DataLoader iterator draws its base
    # seed from it, audio training crops are drawn from it), so what the run does next, e.g. a
    # prior's weight init, is the same whether the codes were written now or reused
    rng_state = torch.random.get_rng_state()
    datamodule.setup()
    entries: dict[str, dict[str, Any]] = {}
    grid: tuple[int, ...] | None = None
    started = time.perf_counter()
    for split in splits:
        dataset = getattr(datamodule, f"data_{split}", None)
        if dataset is None:
            raise CodeCacheError(f"{type(datamodule).__name__} has no {split} split (data_{split})")
        split_started = time.perf_counter()
        grid = _write_codes(tokenizer, dataset, directory, split, dtype, batch_size, progress)
        labels = split_labels(datamodule, split)
        entry: dict[str, Any] = {"count": len(dataset), "codes": codes_file(split), "labels": None}
        if labels is not None:
            if len(labels) != len(dataset):
                raise CodeCacheError(f"{split}: {len(labels)} labels for {len(dataset)} items")
            label_dtype = smallest_dtype(int(labels.max()) if len(labels) else 0)
            if len(labels) and int(labels.min()) < 0:
                label_dtype = np.dtype(np.int64)
            _save_atomic(directory / labels_file(split), labels.numpy().astype(label_dtype))
            entry["labels"] = labels_file(split)
        entry["seconds"] = round(time.perf_counter() - split_started, 3)
        entries[split] = entry
    torch.random.set_rng_state(rng_state)
    manifest = {
        "format": FORMAT,
        "tokenizer": {
            "ckpt_path": None if ckpt_path is None else str(Path(ckpt_path).resolve()),
            "fingerprint": fingerprint,
            "modality": getattr(tokenizer, "modality", None),
        },
        "data": data,
        "grid": list(grid or ()),
        "num_codebooks": len(sizes),
        "codebook_sizes": list(sizes),
        "code_scales": _code_scales(tokenizer, grid or ()),
        "dtype": dtype.name,
        "splits": entries,
        "seconds": round(time.perf_counter() - started, 3),
    }
    partial = directory / f".{MANIFEST}.partial"
    partial.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(partial, directory / MANIFEST)
    counts = ", ".join(f"{s} {e['count']}" for s, e in entries.items())
    log(
        f"wrote the codes of {counts} items to {directory} ({dtype.name}, grid {list(grid or ())}"
        f", Q={len(sizes)}) in {manifest['seconds']:.2f} s"
    )
    return CodeCache(directory, manifest)


def _code_scales(tokenizer: Any, grid: tuple[int, ...]) -> list[list[int]] | None:
    """The tokenizer's cells per level on `grid` (codes API `code_scales`), else None."""
    code_scales = getattr(tokenizer, "code_scales", None)
    return code_scales(grid) if callable(code_scales) and grid else None


def _check_writable(directory: Path) -> None:
    """Refuse a directory holding files this module did not write (nothing of them is lost)."""
    if not directory.exists():
        directory.mkdir(parents=True)
        return
    if not directory.is_dir():
        raise CodeCacheError(f"out_dir {directory} exists and is not a directory")
    foreign = sorted(p.name for p in directory.iterdir() if not _ours(p.name))
    if foreign:
        raise CodeCacheError(
            f"out_dir {directory} holds files that are not a code cache ({foreign[:5]}); "
            "pass an empty or new directory, or one that tokenize.py wrote"
        )


def _clear(directory: Path) -> None:
    """Remove the manifest first, then every code / label file (complete or partial)."""
    (directory / MANIFEST).unlink(missing_ok=True)
    for path in directory.iterdir():
        if _ours(path.name):
            path.unlink()


def _batches(dataset: Any, batch_size: int) -> Iterable[Tensor]:
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    for batch in loader:
        yield batch[0] if isinstance(batch, list | tuple) else batch


def _write_codes(
    tokenizer: Any,
    dataset: Any,
    directory: Path,
    split: str,
    dtype: np.dtype,
    batch_size: int,
    progress: bool,
) -> tuple[int, ...]:
    """Encode `dataset` in order into <split>_codes.npy (via a partial file); its grid."""
    from tqdm.auto import tqdm

    count = len(dataset)
    partial = directory / f".{codes_file(split)}.partial"
    array = None
    written = 0
    bar = tqdm(total=count, desc=f"tokenizing {split}", unit="item", disable=not progress)
    try:
        for media in _batches(dataset, batch_size):
            codes = tokenizer.encode_codes(media.to(tokenizer.device)).cpu().numpy()
            if array is None:
                shape = (count, *codes.shape[1:])
                array = np.lib.format.open_memmap(partial, mode="w+", dtype=dtype, shape=shape)
            elif codes.shape[1:] != array.shape[1:]:
                raise CodeCacheError(
                    f"{split}: items give code grids {array.shape[1:-1]} and "
                    f"{codes.shape[1:-1]}; the code cache needs items of one size"
                )
            array[written : written + len(codes)] = codes
            written += len(codes)
            bar.update(len(codes))
    finally:
        bar.close()
    if array is None:
        raise CodeCacheError(f"the {split} split is empty")
    array.flush()
    grid = tuple(array.shape[1:-1])
    del array
    os.replace(partial, directory / codes_file(split))
    return grid


def _save_atomic(path: Path, array: np.ndarray) -> None:
    partial = path.with_name(f".{path.name}.partial")
    with partial.open("wb") as file:
        np.save(file, array)
    os.replace(partial, path)


def default_code_dir(ckpt_path: str | Path) -> Path:
    """`<run>/codes` for `<run>/checkpoints/<name>.ckpt`, else `<ckpt dir>/codes`."""
    path = Path(ckpt_path).expanduser().resolve()
    run = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    return run / "codes"


def codes_for_checkpoint(
    ckpt_path: str | Path,
    out_dir: str | Path | None = None,
    *,
    data_config: dict[str, Any] | None = None,
    splits: Sequence[str] = SPLITS,
    batch_size: int = 256,
    map_location: str = "cpu",
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> CodeCache:
    """The codes of a tokenizer checkpoint's data, tokenized once and then reused: what a
    stage-2 prior calls to get its training codes (and `scripts/tokenize.py` runs).

    `data_config` (a datamodule config with `_target_`) defaults to the `data` config stored
    in the checkpoint; `out_dir` to `default_code_dir(ckpt_path)`.
    """
    import hydra

    from src.callbacks.config_in_checkpoint import CONFIG_KEY
    from src.models.load import load_tokenizer, read_checkpoint

    tokenizer = load_tokenizer(ckpt_path, map_location=map_location)
    if data_config is None:
        data_config = read_checkpoint(Path(ckpt_path).expanduser())[CONFIG_KEY]["data"]
    datamodule = hydra.utils.instantiate(data_config)
    return tokenize_splits(
        tokenizer,
        datamodule,
        default_code_dir(ckpt_path) if out_dir is None else out_dir,
        ckpt_path=ckpt_path,
        data_config=dict(data_config),
        splits=splits,
        batch_size=batch_size,
        progress=progress,
        log=log,
    )
