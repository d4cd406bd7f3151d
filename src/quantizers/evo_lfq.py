"""EvoLFQ: an LFQ autoencoder whose binary codes can be searched by a genetic algorithm.

The reference library's `EvoLFQ` (1.32.0) wraps `encoder -> LFQ -> decoder`; `forward`
returns `(reconstructed, indices, entropy_aux_loss)`. Its codes are bit strings, so besides
gradient training one can evolve a population of codes against any fitness of their decodings
(`evolve`: tournament selection, uniform crossover, bit-flip mutation, elitism).

Here `encoder` and `decoder` default to the identity (the reference requires them), so
`EvoLFQ(dim=..., codebook_size=...)` is an LFQ bottleneck registered as `evo_lfq`: the
output's `quantized` is the decoder's output, and `decode_indices` decodes indices through
LFQ's codes and the decoder. The LFQ keeps its own float32 statistics and -1 indices for
non-finite tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from src.quantizers.contract import QuantizerContract, check_index_range
from src.quantizers.float_input import check_float_input
from src.quantizers.lfq import LFQ
from src.quantizers.registry import register_quantizer


class EvoLFQOutput(NamedTuple):
    """The reference's `Return` tuple; `quantized` aliases `reconstructed` for the framework."""

    reconstructed: Tensor
    indices: Tensor
    entropy_aux_loss: Tensor

    @property
    def quantized(self) -> Tensor:
        return self.reconstructed


class EvolutionResult(NamedTuple):
    """One generation of `EvoLFQ.evolve`."""

    pop_bits: Tensor
    best_gene: Tensor | None
    best_fitness: float
    best_decoded: Tensor | None


class _Eval:
    """Context manager: the module in eval mode inside, its previous mode restored after."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.was_training = module.training

    def __enter__(self) -> None:
        self.module.eval()

    def __exit__(self, *exc: object) -> None:
        self.module.train(self.was_training)


@register_quantizer("evo_lfq")
class EvoLFQ(nn.Module, QuantizerContract):
    """`encoder -> LFQ -> decoder` with the genetic-algorithm helpers of the reference.

    Pass an `lfq`, or `dim` / `codebook_size` / `num_codebooks` and further LFQ keywords.
    A 2-D latent `(batch, dim)` is quantized as one token per sample.
    """

    def __init__(
        self,
        encoder: nn.Module | None = None,
        decoder: nn.Module | None = None,
        lfq: LFQ | None = None,
        *,
        dim: int | None = None,
        codebook_size: int | None = None,
        num_codebooks: int = 1,
        pop_size: int = 64,
        mutation_rate: float = 0.02,
        tournament_size: int = 2,
        elitism_count: int = 1,
        generations: int = 50,
        **lfq_kwargs: Any,
    ) -> None:
        super().__init__()
        if pop_size <= elitism_count:
            raise ValueError(f"pop_size ({pop_size}) must exceed elitism_count ({elitism_count})")
        if lfq is None:
            if dim is None and codebook_size is None:
                raise ValueError("EvoLFQ needs an `lfq`, or `dim` / `codebook_size` for one")
            lfq = LFQ(
                dim=dim, codebook_size=codebook_size, num_codebooks=num_codebooks, **lfq_kwargs
            )
        self.encoder = nn.Identity() if encoder is None else encoder
        self.decoder = nn.Identity() if decoder is None else decoder
        self.lfq = lfq
        self.pop_size = pop_size
        self.mutation_rate = mutation_rate
        self.tournament_size = tournament_size
        self.elitism_count = elitism_count
        self.generations = generations
        self.register_buffer("zero", torch.tensor(0.0), persistent=False)

    @property
    def codebook_size(self) -> int:  # type: ignore[override]
        return self.lfq.codebook_size

    @property
    def num_codebooks(self) -> int:  # type: ignore[override]
        return self.lfq.num_codebooks

    @property
    def device(self) -> torch.device:
        return self.zero.device

    # -- autoencoder --------------------------------------------------------------------------

    def forward(self, x: Tensor, **kwargs: Any) -> EvoLFQOutput:
        check_float_input(x, "EvoLFQ")
        latents = self.encoder(x)
        flat = latents.ndim == 2
        quantized, indices, loss = self.lfq(latents.unsqueeze(1) if flat else latents, **kwargs)
        if flat:
            quantized, indices = quantized.squeeze(1), indices.squeeze(1)
        return EvoLFQOutput(self.decoder(quantized), indices, loss)

    def decode_indices(self, indices: Tensor) -> Tensor:
        """Indices as `forward` returned them -> the decoder's output (the eval forward's)."""
        check_index_range(indices, self.codebook_size, self, allow_masked=True)
        return self.decoder(self.lfq.decode_indices(indices))

    @torch.no_grad()
    def encode(self, x: Tensor, return_signs: bool = False) -> Tensor:
        """The code bits of `x`: 0/1 floats, or -1/+1 with `return_signs`."""
        with _Eval(self):
            latents = self.encoder(x)
            flat = latents.ndim == 2
            indices = self.lfq(latents.unsqueeze(1) if flat else latents).indices
            if flat:
                indices = indices.squeeze(1)
        if not self.lfq.keep_num_codebooks_dim:
            indices = indices.unsqueeze(-1)
        # the bits of the codes, most significant first (the reference reads the signs of
        # the projected output instead, which are not the code bits when dim != code width)
        width = self.lfq.codebook_dim
        weights = 2 ** torch.arange(width - 1, -1, -1, device=indices.device)
        positive = ((indices.unsqueeze(-1) & weights) != 0).flatten(-2)
        return torch.where(positive, 1.0, -1.0) if return_signs else positive.float()

    @torch.no_grad()
    def decode_bits(self, bits: Tensor) -> Tensor:
        """Bits (..., codebook_dim * num_codebooks), 0/1 or -1/+1 -> decoded data."""
        with _Eval(self):
            books, width = self.lfq.num_codebooks, self.lfq.codebook_dim
            positive = bits > 0
            lead = positive.shape[:-1]
            positive = positive.reshape(-1, books, width)
            weights = 2 ** torch.arange(width - 1, -1, -1, device=bits.device)  # MSB first
            indices = (positive.long() * weights).sum(-1)  # (tokens, books)
            if not self.lfq.keep_num_codebooks_dim:
                indices = indices.squeeze(-1)
            codes = self.lfq.indices_to_codes(indices.unsqueeze(0)).squeeze(0)
            return self.decoder(codes.reshape(*lead, codes.shape[-1]))

    # -- genetic algorithm --------------------------------------------------------------------

    def init_random_population(
        self,
        pop_size: int | None = None,
        shape: tuple[int, ...] | None = None,
        device: torch.device | None = None,
        is_sign: bool = False,
    ) -> Tensor:
        """`pop_size` random bit strings of `shape` (0/1, or -1/+1 with `is_sign`)."""
        if shape is None:
            raise ValueError("init_random_population needs the shape of one gene")
        pop_size = self.pop_size if pop_size is None else pop_size
        device = self.device if device is None else device
        bits = torch.randint(0, 2, (pop_size, *shape), device=device).float()
        return bits * 2 - 1 if is_sign else bits

    def init_population_from_data(
        self,
        x: Tensor,
        pop_size: int | None = None,
        mutation_rate: float | None = None,
        is_sign: bool = False,
    ) -> Tensor:
        """A population of the codes of `x` (repeated to `pop_size`), mutated."""
        pop_size = self.pop_size if pop_size is None else pop_size
        rate = self.mutation_rate if mutation_rate is None else mutation_rate
        bits = self.encode(x, return_signs=is_sign)
        repeats = -(-pop_size // bits.shape[0])
        bits = bits.repeat(repeats, *([1] * (bits.ndim - 1)))[:pop_size]
        return self.mutate(bits, rate, is_sign) if rate > 0 else bits

    def uniform_crossover(self, parent1: Tensor, parent2: Tensor) -> Tensor:
        """Each bit from either parent with probability 1/2."""
        return torch.where(torch.rand_like(parent1.float()) < 0.5, parent1, parent2)

    def mutate(
        self, population: Tensor, mutation_rate: float | None = None, is_sign: bool = False
    ) -> Tensor:
        """Flip each bit with probability `mutation_rate`."""
        rate = self.mutation_rate if mutation_rate is None else mutation_rate
        flip = torch.rand_like(population.float()) < rate
        return torch.where(flip, -population if is_sign else 1.0 - population, population)

    def tournament_selection(
        self, population: Tensor, fitnesses: Tensor, tournament_size: int | None = None
    ) -> Tensor:
        """`len(population)` winners of random tournaments of `tournament_size`."""
        size = self.tournament_size if tournament_size is None else tournament_size
        count = population.shape[0]
        contenders = torch.randint(0, count, (count, size), device=population.device)
        best = fitnesses[contenders].argmax(-1, keepdim=True)
        return population[contenders.gather(1, best).squeeze(1)]

    @torch.no_grad()
    def step(
        self,
        pop_bits: Tensor,
        fitness_fn: Callable[[Tensor, Tensor], Any],
        tournament_size: int | None = None,
        mutation_rate: float | None = None,
        elitism_count: int | None = None,
        is_sign: bool = False,
        batch_size: int | None = None,
    ) -> tuple[Tensor, Tensor]:
        """One generation: (next population, fitness of the current one)."""
        size = self.tournament_size if tournament_size is None else tournament_size
        rate = self.mutation_rate if mutation_rate is None else mutation_rate
        elites_n = self.elitism_count if elitism_count is None else elitism_count
        count = pop_bits.shape[0]
        chunks = pop_bits.split(batch_size) if batch_size else (pop_bits,)
        decoded = torch.cat([self.decode_bits(chunk) for chunk in chunks])
        fitness = fitness_fn(decoded, pop_bits)
        fitness = torch.as_tensor(fitness, dtype=torch.float32, device=pop_bits.device)
        elites = pop_bits[fitness.argsort(descending=True)[:elites_n]].clone()
        children = count - elites_n
        contenders = torch.randint(0, count, (children, 2, size), device=pop_bits.device)
        winners = contenders.gather(-1, fitness[contenders].argmax(-1, keepdim=True))
        parents = pop_bits[winners.squeeze(-1)]  # (children, 2, ...)
        offspring = self.uniform_crossover(parents[:, 0], parents[:, 1])
        offspring = self.mutate(offspring, rate, is_sign)
        return torch.cat([elites, offspring]), fitness

    @torch.no_grad()
    def evolve(
        self,
        fitness_fn: Callable[[Tensor, Tensor], Any],
        pop_bits: Tensor | None = None,
        pop_size: int | None = None,
        shape: tuple[int, ...] | None = None,
        generations: int | None = None,
        is_sign: bool = False,
        return_best_decoded: bool = False,
        **step_kwargs: Any,
    ) -> Iterator[EvolutionResult]:
        """Yield an `EvolutionResult` per generation (the best gene seen so far)."""
        if pop_bits is None:
            if shape is None:
                raise ValueError("evolve needs `pop_bits` or the `shape` of one gene")
            pop_bits = self.init_random_population(pop_size, shape, is_sign=is_sign)
        best_fitness, best_gene = float("-inf"), None
        for _ in range(self.generations if generations is None else generations):
            scored = pop_bits
            pop_bits, fitness = self.step(pop_bits, fitness_fn, is_sign=is_sign, **step_kwargs)
            top = int(fitness.argmax())
            if float(fitness[top]) > best_fitness:
                best_fitness = float(fitness[top])
                # the gene that scored it (the reference reads the best score's position in
                # the next population, which holds another gene)
                best_gene = scored[top].clone()
            decoded = None
            if return_best_decoded and best_gene is not None:
                decoded = self.decode_bits(best_gene.unsqueeze(0)).squeeze(0)
            yield EvolutionResult(pop_bits, best_gene, best_fitness, decoded)
