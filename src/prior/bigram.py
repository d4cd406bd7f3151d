"""The class-conditional bigram baseline: the yardstick a trained prior must beat.

Counted on the training sequences of a :class:`~src.prior.layouts.FlattenLayout` (class prefix
included), it predicts each token from the previous token and the sequence's class ``k`` (the
prefix: a label, or the null token of unconditional data). Smoothing is Dirichlet with a
class-conditional unigram as base measure (MacKay & Peto 1995), renormalised over the code slot
that the step allows:

    P(x | k, prev, t) = (n(k, prev, x) + beta * u(x | k, slot_t)) / (n(k, prev) + beta)
    u(x | k, slot)    = (n_k(x) + 1) / (N_k,slot + |slot|)          (add-one unigram of the slot)

``n`` counts training transitions, ``n_k(x)`` counts code ``x`` in sequences of class ``k``,
``N_k,slot`` all codes of that slot there. With ``beta -> 0`` seen transitions get their
maximum-likelihood frequency; with ``beta -> inf`` the model is the class's unigram.
:func:`select_beta` picks ``beta`` by k-fold cross-validation on the training sequences alone,
so the yardstick is as strong as a bigram gets without looking at the validation data.
Counts are sparse (sorted keys), so large vocabularies cost memory only for what was seen.
"""

from __future__ import annotations

import torch
from torch import Tensor

from src.prior.layouts import FlattenLayout

__all__ = ["DEFAULT_BETAS", "ClassBigram", "select_beta"]

#: the smoothing strengths :func:`select_beta` tries by default (log-spaced)
DEFAULT_BETAS = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0)


def _lookup(keys: Tensor, values: Tensor, query: Tensor) -> Tensor:
    """``values`` at ``query`` in the sorted unique ``keys``; 0 where a query is absent."""
    if keys.numel() == 0:
        return torch.zeros(query.shape, dtype=values.dtype)
    index = torch.searchsorted(keys, query).clamp_(max=keys.numel() - 1)
    return torch.where(keys[index] == query, values[index], torch.zeros((), dtype=values.dtype))


class ClassBigram:
    """Bigram counts per class over flatten sequences; :meth:`log_prob`, :meth:`nll`,
    :meth:`sample`. Build it with :meth:`fit`."""

    def __init__(self, layout: FlattenLayout, beta: float = 1.0) -> None:
        if not isinstance(layout, FlattenLayout):
            raise TypeError(
                f"the bigram baseline counts flatten sequences, got the {layout.name!r} layout: "
                "build it on make_layout('flatten', ...) with the prior's sizes and grid"
            )
        if beta <= 0:
            raise ValueError(f"beta (Dirichlet smoothing strength) must be > 0, got {beta}")
        vocab, contexts = layout.vocab_size, layout.num_classes + 1
        if contexts * vocab * vocab >= 2**62:
            raise ValueError(
                f"vocabulary {vocab} too large for bigram keys: split codes with max_factor_bits"
            )
        self.layout, self.beta = layout, float(beta)
        self.pair_keys = torch.zeros(0, dtype=torch.long)  # sorted (k * V + prev) * V + x
        self.pair_counts = torch.zeros(0, dtype=torch.float64)
        self.context_keys = torch.zeros(0, dtype=torch.long)  # sorted k * V + prev
        self.context_counts = torch.zeros(0, dtype=torch.float64)
        self.unigram = torch.zeros(contexts, layout.code_vocab_size, dtype=torch.float64)

    @classmethod
    def fit(cls, layout: FlattenLayout, tokens: Tensor, beta: float = 1.0) -> ClassBigram:
        """Count the full training sequences ``tokens`` ``(N, L)`` of ``layout``."""
        model = cls(layout, beta)
        layout.check_tokens(tokens)
        if tokens.shape[0] == 0:
            raise ValueError("the bigram needs at least one training sequence, got none")
        tokens = tokens.long().cpu()
        vocab = layout.vocab_size
        k = (tokens[:, :1] - layout.code_vocab_size).expand(-1, tokens.shape[1] - 1)
        context = k * vocab + tokens[:, :-1]
        keys, counts = torch.unique(context * vocab + tokens[:, 1:], return_counts=True)
        model.pair_keys, model.pair_counts = keys, counts.double()
        keys, counts = torch.unique(context, return_counts=True)
        model.context_keys, model.context_counts = keys, counts.double()
        model.unigram.index_put_(
            (k.reshape(-1), tokens[:, 1:].reshape(-1)),
            torch.ones(k.numel(), dtype=torch.float64),
            accumulate=True,
        )
        return model

    def _check_fitted(self) -> None:
        if self.pair_keys.numel() == 0:
            raise RuntimeError("this ClassBigram counted nothing: build it with ClassBigram.fit")

    def _slots(self) -> tuple[Tensor, Tensor]:
        """Per target step 1..L-1: start and stop of its allowed id range."""
        slices = [self.layout.allowed_slices(t)[0] for t in range(1, self.layout.seq_len)]
        return torch.tensor([s.start for s in slices]), torch.tensor([s.stop for s in slices])

    def _base(self, k: Tensor, x: Tensor, start: Tensor, stop: Tensor) -> Tensor:
        """``u(x | k, slot)`` for broadcastable ``k, x`` and their slot's ``[start, stop)``."""
        cumulative = torch.nn.functional.pad(self.unigram.cumsum(dim=1), (1, 0))
        slot_total = cumulative[k, stop] - cumulative[k, start]
        return (self.unigram[k, x] + 1) / (slot_total + (stop - start))

    def log_prob(self, tokens: Tensor) -> Tensor:
        """``(N, L-1)`` float64 log-probabilities of the targets ``tokens[:, 1:]`` (nats)."""
        self._check_fitted()
        self.layout.check_tokens(tokens)
        tokens = tokens.long().cpu()
        vocab = self.layout.vocab_size
        k = (tokens[:, :1] - self.layout.code_vocab_size).expand(-1, tokens.shape[1] - 1)
        context = k * vocab + tokens[:, :-1]
        x = tokens[:, 1:]
        pair = _lookup(self.pair_keys, self.pair_counts, context * vocab + x)
        total = _lookup(self.context_keys, self.context_counts, context)
        start, stop = self._slots()
        base = self._base(k, x, start, stop)
        return torch.log(pair + self.beta * base) - torch.log(total + self.beta)

    def nll(self, tokens: Tensor) -> float:
        """Mean negative log-likelihood of the targets of ``tokens``, nats per token."""
        return float(-self.log_prob(tokens).mean())

    def sample(
        self,
        labels: Tensor | None,
        num_samples: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Draw full sequences ``(B, L)``: one per label (``-1`` = null class), or
        ``num_samples`` unconditional ones (``labels=None``); seeded by ``generator`` (CPU)."""
        self._check_fitted()
        batch = len(labels) if labels is not None else num_samples
        if batch is None:
            raise ValueError("pass labels, or num_samples for an unconditional layout")
        layout, vocab = self.layout, self.layout.vocab_size
        tokens = torch.empty(batch, layout.seq_len, dtype=torch.long)
        tokens[:, 0] = layout.prefix_tokens(labels, batch).cpu()
        k = tokens[:, 0] - layout.code_vocab_size
        # exclusive prefix sums of the sorted pair counts: a context's row is a contiguous run
        cumulative = torch.nn.functional.pad(self.pair_counts.cumsum(0), (1, 0))
        start, stop = self._slots()
        for step in range(1, layout.seq_len):
            context = k * vocab + tokens[:, step - 1]
            total = _lookup(self.context_keys, self.context_counts, context)
            draw = torch.rand(batch, generator=generator, dtype=torch.float64)
            draw = draw * (total + self.beta)
            from_pairs = draw < total
            # seen transitions: the pair whose cumulative count passes the draw
            first = torch.searchsorted(self.pair_keys, context * vocab)
            index = torch.searchsorted(cumulative[1:], cumulative[first] + draw, right=True)
            seen = self.pair_keys[index.clamp(max=len(self.pair_keys) - 1)] % vocab
            # otherwise the class's add-one unigram of this step's slot
            lo, hi = int(start[step - 1]), int(stop[step - 1])
            weights = self.unigram[k, lo:hi] + 1
            fallback = lo + torch.multinomial(weights, 1, generator=generator).squeeze(1)
            tokens[:, step] = torch.where(from_pairs, seen, fallback)
        return tokens


def select_beta(
    layout: FlattenLayout,
    tokens: Tensor,
    betas: tuple[float, ...] = DEFAULT_BETAS,
    folds: int = 5,
    seed: int = 0,
) -> float:
    """The ``beta`` of ``betas`` with the lowest ``folds``-fold cross-validated NLL on the
    training sequences ``tokens`` (a seeded random partition; ties go to the first)."""
    if folds < 2 or tokens.shape[0] < folds:
        raise ValueError(
            f"need folds >= 2 and at least `folds` sequences, got {folds} folds "
            f"for {tokens.shape[0]} sequences"
        )
    order = torch.randperm(tokens.shape[0], generator=torch.Generator().manual_seed(seed))
    totals = torch.zeros(len(betas), dtype=torch.float64)
    for held in order.chunk(folds):
        rest = torch.ones(tokens.shape[0], dtype=torch.bool)
        rest[held] = False
        model = ClassBigram.fit(layout, tokens[rest])  # counts do not depend on beta
        for i, beta in enumerate(betas):
            model.beta = float(beta)
            totals[i] -= model.log_prob(tokens[held]).sum()
    return float(betas[int(totals.argmin())])
