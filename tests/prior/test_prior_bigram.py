"""The class-conditional bigram baseline: log-probabilities against a brute-force count with
dicts, normalisation over each slot, sampled transition frequencies, seeding and errors."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from src.prior import DelayLayout, FlattenLayout
from src.prior.bigram import ClassBigram, select_beta


def _toy_corpus(layout: FlattenLayout, n: int, seed: int) -> torch.Tensor:
    """Sequences with structure: class c uses codes c and c + 1 (mod the slot size)."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, layout.num_classes, (n,), generator=gen)
    near = labels.view(-1, *([1] * len(layout.grid)))
    columns = [
        (near + torch.randint(0, 2, (n, *layout.grid), generator=gen)) % size
        for size in layout.codebook_sizes
    ]
    return layout.encode(torch.stack(columns, dim=-1), labels)


def _brute_force_log_probs(train: list[list[int]], test: list[list[int]], layout, beta):
    """The documented formula with Python dicts and loops."""
    base = layout.code_vocab_size
    pairs, contexts, unigram = Counter(), Counter(), Counter()
    for seq in train:
        k = seq[0] - base
        for t in range(1, len(seq)):
            pairs[(k, seq[t - 1], seq[t])] += 1
            contexts[(k, seq[t - 1])] += 1
            unigram[(k, seq[t])] += 1
    out = []
    for seq in test:
        k, row = seq[0] - base, []
        for t in range(1, len(seq)):
            allowed = layout.allowed_slices(t)[0]
            slot_total = sum(unigram[(k, x)] for x in range(allowed.start, allowed.stop))
            u = (unigram[(k, seq[t])] + 1) / (slot_total + allowed.stop - allowed.start)
            p = (pairs[(k, seq[t - 1], seq[t])] + beta * u) / (contexts[(k, seq[t - 1])] + beta)
            row.append(math.log(p))
        out.append(row)
    return out


@pytest.mark.parametrize(("sizes", "beta"), [([6], 1.0), ([4, 3], 0.3), ([5, 2, 3], 2.5)])
def test_log_probs_equal_a_brute_force_count(sizes, beta) -> None:
    layout = FlattenLayout(sizes, (2, 2), num_classes=3)
    corpus = _toy_corpus(layout, 80, seed=0)
    # class 2 is never seen in training: its sequences fall back on the add-one unigram
    train = corpus[corpus[:, 0] != layout.class_token(2)]
    test = torch.cat([_toy_corpus(layout, 20, seed=1), train[:3]])
    assert (test[:, 0] == layout.class_token(2)).any()
    model = ClassBigram.fit(layout, train, beta)
    expected = torch.tensor(
        _brute_force_log_probs(train.tolist(), test.tolist(), layout, beta), dtype=torch.float64
    )
    got = model.log_prob(test)
    assert torch.allclose(got, expected, rtol=1e-12, atol=1e-12)
    assert model.nll(test) == pytest.approx(-float(expected.mean()), rel=1e-12)


def test_probabilities_sum_to_one_over_each_slot() -> None:
    layout = FlattenLayout([4, 3], (2,), num_classes=2)
    model = ClassBigram.fit(layout, _toy_corpus(layout, 40, seed=2), beta=0.5)
    base = layout.encode(torch.zeros(1, 2, 2, dtype=torch.long), torch.tensor([1]))
    for step in range(1, layout.seq_len):
        allowed = layout.allowed_slices(step)[0]
        candidates = base.repeat(allowed.stop - allowed.start, 1)
        candidates[:, step] = torch.arange(allowed.start, allowed.stop)
        probs = model.log_prob(candidates)[:, step - 1].exp()
        assert float(probs.sum()) == pytest.approx(1.0, abs=1e-12), step


def test_samples_follow_the_counted_transitions() -> None:
    """Empirical transition frequencies of 20000 samples against the model's probabilities:
    every (class, prev, next) cell within 5 binomial standard deviations (+1e-3)."""
    layout = FlattenLayout([5, 3], (3,), num_classes=2)
    # few training sequences and a large beta: the unigram fallback carries much of the mass
    model = ClassBigram.fit(layout, _toy_corpus(layout, 8, seed=3), beta=3.0)
    labels = torch.arange(20000) % 2
    samples = model.sample(labels, generator=torch.Generator().manual_seed(0))
    assert torch.equal(layout.labels_of(samples), labels)
    layout.check_tokens(samples)  # every token in its step's slot
    for step in range(1, layout.seq_len):
        allowed = layout.allowed_slices(step)[0]
        for k in range(2):
            rows = samples[labels == k]
            for prev in rows[:, step - 1].unique().tolist():
                sub = rows[rows[:, step - 1] == prev]
                probe = sub[:1].repeat(allowed.stop - allowed.start, 1)
                probe[:, step] = torch.arange(allowed.start, allowed.stop)
                probs = model.log_prob(probe)[:, step - 1].exp()
                freq = torch.bincount(
                    sub[:, step] - allowed.start, minlength=len(probs)
                ).double() / len(sub)
                sd = (probs * (1 - probs) / len(sub)).sqrt()
                assert ((freq - probs).abs() <= 5 * sd + 1e-3).all(), (step, k, prev)


def test_sampling_is_seeded_and_unconditional_works() -> None:
    layout = FlattenLayout([7], (2, 3))
    codes = torch.randint(0, 7, (30, 2, 3, 1), generator=torch.Generator().manual_seed(4))
    model = ClassBigram.fit(layout, layout.encode(codes))
    a = model.sample(None, 16, torch.Generator().manual_seed(1))
    b = model.sample(None, 16, torch.Generator().manual_seed(1))
    c = model.sample(None, 16, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert layout.decode(a).shape == (16, 2, 3, 1)
    # a sequence scored by the model it was sampled from has a finite likelihood
    assert math.isfinite(model.nll(a))


def test_a_model_of_the_training_data_scores_it_better_than_shuffled_data() -> None:
    layout = FlattenLayout([8], (4, 4), num_classes=4)
    train = _toy_corpus(layout, 200, seed=5)
    model = ClassBigram.fit(layout, train, beta=0.5)
    held_out = _toy_corpus(layout, 100, seed=6)
    shuffled = held_out.clone()
    shuffled[:, 1:] = shuffled[:, 1:][
        :, torch.randperm(16, generator=torch.Generator().manual_seed(0))
    ]
    shuffled[:, 1:] = (shuffled[:, 1:] + 3) % 8  # codes the class rarely uses
    assert model.nll(held_out) < model.nll(shuffled)
    assert model.nll(held_out) < math.log(8)  # beats the uniform code distribution


def test_errors() -> None:
    layout = FlattenLayout([4], (2,), num_classes=2)
    with pytest.raises(TypeError, match="flatten"):
        ClassBigram(DelayLayout([4, 4], (2,)))
    with pytest.raises(ValueError, match="beta"):
        ClassBigram(layout, beta=0.0)
    with pytest.raises(RuntimeError, match="fit"):
        ClassBigram(layout).nll(
            layout.encode(torch.zeros(1, 2, 1, dtype=torch.long), torch.tensor([0]))
        )
    model = ClassBigram.fit(
        layout, layout.encode(torch.zeros(2, 2, 1, dtype=torch.long), torch.tensor([0, 1]))
    )
    bad = layout.encode(torch.zeros(1, 2, 1, dtype=torch.long), torch.tensor([0]))
    bad[0, 1] = 4  # a class token where a code belongs
    with pytest.raises(ValueError, match="step 1"):
        model.nll(bad)
    with pytest.raises(ValueError, match="num_samples"):
        model.sample(None)
    with pytest.raises(ValueError, match="pass labels"):
        model.sample(None, 4)


def test_select_beta_minimises_the_cross_validated_nll() -> None:
    layout = FlattenLayout([6, 4], (3,), num_classes=3)
    tokens = _toy_corpus(layout, 45, seed=7)
    betas = (0.05, 0.5, 5.0, 50.0)
    chosen = select_beta(layout, tokens, betas, folds=3, seed=1)
    # brute force: the same seeded partition, one fit per fold and beta
    order = torch.randperm(45, generator=torch.Generator().manual_seed(1))
    scores = []
    for beta in betas:
        total = 0.0
        for held in order.chunk(3):
            keep = sorted(set(range(45)) - set(held.tolist()))
            model = ClassBigram.fit(layout, tokens[keep], beta)
            total += model.nll(tokens[held]) * len(held) * (layout.seq_len - 1)
        scores.append(total)
    assert chosen == betas[scores.index(min(scores))]
    assert len(set(scores)) == len(scores)  # the choice is not a tie
    with pytest.raises(ValueError, match="folds"):
        select_beta(layout, tokens[:2], betas, folds=3)
