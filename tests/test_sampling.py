"""Sampling filters against their definitions, and the `Sampling` options: checked once per call,
never per token."""

from __future__ import annotations

import math
import sys
from contextlib import ExitStack
from unittest import mock

import pytest
import torch
from gen_strategies import build_model, seeds
from hypothesis import example, given
from hypothesis import strategies as st

from tinygpt import ModelConfig
from tinygpt.generate import (
    Sampling,
    check_sampling,
    complete,
    generate,
    generate_steps,
    sample_next,
    top_k_filter,
    top_p_filter,
)
from tinygpt.tokenizer import CharTokenizer

TINY = ModelConfig.preset("seed", vocab_size=12, max_seq=8)


def random_logits(seed: int, vocab: int, rows: int = 3, ties: bool = False) -> torch.Tensor:
    """Logits `(b v)`; with `ties`, drawn from a few integers so that equal logits are common."""
    generator = torch.Generator().manual_seed(seed)
    if ties:
        return torch.randint(-3, 3, (rows, vocab), generator=generator).double()
    return torch.randn(rows, vocab, generator=generator, dtype=torch.float64) * 3


def kept(filtered: torch.Tensor) -> list[set[int]]:
    return [set(torch.isfinite(row).nonzero().flatten().tolist()) for row in filtered]


@given(seed=seeds, vocab=st.integers(1, 30), k=st.integers(1, 35), ties=st.booleans())
def test_top_k_keeps_every_logit_at_least_the_kth_largest(seed, vocab, k, ties):
    logits = random_logits(seed, vocab, ties=ties)
    filtered = top_k_filter(logits, k)
    for row, survivors in zip(logits.tolist(), kept(filtered)):
        kth = sorted(row, reverse=True)[min(k, vocab) - 1]
        assert survivors == {i for i, x in enumerate(row) if x >= kth}
        assert len(survivors) >= min(k, vocab)
    assert torch.equal(filtered[torch.isfinite(filtered)], logits[torch.isfinite(filtered)])
    if k >= vocab:
        assert torch.equal(filtered, logits)


def smallest_set_reaching(probs: list[float], p: float) -> set[int]:
    """The definition: most likely first (lower id first on a tie) until the total reaches p."""
    chosen, total = set(), 0.0
    for i in sorted(range(len(probs)), key=lambda i: (-probs[i], i)):
        if total >= p:
            break
        chosen.add(i)
        total = math.fsum(probs[j] for j in chosen)
    return chosen


@given(seed=seeds, vocab=st.integers(1, 30), p=st.floats(0.01, 1.0), ties=st.booleans())
@example(seed=0, vocab=10, p=1.0, ties=False)
def test_top_p_keeps_the_smallest_set_reaching_p(seed, vocab, p, ties):
    logits = random_logits(seed, vocab, ties=ties)
    filtered = top_p_filter(logits, p)
    for row, survivors in zip(logits.softmax(dim=-1).tolist(), kept(filtered)):
        assert survivors == smallest_set_reaching(row, p)
        assert max(range(vocab), key=lambda i: (row[i], -i)) in survivors  # the top token
        total = sum(row[i] for i in survivors)
        assert total >= p - 1e-12
        assert total - min(row[i] for i in survivors) < p  # no smaller set would do
    if p == 1.0:
        assert torch.equal(filtered, logits)


@given(seed=seeds, vocab=st.integers(2, 30), k=st.integers(1, 10), p=st.floats(0.05, 1.0))
def test_filters_never_leave_an_empty_support(seed, vocab, k, p):
    logits = random_logits(seed, vocab, ties=True)
    generator = torch.Generator().manual_seed(seed)
    tokens = sample_next(logits, temperature=0.7, top_k=k, top_p=p, generator=generator)
    survivors = kept(top_p_filter(top_k_filter(logits / 0.7, k), p))
    assert all(int(t) in s for t, s in zip(tokens, survivors))


@given(seed=seeds, vocab=st.integers(2, 30))
def test_top_k_one_and_temperature_zero_are_greedy(seed, vocab):
    logits = random_logits(seed, vocab)
    greedy = logits.argmax(dim=-1)
    generator = torch.Generator().manual_seed(seed)
    assert torch.equal(sample_next(logits, top_k=1, generator=generator), greedy)
    assert torch.equal(sample_next(logits, temperature=0), greedy)
    assert torch.equal(sample_next(logits, do_sample=False, top_p=0.5), greedy)


def test_sampling_object_and_keywords_draw_the_same_tokens():
    model = build_model(TINY, seed=1)
    prompt = torch.tensor([[1, 2]])

    def run(**options):
        return generate(model, prompt, 20, generator=torch.Generator().manual_seed(3), **options)

    keywords = run(temperature=0.8, top_k=5, top_p=0.9)
    assert torch.equal(run(sampling=Sampling(temperature=0.8, top_k=5, top_p=0.9)), keywords)
    assert not torch.equal(run(sampling=Sampling(temperature=2.0)), keywords)
    assert torch.equal(run(sampling=Sampling(greedy=True)), run(do_sample=False))
    with pytest.raises(ValueError, match="either as sampling= or as keywords, not both"):
        run(sampling=Sampling(), top_k=3)
    with pytest.raises(ValueError, match="top_k must be an integer >= 1, got 0"):
        Sampling(top_k=0)
    with pytest.raises(ValueError, match="greedy must be True or False, got 1"):
        Sampling(greedy=1)


def count_sampling_checks(stack: ExitStack) -> mock.Mock:
    """One counter for `check_sampling`, wherever a module of the package holds a name for it."""
    counter = mock.Mock(wraps=check_sampling)
    for name, module in list(sys.modules.items()):
        if name.startswith("tinygpt.generate") and hasattr(module, "check_sampling"):
            stack.enter_context(mock.patch.object(module, "check_sampling", counter))
    return counter


def test_sampling_is_checked_once_per_call_not_per_token():
    """Twenty tokens, one check per call: a check inside the decoding loop would count 21."""
    model = build_model(TINY, seed=0, spread=2.0)
    prompt = torch.tensor([[1, 2]])
    tokenizer = CharTokenizer("abcdefghijk", strict=True)  # 11 characters and <unk>: 12 ids
    with ExitStack() as stack:
        checks = count_sampling_checks(stack)
        generate(model, prompt, 20, temperature=0.8, top_k=5, top_p=0.9)
        assert checks.call_count == 1
        list(generate_steps(model, prompt, 20, top_k=5))
        assert checks.call_count == 2
        assert len(complete(model, tokenizer, "ab", 20, top_p=0.9)) == 20
        assert checks.call_count == 3
        generate(model, prompt, 20, sampling=Sampling(top_k=5))  # made (and checked) here, once
        assert checks.call_count == 4


@pytest.mark.parametrize("greedy", [True, False])
def test_nan_logits_are_refused_not_turned_into_token_0(greedy):
    nan = float("nan")
    for logits in (torch.tensor([[0.0, 1.0, 2.0], [nan, nan, nan]]),  # one row broken
                   torch.tensor([[nan, 1.0, 2.0]]),  # argmax would pick the NaN, token 0
                   torch.full((1, 3), float("-inf"))):  # softmax of nothing: NaN
        if greedy and not logits.isnan().any():
            continue  # an all -inf row has a greedy answer (the first), like argmax
        with pytest.raises(ValueError, match=r"^the model's logits are NaN, so no next token can "
                                             r"be chosen"):
            Sampling(greedy=greedy).sample(logits, torch.Generator().manual_seed(0))
    fine = torch.tensor([[0.0, 3.0, 1.0]])
    assert Sampling(greedy=greedy).sample(fine, torch.Generator().manual_seed(0)).shape == (1,)
