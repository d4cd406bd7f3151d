"""Any quantizer module in the tokenizer: `quantizer=external quantizer.target=package.Class`.

`ExternalQuantizer` imports the class named by `target`, builds it with the remaining keywords
(plus `dim`, the latent width, as for the zoo's own quantizers) and adapts its output to the
framework: the module must return `(quantized, indices[, loss])` in the reference library's
layouts (vector-quantize-pytorch: `quantized` (B, N, dim); `indices` (B, N), (B, N, Q) or
grouped (G, B, N[, q]); `loss` a tensor of any shape, summed). The wrapper returns
`ExternalOutput(quantized, indices (B, N, Q) int64, loss scalar)` and keeps the quantizer
contract (src/quantizers/contract.py): `codebook_size`, `num_codebooks`, `codebook_sizes` and
`decode_indices`, decoded with the module's `get_output_from_indices` or `indices_to_codes`.

The module is probed once when built, on a copy and a dummy (2, 5, dim) input, in training
and eval mode, so an output the framework cannot read fails before training with what was
expected. The probe also records which buffers a training step changes: state learned outside
gradients, which must be synced across ranks (see `set_communicator`).

Like the rest of src/quantizers/ it imports no framework and nothing else from src/: the
target is imported by name, at build time.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import logging
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from src.quantizers.communicator import Communicator, Distributable
from src.quantizers.contract import (
    IndexLayout,
    check_index_range,
    index_layout,
    index_slots,
    slots_to_indices,
)
from src.quantizers.registry import register_quantizer

PROBE_BATCH, PROBE_TOKENS = 2, 5  # different sizes, so (B, N, ...) and (G, B, N, ...) differ
EXPECTED = (
    "expected forward(x) on x of shape (batch, tokens, dim) to return a tuple "
    "(quantized, indices[, loss]): quantized of x's shape, integer indices of shape (B, N), "
    "(B, N, Q) or (G, B, N[, q]), loss a tensor or None"
)
DECODERS = ("get_output_from_indices", "indices_to_codes")


class ExternalOutput(NamedTuple):
    """The wrapped module's output in the framework's terms."""

    quantized: Tensor  # (B, N, dim) contiguous, the module's values
    indices: Tensor  # (B, N, Q) int64: groups first, then depth / heads (`index_slots`)
    loss: Tensor  # float32 scalar: the module's loss summed (0 when it returns none)


class ExternalQuantizerError(ValueError):
    """An external quantizer that cannot be imported, built or read; the message says why."""


@register_quantizer("external")
class ExternalQuantizer(Distributable):
    """Wraps the module `target(dim=dim, **kwargs)`; see the module docstring for the contract.

    `dim` is passed to the target as `dim` (the zoo's keyword, vector-quantize-pytorch's too).
    """

    def __init__(self, target: str, dim: int, **kwargs: Any) -> None:
        super().__init__()
        self.target = target
        self.dim = int(dim)
        self.module = build_target(target, {"dim": self.dim, **kwargs})
        probe = probe_module(self.module, target, self.dim)
        self.layout: IndexLayout = probe.layout
        self.num_codebooks = probe.num_codebooks
        self.codebook_sizes = read_codebook_sizes(self.module, target, probe.num_codebooks)
        self.codebook_size = max(self.codebook_sizes)
        self.state_buffers = probe.state_buffers
        decoders = [name for name in DECODERS if callable(getattr(self.module, name, None))]
        self._decoder_name = decoders[0] if decoders else None
        self._library_hooks: list[tuple[nn.Module, str, Callable]] = []
        check_probe_indices(probe.indices, self.codebook_sizes, target)
        if self._decoder_name is not None:
            check_probe_decoding(self, probe)

    def forward(self, x: Tensor) -> ExternalOutput:
        """x (B, N, dim) -> ExternalOutput with indices (B, N, Q)."""
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(
                f"external quantizer {self.target} takes (batch, tokens, {self.dim}); "
                f"got {tuple(x.shape)}"
            )
        quantized, indices, loss = read_output(self.module(x), x, self.target)
        # contiguous here and in decode_indices: a module that keeps its input's strides (e.g.
        # vector-quantize-pytorch's ResidualVQ on a channel-first map's view) would otherwise
        # hand the decoder another memory layout than decoding does, and convolutions round
        # differently on different layouts (1e-6 gaps between decode_codes and the forward)
        return ExternalOutput(
            quantized.contiguous(), index_slots(indices, self.layout).long(), loss
        )

    def decode_indices(self, indices: Tensor) -> Tensor:
        """(B, N, Q) indices as `forward` returns them -> the quantized (B, N, dim) that
        `forward` returned for them in eval mode, through the module's own decoder."""
        if self._decoder_name is None:
            raise NotImplementedError(
                f"external quantizer {self.target} has neither get_output_from_indices nor "
                "indices_to_codes: its indices cannot be decoded without the encoder"
            )
        if indices.ndim != 3 or indices.shape[-1] != self.num_codebooks:
            raise ValueError(
                f"external quantizer {self.target} decodes indices of shape (batch, tokens, "
                f"{self.num_codebooks}); got {tuple(indices.shape)}"
            )
        for slot, size in enumerate(self.codebook_sizes):
            check_index_range(indices[..., slot], size, f"ExternalQuantizer({self.target})")
        native = slots_to_indices(indices, self.layout)
        return getattr(self.module, self._decoder_name)(native).contiguous()

    def set_communicator(self, communicator: Communicator) -> None:
        """Sync the module's out-of-gradient state over ranks where it exposes a way.

        - Submodules with their own `set_communicator` (the zoo's quantizers, user modules
          built on `Distributable`) receive the communicator from `install_communicator`.
        - vector-quantize-pytorch codebooks decide at construction whether to sync their EMA
          and k-means through torch.distributed (`sync_codebook` defaults to "is a process
          group initialised?"); train.py builds the model before Lightning creates the group,
          so they would not. Their sync hooks (`all_reduce_fn`, `kmeans_all_reduce_fn`,
          `sample_fn`, `replace_sample_fn`) are pointed at this communicator instead: the
          EMA counts and sums and k-means are summed over ranks, and k-means init and dead-code
          revival sample from every rank's vectors (rank 0 draws, all ranks use its draw).
        - Otherwise, buffers that a training step changes cannot be synced: a warning names
          them (Lightning's DDP then overwrites them with rank 0's at every training step).
        """
        super().set_communicator(communicator)
        self._restore_library_hooks()
        if communicator.world_size <= 1:
            return
        self._library_hooks = wire_library_sync(self.module, communicator)
        if self._library_hooks or not self.state_buffers:
            return
        if any(callable(getattr(m, "set_communicator", None)) for m in self.module.modules()):
            return
        warnings.warn(
            f"external quantizer {self.target} changes buffers outside gradients "
            f"({', '.join(self.state_buffers)}) and exposes no way to sync them across ranks "
            "(no set_communicator, no vector-quantize-pytorch codebook hooks): under DDP each "
            "rank updates them from its own batches and Lightning's DDP replaces them with "
            "rank 0's at every training step, so they learn from rank 0's data only",
            stacklevel=2,
        )

    def _restore_library_hooks(self) -> None:
        for owner, name, original in self._library_hooks:
            setattr(owner, name, original)
        self._library_hooks = []

    def extra_repr(self) -> str:
        return (
            f"target={self.target}, dim={self.dim}, num_codebooks={self.num_codebooks}, "
            f"codebook_sizes={self.codebook_sizes}"
        )


def import_target(target: str) -> Callable[..., nn.Module]:
    """The class (or factory) named by a dotted path `package.module.Name`."""
    module_name, _, attribute = str(target).rpartition(".")
    if not module_name:
        raise ExternalQuantizerError(
            f"quantizer.target must be a dotted path such as "
            f"vector_quantize_pytorch.ResidualVQ; got {target!r}"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ExternalQuantizerError(
            f"cannot import {module_name!r} for quantizer.target={target}: {error}. "
            "Install the package that provides it or fix the path"
        ) from error
    found = getattr(module, attribute, None)
    if not callable(found):
        raise ExternalQuantizerError(
            f"module {module_name!r} has no class {attribute!r} (quantizer.target={target})"
        )
    return found


def build_target(target: str, kwargs: dict[str, Any]) -> nn.Module:
    """`target(**kwargs)`; keywords the target does not take, or a constructor that fails,
    raise an error naming the target and the `quantizer.<key>` to change."""
    factory = import_target(target)
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # builtins without a signature: let the call decide
        signature = None
    if signature is not None:
        params = signature.parameters
        takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
        unknown = sorted(k for k in kwargs if k not in params and not takes_any)
        if unknown:
            fixes = " ".join(f"~quantizer.{k}" for k in unknown)
            raise ExternalQuantizerError(
                f"{target} does not take the keyword(s) {', '.join(unknown)} (from quantizer."
                f"<key>); remove them with `{fixes}`. It takes: {', '.join(params)}"
            )
        missing = [
            name
            for name, p in params.items()
            if p.default is p.empty
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            and name not in kwargs
        ]
        if missing:
            sets = " ".join(f"quantizer.{k}=..." for k in missing)
            raise ExternalQuantizerError(f"{target} needs {', '.join(missing)}: set `{sets}`")
    try:
        module = factory(**kwargs)
    except Exception as error:
        raise ExternalQuantizerError(
            f"building {target}({_keywords(kwargs)}) failed: {type(error).__name__}: {error}"
        ) from error
    if not isinstance(module, nn.Module):
        raise ExternalQuantizerError(
            f"{target}(...) returned {type(module).__name__}, not a torch.nn.Module"
        )
    return module


def _keywords(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


def read_output(output: Any, x: Tensor, target: str) -> tuple[Tensor, Tensor, Tensor]:
    """(quantized, indices in the module's layout, loss as a float32 scalar) from what the
    module returned for x, or an error saying what was expected."""
    if not isinstance(output, tuple) or len(output) not in (2, 3):
        got = type(output).__name__
        if isinstance(output, tuple):
            got = f"a tuple of {len(output)}"
        raise ExternalQuantizerError(f"{target} returned {got}; {EXPECTED}")
    quantized, indices = output[0], output[1]
    loss = output[2] if len(output) == 3 else None
    if not isinstance(quantized, Tensor) or quantized.shape != x.shape:
        got = tuple(quantized.shape) if isinstance(quantized, Tensor) else type(quantized).__name__
        raise ExternalQuantizerError(
            f"{target} returned quantized {got} for input {tuple(x.shape)}; {EXPECTED}"
        )
    if not quantized.is_floating_point():
        raise ExternalQuantizerError(f"{target} returned {quantized.dtype} quantized; {EXPECTED}")
    if not isinstance(indices, Tensor) or indices.is_floating_point() or indices.is_complex():
        got = indices.dtype if isinstance(indices, Tensor) else type(indices).__name__
        raise ExternalQuantizerError(f"{target} returned indices {got}; {EXPECTED}")
    if loss is None:
        loss = x.new_zeros((), dtype=torch.float32)
    elif isinstance(loss, Tensor) and loss.is_floating_point():
        loss = loss.float().sum()
    else:
        raise ExternalQuantizerError(
            f"{target} returned a loss of type {type(loss).__name__}; {EXPECTED}"
        )
    return quantized, indices, loss


class Probe(NamedTuple):
    """What one probe of a module showed."""

    quantized: Tensor  # eval mode
    indices: Tensor  # eval mode, (B, N, Q)
    layout: IndexLayout
    num_codebooks: int
    state_buffers: tuple[str, ...]  # buffers a training-mode forward changed
    copy: nn.Module  # the probed copy, in eval mode


@contextmanager
def _quiet(target: str) -> Iterator[None]:
    """No warnings or log records from forwards on a dummy input (vector-quantize-pytorch logs
    "k-means init received 10 vectors" through loguru); the global RNG is left as it was."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    loguru = sys.modules.get("loguru")  # imported by the target's package, if it uses it
    package = target.split(".")[0]
    if loguru is not None:
        loguru.logger.disable(package)
    try:
        with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)
        if loguru is not None:
            loguru.logger.enable(package)


def probe_module(module: nn.Module, target: str, dim: int) -> Probe:
    """Run a copy of `module` once in training and once in eval mode on a (2, 5, dim) input;
    fail with what was expected if its output cannot be read."""
    x = torch.randn(PROBE_BATCH, PROBE_TOKENS, dim, generator=torch.Generator().manual_seed(0))
    reference = next(iter(module.parameters()), next(iter(module.buffers()), None))
    if reference is not None:
        x = x.to(reference.device)
    try:
        twin = copy.deepcopy(module)
        before = {name: b.detach().clone() for name, b in twin.named_buffers()}
        with _quiet(target), torch.no_grad():
            read_output(twin.train()(x), x, target)
            twin.eval()
            quantized, indices, _ = read_output(twin(x), x, target)
            layout = index_layout(twin, dim)
    except ExternalQuantizerError:
        raise
    except Exception as error:
        raise ExternalQuantizerError(
            f"{target} failed on a probe input of shape {tuple(x.shape)}: "
            f"{type(error).__name__}: {error}; {EXPECTED}"
        ) from error
    changed = tuple(
        name
        for name, buffer in twin.named_buffers()
        if name in before
        and before[name].shape == buffer.shape
        and not torch.equal(before[name], buffer)
    )
    slots = index_slots(indices, layout)
    return Probe(quantized, slots, layout, int(slots.shape[-1]), changed, twin)


def read_codebook_sizes(module: nn.Module, target: str, num_codebooks: int) -> tuple[int, ...]:
    """The codebook size of each of the Q slots, read from the module: `codebook_sizes` or
    `codebook_size` (an int or one per layer), else the one `codebook_size` its submodules
    share (e.g. vector-quantize-pytorch's GroupedResidualVQ). Per-layer sizes repeat per group.
    """
    sizes = getattr(module, "codebook_sizes", None)
    if sizes is None:
        sizes = getattr(module, "codebook_size", None)
    if sizes is None:
        found = {
            _as_int(m.codebook_size)
            for m in module.modules()
            if _as_int(getattr(m, "codebook_size", None)) is not None
        }
        if len(found) != 1:
            raise ExternalQuantizerError(
                f"cannot read the codebook size of {target}: it has no codebook_size or "
                f"codebook_sizes attribute and its submodules report {sorted(found) or 'none'}"
            )
        sizes = found.pop()
    if _as_int(sizes) is not None:
        return (_as_int(sizes),) * num_codebooks
    sizes = tuple(_as_int(s) for s in sizes)
    if None in sizes or not sizes or num_codebooks % len(sizes):
        raise ExternalQuantizerError(
            f"cannot match {target}'s codebook sizes {sizes} to its {num_codebooks} codes per "
            "token position"
        )
    return sizes * (num_codebooks // len(sizes))


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_floating_point():
        return int(value)
    return None


def check_probe_indices(indices: Tensor, sizes: tuple[int, ...], target: str) -> None:
    """The probe's indices must lie in the codebook sizes read from the module."""
    limits = torch.tensor(sizes, device=indices.device)
    if bool(((indices < 0) | (indices >= limits)).any()):
        raise ExternalQuantizerError(
            f"{target} returned indices in [{int(indices.min())}, {int(indices.max())}] for "
            f"codebook sizes {sizes} read from the module; expected every index of slot i in "
            "[0, codebook_sizes[i])"
        )


def check_probe_decoding(wrapper: ExternalQuantizer, probe: Probe) -> None:
    """Warn when the module's decoder does not give back what its forward returned (the codes
    API's decode_codes would then differ from the tokenizer's reconstruction)."""
    decoder = getattr(probe.copy, wrapper._decoder_name)
    try:
        with _quiet(wrapper.target), torch.no_grad():
            decoded = decoder(slots_to_indices(probe.indices, wrapper.layout))
    except Exception as error:
        warnings.warn(
            f"external quantizer {wrapper.target}: {wrapper._decoder_name} failed on the "
            f"indices its forward returned ({type(error).__name__}: {error}); decode_indices "
            "and the codes API will not work",
            stacklevel=3,
        )
        return
    if not isinstance(decoded, Tensor) or decoded.shape != probe.quantized.shape:
        got = tuple(decoded.shape) if isinstance(decoded, Tensor) else type(decoded).__name__
        warnings.warn(
            f"external quantizer {wrapper.target}: {wrapper._decoder_name} returned {got}, "
            f"not the quantized shape {tuple(probe.quantized.shape)}",
            stacklevel=3,
        )
    elif not torch.allclose(decoded.float(), probe.quantized.float(), atol=1e-5, rtol=1e-4):
        gap = (decoded.float() - probe.quantized.float()).abs().max().item()
        warnings.warn(
            f"external quantizer {wrapper.target}: {wrapper._decoder_name} differs from the "
            f"forward's quantized output by up to {gap:.3g}; decoded codes will not reproduce "
            "the tokenizer's reconstructions",
            stacklevel=3,
        )


# vector-quantize-pytorch's codebooks (EuclideanCodebook, CosineSimCodebook) carry these
# attributes, chosen at construction from `use_ddp`; version 1.32.0 is the one tested.
_LIBRARY_REDUCE_HOOKS = ("all_reduce_fn", "kmeans_all_reduce_fn")
_LIBRARY_SAMPLE_HOOKS = ("sample_fn", "replace_sample_fn")


def wire_library_sync(module: nn.Module, communicator: Communicator) -> list:
    """Point vector-quantize-pytorch codebooks built without a process group at
    `communicator`; returns (owner, attribute, original) for every hook replaced."""
    replaced: list[tuple[nn.Module, str, Callable]] = []
    for sub in module.modules():
        hooks = (*_LIBRARY_REDUCE_HOOKS, *_LIBRARY_SAMPLE_HOOKS)
        if getattr(sub, "use_ddp", None) is not False:
            continue  # not such a codebook, or it syncs through torch.distributed itself
        if not all(callable(getattr(sub, name, None)) for name in hooks):
            continue
        for name in _LIBRARY_REDUCE_HOOKS:
            replaced.append((sub, name, getattr(sub, name)))
            setattr(sub, name, InPlaceSum(communicator))
        for name in _LIBRARY_SAMPLE_HOOKS:
            original = getattr(sub, name)
            replaced.append((sub, name, original))
            setattr(sub, name, SampleFromAllRanks(original, communicator))
    return replaced


class InPlaceSum:
    """torch.distributed.all_reduce's in-place signature over a `Communicator` (sum)."""

    def __init__(self, communicator: Communicator) -> None:
        self.communicator = communicator

    def __call__(self, tensor: Tensor) -> Tensor:
        return tensor.copy_(self.communicator.all_reduce(tensor, "sum"))


class SampleFromAllRanks:
    """A library sampler `(samples (h, n, d), num) -> (h, num, d)` run on every rank's samples
    (gathered when every rank holds as many, else this rank's); rank 0's draw is broadcast."""

    def __init__(self, sample: Callable[[Tensor, int], Tensor], communicator: Communicator):
        self.sample = sample
        self.communicator = communicator

    def __call__(self, samples: Tensor, num: int) -> Tensor:
        comm = self.communicator
        count = torch.tensor([samples.shape[1]], device=samples.device)
        if bool((comm.all_gather(count) == count).all()):
            gathered = comm.all_gather(samples.contiguous())  # (ranks, h, n, d)
            samples = gathered.movedim(0, 1).flatten(1, 2)  # rank 0's vectors first
        return comm.broadcast(self.sample(samples, num).contiguous(), src=0)
