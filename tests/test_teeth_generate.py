"""Decoding behaviour the broader generation tests leave open: which of several stop strings
ends the text, and text held back for a stop string that never completes."""

from __future__ import annotations

import itertools

import torch

from tinygpt import ModelConfig, TinyDecoderModel
from tinygpt.generate import generate, stream
from tinygpt.generate.text import TextTail
from tinygpt.tokenizer import CharTokenizer


def test_the_earliest_stop_string_in_the_text_ends_it_whatever_order_they_are_listed_in():
    """Stop strings completed by the same token ("abc" and its tail "bc") cut the text before the
    one that starts first, for every order of the list. The oracle is `str.find` on the whole
    text; the tokens are pushed one at a time, as streaming does."""
    tokenizer = CharTokenizer(list("abcxyz"))
    text = "xyabcz"
    stops = ["bc", "abc", "yz", "cz"]
    for order in itertools.permutations(stops):
        found = [text.find(s) for s in order if s in text]
        expected = text[:min(found)]
        tail = TextTail(tokenizer.decode, order)
        pieces = []
        for token in tokenizer.encode(text):
            pieces.append(tail.push(token))
            if tail.stopped:
                break
        pieces.append(tail.flush())
        assert "".join(pieces) == expected == "xy", order


def test_text_held_back_for_a_stop_string_that_never_completes_is_still_streamed():
    """The last characters of a continuation that could begin a stop string are held back while
    more may come; when the tokens run out they are the text's end and must be yielded. The
    streamed pieces then join to exactly the text `generate` produces without stop strings."""
    torch.manual_seed(0)
    model = TinyDecoderModel(ModelConfig(vocab_size=6, d_model=16, n_heads=2, n_layers=1,
                                         d_ff=16, max_seq=8)).eval()
    tokenizer = CharTokenizer(list("abcde"), strict=True)
    ids = generate(model, torch.tensor([tokenizer.encode("ab")]), 12, do_sample=False)
    full = tokenizer.decode(ids[0, 2:].tolist())
    stop = full[-2:] + "!"  # its first two characters end the text; the "!" never comes
    pieces = list(stream(model, tokenizer, "ab", 12, stop=[stop], do_sample=False))
    assert "".join(pieces) == full
