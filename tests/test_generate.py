"""Sampling filters against their definitions, beam search against exhaustive search, stop strings,
streaming and bad arguments."""

from __future__ import annotations

import itertools
import math
import subprocess
import sys

import pytest
import torch
from gen_strategies import build_model, random_prompt, seeds, small_configs
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tinygpt import ModelConfig
from tinygpt.checkpoint import save_checkpoint
from tinygpt.cli import main
from tinygpt.generate import (
    beam_search,
    complete,
    encode_prompt,
    generate,
    generate_steps,
    sample_next,
    stream,
    top_k_filter,
    top_p_filter,
    unknown_characters,
)
from tinygpt.tokenizer import BPETokenizer, CharTokenizer

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


def test_unfiltered_options_change_nothing_in_generation():
    model = build_model(TINY, seed=1, spread=2.0)
    prompt = torch.tensor([[1, 2]])
    runs = [generate(model, prompt, 20, generator=torch.Generator().manual_seed(7), **options)
            for options in ({}, {"top_k": 12}, {"top_k": 100}, {"top_p": 1.0})]
    assert all(torch.equal(runs[0], run) for run in runs[1:])
    greedy = generate(model, prompt, 20, do_sample=False)
    assert torch.equal(generate(model, prompt, 20, top_k=1), greedy)
    assert torch.equal(generate(model, prompt, 20, temperature=0), greedy)


def test_fixed_seed_is_reproducible_and_the_seed_matters():
    """Issue 4, point 5 (within a process; the CLI test repeats it across processes)."""
    model = build_model(TINY, seed=2, spread=2.0)
    prompt = torch.tensor([[3]])

    def run(seed, **options):
        return generate(model, prompt, 30, generator=torch.Generator().manual_seed(seed), **options)

    assert torch.equal(run(11), run(11))
    assert torch.equal(run(11, top_k=5, top_p=0.9), run(11, top_k=5, top_p=0.9))
    assert not torch.equal(run(11), run(12))


def test_generate_keeps_a_long_prompt_as_history():
    model = build_model(TINY, seed=0)
    prompt = random_prompt(20, 12, seed=0)[None]  # longer than max_seq = 8
    out = generate(model, prompt, 5, do_sample=False)
    assert out.shape == (1, 25) and torch.equal(out[:, :20], prompt)
    assert torch.equal(generate(model, prompt, 0), prompt)


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
    """Issue 4, point 3: width vocab^(n-1) keeps every prefix, so the beam search is exact; every
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


CHARS = "abc \n"
TOKENIZER = CharTokenizer(CHARS, strict=True)


def text_model(seed=0):
    return build_model(ModelConfig.preset("seed", vocab_size=len(CHARS) + 1, max_seq=8), seed,
                       spread=2.0)


def test_stream_pieces_add_up_to_the_generated_text():
    model = text_model()
    pieces = list(stream(model, TOKENIZER, "ab", 30, generator=torch.Generator().manual_seed(0)))
    ids = generate(model, torch.tensor([TOKENIZER.encode("ab")]), 30,
                   generator=torch.Generator().manual_seed(0))
    assert "".join(pieces) == TOKENIZER.decode(ids[0, 2:].tolist())
    assert len(pieces) > 1  # yielded as produced, not all at once


def test_stream_holds_back_incomplete_characters_of_a_byte_level_bpe():
    tokenizer = BPETokenizer.train("Thé café à Noël coûte 5 € — ça va? " * 20,
                                   vocab_size=280)
    config = ModelConfig.preset("seed", vocab_size=tokenizer.vocab_size, max_seq=8)
    model = build_model(config, seed=0, dtype=torch.float32)
    prompt = "café "
    pieces = list(stream(model, tokenizer, prompt, 60, generator=torch.Generator().manual_seed(1)))
    ids = generate(model, torch.tensor([tokenizer.encode(prompt)]), 60,
                   generator=torch.Generator().manual_seed(1))[0, len(tokenizer.encode(prompt)):]
    new = ids.tolist()
    assert "".join(pieces) == tokenizer.decode(new)
    assert not any(piece.endswith("\ufffd") for piece in pieces[:-1])
    assert any(tokenizer.decode(new[:k]).endswith("\ufffd") for k in range(1, 60))  # it happened


def test_stop_strings_end_the_text_and_the_rows():
    model = text_model()
    full = complete(model, TOKENIZER, "a", 40, generator=torch.Generator().manual_seed(3))
    stop = full[5:7]  # occurs in the unstopped text, so it must end it
    cut = full[: full.index(stop)]
    pieces = list(stream(model, TOKENIZER, "a", 40, stop=[stop, "zz"],
                         generator=torch.Generator().manual_seed(3)))
    assert "".join(pieces) == cut
    ids = generate(model, [TOKENIZER.encode("a")], 40, stop=[stop], decode=TOKENIZER.decode,
                   generator=torch.Generator().manual_seed(3))[0]
    new_text = TOKENIZER.decode(ids[1:].tolist())
    assert new_text.endswith(stop) and new_text.index(stop) == len(cut)  # ends at the stop string
    rows = generate(model, [TOKENIZER.encode("a"), TOKENIZER.encode("bcbc")], 40, stop=[stop],
                    decode=TOKENIZER.decode, do_sample=False)
    for row, prompt_length in zip(rows, (1, 4)):
        text = TOKENIZER.decode(row[prompt_length:].tolist())
        if stop in text:
            assert text.endswith(stop) and text.count(stop) == 1
        else:
            assert len(row) == prompt_length + 40


def test_prompts_empty_unknown_and_strict():
    assert encode_prompt(TOKENIZER, "") == TOKENIZER.encode("\n")
    with pytest.raises(ValueError, match="cannot encode the prompt: character 'x' at position 2"):
        encode_prompt(TOKENIZER, "abx")
    lenient = CharTokenizer(CHARS)
    assert encode_prompt(lenient, "abx")[-1] == len(CHARS)  # <unk>
    assert unknown_characters(lenient, "xab!") == ["!", "x"]
    assert unknown_characters(lenient, "ab") == []


@pytest.mark.parametrize("options, message", [
    ({"temperature": -1.0}, "temperature must be a finite number >= 0, got -1.0"),
    ({"temperature": float("nan")}, "temperature must be a finite number >= 0"),
    ({"temperature": float("inf")}, "temperature must be a finite number >= 0"),
    ({"top_k": 0}, "top_k must be an integer >= 1, got 0"),
    ({"top_k": 2.5}, "top_k must be an integer >= 1, got 2.5"),
    ({"top_k": True}, "top_k must be an integer >= 1, got True"),
    ({"top_p": 0.0}, "top_p must be in \\(0, 1\\], got 0.0"),
    ({"top_p": 1.5}, "top_p must be in \\(0, 1\\], got 1.5"),
    ({"policy": "lazy"}, "policy must be one of exact, fast, got 'lazy'"),
    ({"stop": ["a"]}, "stop strings need decode="),
    ({"stop": "a", "decode": str}, "stop must be a list of non-empty strings"),
])
def test_bad_sampling_arguments_are_named(options, message):
    model = build_model(TINY, seed=0)
    with pytest.raises(ValueError, match=message):
        generate(model, torch.tensor([[1]]), 3, **options)


@pytest.mark.parametrize("idx, count, message", [
    (torch.tensor([[1]]), -1, "max_new_tokens must be an integer >= 0, got -1"),
    (torch.tensor([1, 2]), 3, "idx must have shape \\(batch, time\\), got \\(2,\\)"),
    (torch.zeros(1, 0, dtype=torch.long), 3, "prompt 0 is empty"),
    ([[1], []], 3, "prompt 1 is empty"),
    (torch.tensor([[1, 12]]), 3, "token id 12 in prompt 0 is outside the vocabulary 0..11"),
    (torch.tensor([[0.5]]), 3, "prompt 0 must be a 1-D sequence of integer token ids"),
    ([], 3, "no prompts given"),
])
def test_bad_prompts_are_named(idx, count, message):
    model = build_model(TINY, seed=0)
    with pytest.raises(ValueError, match=message):
        generate(model, idx, count)


def test_bad_beam_arguments_are_named():
    model = build_model(TINY, seed=0)
    prompt = torch.tensor([[1]])
    with pytest.raises(ValueError, match="beam_width must be an integer >= 1, got 0"):
        beam_search(model, prompt, 3, beam_width=0)
    with pytest.raises(ValueError, match="eos_id 12 is outside the vocabulary 0..11"):
        beam_search(model, prompt, 3, beam_width=2, eos_id=12)
    with pytest.raises(ValueError, match="beam search takes one prompt, got 2"):
        beam_search(model, torch.tensor([[1], [2]]), 3, beam_width=2)
    with pytest.raises(ValueError, match="pass the prompts as a list"):
        generate(model, torch.tensor([[1], [2]]), 3, stop=["a"], decode=str)


def test_steps_report_the_logits_each_token_was_drawn_from():
    model = build_model(TINY, seed=0)
    with torch.inference_mode():
        for step in generate_steps(model, torch.tensor([[1, 2]]), 5, do_sample=False):
            assert torch.equal(step.tokens, step.logits.argmax(dim=-1))


# The command line: `tinygpt generate` on a tiny checkpoint written by save_checkpoint.


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tokenizer = CharTokenizer.from_text("ROMEO:\nabc de")
    config = ModelConfig.preset("seed", vocab_size=tokenizer.vocab_size, max_seq=8)
    run = tmp_path_factory.mktemp("runs") / "tiny"
    save_checkpoint(run, model=build_model(config, 0, torch.float32, spread=2.0),
                    tokenizer=tokenizer, step=1)
    return run


def cli(capsys, *argv):
    code = main(["generate", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_samples_streams_and_keeps_a_long_prompt(run_dir, capsys):
    prompt = "ROMEO: abc de abc"  # longer than max_seq = 8: kept as history
    args = ("--checkpoint", run_dir, "--prompt", prompt, "--max-new-tokens", 30, "--seed", 1,
            "--temperature", 0.8, "--top-k", 5, "--top-p", 0.95)
    code, out, _ = cli(capsys, *args)
    assert code == 0 and out.startswith(prompt) and len(out) == len(prompt) + 30 + 1
    assert cli(capsys, *args, "--stream") == (0, out, "")
    assert cli(capsys, *args, "--no-cache", "--policy", "exact") == (0, out, "")
    code, fast, _ = cli(capsys, *args, "--policy", "fast")
    assert code == 0 and fast.startswith(prompt)
    code, out, _ = cli(capsys, "--checkpoint", run_dir, "--prompt", "", "--max-new-tokens", 3)
    assert code == 0 and out.startswith("\n") and len(out) == 1 + 3 + 1


def test_cli_beam_prints_the_best_beams(run_dir, capsys):
    code, out, _ = cli(capsys, "--checkpoint", run_dir, "--prompt", "RO", "--max-new-tokens", 4,
                       "--beam", 3)
    assert code == 0 and out.count("--- beam ") == 3 and "--- beam 1: log-prob -" in out


def test_cli_seed_is_reproducible_across_processes(run_dir):
    """Issue 4, point 5: two separate processes, the same seed, the same text."""
    def run(seed):
        command = [sys.executable, "-m", "tinygpt", "generate", "--checkpoint", str(run_dir),
                   "--prompt", "RO", "--max-new-tokens", "40", "--seed", str(seed)]
        return subprocess.run(command, capture_output=True, text=True, check=True).stdout

    assert run(7) == run(7)  # that another seed gives other text is tested in-process above


def test_cli_reports_bad_input_in_one_line(run_dir, tmp_path, capsys):
    for argv, message in [
        (("--checkpoint", run_dir, "--temperature", -1), "temperature must be a finite number"),
        (("--checkpoint", run_dir, "--top-p", 2), "top_p must be in (0, 1], got 2.0"),
        (("--checkpoint", run_dir, "--beam", 2, "--stream"), "cannot be used with --beam"),
        (("--checkpoint", tmp_path / "nope"), "does not exist"),
        (("--runs-dir", tmp_path), "no run with a checkpoint under"),
        *([] if torch.cuda.is_available() else
          [(("--checkpoint", run_dir, "--device", "cuda"), "no CUDA device is available")]),
    ]:
        code, out, err = cli(capsys, *argv, "--max-new-tokens", 2)
        assert code == 2 and out == "", argv
        assert err.startswith("tinygpt: error: ") and message in err and err.count("\n") == 1


def test_cli_prompt_outside_the_vocabulary(run_dir, tmp_path, capsys):
    code, out, err = cli(capsys, "--checkpoint", run_dir, "--prompt", "RO!?", "--max-new-tokens", 2)
    assert code == 0 and "became <unk>: '!' '?'" in err
    tokenizer = CharTokenizer.from_text("ROMEO:\nabc de", strict=True)
    config = ModelConfig.preset("seed", vocab_size=tokenizer.vocab_size, max_seq=8)
    save_checkpoint(tmp_path / "strict", model=build_model(config, 0, torch.float32),
                    tokenizer=tokenizer, step=1)
    code, out, err = cli(capsys, "--checkpoint", tmp_path / "strict", "--prompt", "RO!")
    assert code == 2 and "cannot encode the prompt: character '!' at position 2" in err
