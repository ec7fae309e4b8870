"""Generation end to end: sampling options through the decoder, long prompts, stop strings,
streaming, bad arguments and the command line. (The filters: test_sampling.py; beams:
test_beam.py; cache against recomputation: test_kv_cache.py; the compiled step: test_decode.py.)"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch
from gen_strategies import build_model, random_prompt

from tinygpt import ModelConfig
from tinygpt.checkpoint import save_checkpoint
from tinygpt.cli import main
from tinygpt.generate import (
    beam_search,
    complete,
    encode_prompt,
    generate,
    generate_steps,
    stream,
    unknown_characters,
)
from tinygpt.generate.text import TextTail, find_stop
from tinygpt.tokenizer import BPETokenizer, CharTokenizer

TINY = ModelConfig.preset("seed", vocab_size=12, max_seq=8)


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
    """Within a process; the CLI test repeats it across processes."""
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
    final = tokenizer.decode(new)
    assert "".join(pieces) == final
    # Each piece is final when yielded: a character cut between tokens is held back, never shown
    # as U+FFFD and changed later; a U+FFFD is shown only where the whole text has one.
    for k in range(1, len(pieces) + 1):
        assert final.startswith("".join(pieces[:k]))
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
    ({"policy": "lazy"}, "policy must be one of exact, fast, rolling, got 'lazy'"),
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


def test_out_of_vocabulary_prompt_ids_are_one_sentence_at_every_entry_point():
    """The model's forward checks no token values (it indexes the embedding blindly): each entry
    point that takes a prompt checks it once, and names the id instead of an IndexError."""
    model = build_model(TINY, seed=0)
    wide = CharTokenizer("abcdefghijklmn")  # 15 ids: more than the model's 12
    calls = {
        "generate": lambda: generate(model, torch.tensor([[1, 12]]), 3),
        "generate, ragged": lambda: generate(model, [[1], [3, -1]], 3, do_sample=False),
        "generate_steps": lambda: list(generate_steps(model, torch.tensor([[12]]), 3)),
        "beam_search": lambda: beam_search(model, torch.tensor([[12]]), 3, beam_width=2),
        "stream": lambda: list(stream(model, wide, "an", 3)),
        "complete": lambda: complete(model, wide, "n", 3),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError) as raised:
            call()
        message = str(raised.value)
        assert re.fullmatch(r"token id (12|13|-1) in prompt [01] is outside the vocabulary "
                            r"0\.\.11\.", message), (name, message)


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
    """Two separate processes, the same seed, the same text: no hidden global RNG state."""
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


# --- decoding the new text costs the same at every token ----------------------------------------

class CountingChars(CharTokenizer):
    """A character tokenizer that records how many ids every decode call was given."""

    def decode(self, ids):
        ids = list(ids)
        self.decoded.append(len(ids))
        return super().decode(ids)


class CountingBPE(BPETokenizer):
    def decode(self, ids):
        ids = list(ids)
        self.decoded.append(len(ids))
        return super().decode(ids)

    def decode_bytes(self, ids):
        ids = list(ids)
        self.decoded.append(len(ids))
        return super().decode_bytes(ids)


BPE_TEXT = "Thé café à Noël coûte 5 € — ça va? " * 20


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_streaming_decodes_each_new_token_once(kind):
    if kind == "char":
        tokenizer = CountingChars.from_text("ROMEO:\nabc de")
    else:
        tokenizer = CountingBPE(BPETokenizer.train(BPE_TEXT, vocab_size=280)._tokenizer)
    config = ModelConfig.preset("seed", vocab_size=tokenizer.vocab_size, max_seq=8)
    model = build_model(config, seed=0, dtype=torch.float32)
    tokenizer.decoded = []
    n = 300
    pieces = list(stream(model, tokenizer, "ab", n, stop=["never in this text \x00"],
                         generator=torch.Generator().manual_seed(0)))
    assert tokenizer.decoded == [1] * n  # one call of one token per step, however long the text
    ids = generate(model, torch.tensor([tokenizer.encode("ab")]), n,
                   generator=torch.Generator().manual_seed(0))[0, -n:].tolist()
    assert "".join(pieces) == tokenizer.decode(ids)
    tokenizer.decoded = []
    generate(model, [tokenizer.encode("ab")], n, stop=["never in this text \x00"],
             decode=tokenizer.decode, generator=torch.Generator().manual_seed(0))
    assert tokenizer.decoded == [1] * n


def test_text_tail_pieces_equal_the_whole_decode_cut_at_the_first_stop():
    """Random token streams of a byte-level BPE (characters cut between tokens, invalid bytes)
    and stop strings taken from their own text: the pieces always join to the whole decode, cut
    just before the first stop string, and `stopped` turns True once one is complete."""
    tokenizer = BPETokenizer.train(BPE_TEXT, vocab_size=280)
    rng = torch.Generator().manual_seed(0)
    cut_characters = 0
    for _ in range(300):
        length = int(torch.randint(1, 30, (1,), generator=rng))
        ids = torch.randint(tokenizer.vocab_size, (length,), generator=rng).tolist()
        whole = tokenizer.decode(ids)
        start = int(torch.randint(len(whole), (1,), generator=rng))
        stop = [whole[start:start + int(torch.randint(1, 4, (1,), generator=rng))], "\x00\x01"]
        tail = TextTail(tokenizer.decode, stop, tokenizer.decode_bytes)
        shown, stopped_at = "", None
        for k, token in enumerate(ids):
            shown += tail.push(token)
            if tail.stopped and stopped_at is None:
                stopped_at = k
        shown += tail.flush()  # bytes of a character cut short at the end become U+FFFD here
        stopped_at = len(ids) - 1 if stopped_at is None and tail.stopped else stopped_at
        end = find_stop(whole, stop)
        assert end is not None and shown == whole[:end]
        assert stopped_at is not None  # and never before the stop string is in the text:
        assert find_stop(tokenizer.decode(ids[:stopped_at + 1]), stop) is not None
        cut_characters += any(tokenizer.decode(ids[:k]).endswith("\ufffd")
                              for k in range(1, len(ids)))
    assert cut_characters > 30  # the hard case happened often
