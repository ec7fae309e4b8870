"""Beam search against exhaustive search and greedy decoding, and across slides of the context."""

from __future__ import annotations

import itertools

import pytest
import torch
from gen_strategies import build_model, random_prompt, seeds, small_configs
from hypothesis import given, settings
from hypothesis import strategies as st

from tinygpt import ModelConfig
from tinygpt.generate import beam_search, generate

TINY = ModelConfig.preset("seed", vocab_size=12, max_seq=8)


def plain_log_prob(model, tokens: torch.Tensor, prompt_length: int) -> float:
    """Summed log-probabilities of the new tokens, from one plain forward (sequence <= max_seq)."""
    with torch.inference_mode():
        log_probs = model(tokens[None, :-1])[0].double().log_softmax(dim=-1)
    return sum(float(log_probs[t - 1, tokens[t]]) for t in range(prompt_length, len(tokens)))


@given(config=small_configs(max_seq=st.integers(7, 10)), seed=seeds, n=st.integers(1, 6))
@settings(max_examples=25)
def test_beam_of_one_is_greedy(config, seed, n):
    model = build_model(config, seed, spread=2.0)
    prompt = random_prompt(2, config.vocab_size, seed)[None]
    [beam] = beam_search(model, prompt, n, beam_width=1)
    assert torch.equal(beam.tokens, generate(model, prompt, n, do_sample=False)[0])
    assert beam.log_prob == pytest.approx(plain_log_prob(model, beam.tokens, 2), abs=1e-10)


def exhaustive(model, prompt, vocab, n, eos_id=None, length_penalty=0.0):
    """Every continuation of up to n tokens (ending early only at eos), with its log-prob and
    score, best first."""
    found = []
    for length in range(1, n + 1):
        for new in itertools.product(range(vocab), repeat=length):
            if eos_id is not None and eos_id in new[:-1]:
                continue
            if length < n and (eos_id is None or new[-1] != eos_id):
                continue
            tokens = torch.cat([prompt, torch.tensor(new)])
            log_prob = plain_log_prob(model, tokens, len(prompt))
            found.append((log_prob / length ** length_penalty, log_prob, tuple(tokens.tolist())))
    return sorted(found, reverse=True)


@pytest.mark.parametrize("eos_id, length_penalty", [(None, 0.0), (1, 0.0), (1, 1.0), (0, 0.6)])
def test_wide_beam_equals_exhaustive_search(eos_id, length_penalty):
    """Width vocab^(n-1) keeps every prefix, so the beam search is exact; every
    returned score equals the log-probs of a plain forward."""
    vocab, n = 3, 4
    model = build_model(ModelConfig.preset("seed", vocab_size=vocab, max_seq=8), 5, spread=3.0)
    prompt = torch.tensor([2, 0])
    width = vocab ** (n - 1)
    beams = beam_search(model, prompt[None], n, beam_width=width, eos_id=eos_id,
                        length_penalty=length_penalty)
    truth = exhaustive(model, prompt, vocab, n, eos_id, length_penalty)[:width]
    assert [tuple(b.tokens.tolist()) for b in beams] == [t[2] for t in truth]
    for beam, (score, log_prob, _) in zip(beams, truth):
        assert beam.log_prob == pytest.approx(log_prob, abs=1e-10)
        assert beam.score == pytest.approx(score, abs=1e-10)
    if eos_id is not None:
        assert len({len(b.tokens) for b in beams}) > 1  # beams did end at different lengths


def test_beams_are_sorted_and_the_cache_follows_them_across_slides():
    model = build_model(TINY, seed=4, spread=3.0)
    prompt = torch.tensor([[5, 6]])
    beams = beam_search(model, prompt, 6, beam_width=4)
    assert len(beams) == 4
    assert [b.score for b in beams] == sorted((b.score for b in beams), reverse=True)
    cached = beam_search(model, prompt, 12, beam_width=3, policy="fast")
    uncached = beam_search(model, prompt, 12, beam_width=3, policy="fast", use_cache=False)
    assert [b.tokens.tolist() for b in cached] == [b.tokens.tolist() for b in uncached]


def written_out_beam_search(model, prompt: list[int], n: int, width: int, eos_id: int,
                            length_penalty: float = 0.0):
    """Beam search as specified, on plain lists and one full forward per candidate: every step
    ranks every one-token extension of every live beam by summed log-probability; among the
    2 * width best, those that end with eos_id are finished and the best `width` others stay live.
    Returns the `width` best of the finished and the live by log_prob / new ** length_penalty,
    best first, as (tokens, log_prob)."""
    live, finished = [(tuple(prompt), 0.0)], []
    for _ in range(n):
        candidates = []
        for tokens, log_prob in live:
            with torch.inference_mode():
                step = model(torch.tensor([tokens]))[0, -1].double().log_softmax(dim=-1)
            candidates += [(tokens + (t,), log_prob + float(step[t])) for t in range(len(step))]
        candidates.sort(key=lambda c: -c[1])
        best = candidates[:2 * width]
        finished += [c for c in best if c[0][-1] == eos_id]
        live = [c for c in best if c[0][-1] != eos_id][:width]
    score = lambda c: c[1] / (len(c[0]) - len(prompt)) ** length_penalty  # noqa: E731
    return sorted(finished + live, key=lambda c: -score(c))[:width]


def test_width_two_with_an_end_token_equals_the_written_out_search():
    """Once beams end, the search still keeps `width` live beams (it ranks 2 * width candidates
    to leave room for those that end): compared on every end token of several models."""
    ended_early = 0
    for seed, eos_id, length_penalty in itertools.product(range(3), range(5), (0.0, 1.0, 2.0)):
        model = build_model(ModelConfig.preset("seed", vocab_size=5, max_seq=8), seed)
        truth = written_out_beam_search(model, [1, 2], 5, 2, eos_id, length_penalty)
        beams = beam_search(model, torch.tensor([[1, 2]]), 5, beam_width=2, eos_id=eos_id,
                            length_penalty=length_penalty)
        assert [tuple(b.tokens.tolist()) for b in beams] == [t for t, _ in truth], (
            seed, eos_id, length_penalty)
        for beam, (_, log_prob) in zip(beams, truth):
            assert beam.log_prob == pytest.approx(log_prob, abs=1e-10)
        ended_early += any(len(t) < 7 for t, _ in truth)
    assert ended_early >= 5  # the case that needs the room: beams ending before the last step


def test_a_beam_of_one_on_tied_logits_is_greedy():
    """With a zeroed LM head every logit ties; greedy takes the first token, and so must the
    beam (its sort is stable). 300 tokens: an unstable sort of that many ties reorders them."""
    model = build_model(ModelConfig.preset("seed", vocab_size=300, max_seq=8), 0)
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.bias.zero_()
    prompt = torch.tensor([[7, 8]])
    [beam] = beam_search(model, prompt, 4, beam_width=1)
    greedy = generate(model, prompt, 4, do_sample=False)[0]
    assert greedy.tolist() == [7, 8, 0, 0, 0, 0]
    assert torch.equal(beam.tokens, greedy)
