"""A text prompt continued piece by piece as the tokens are drawn, cut before a stop string."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from tinygpt.generate.decoder import generate_steps
from tinygpt.generate.text import TextTail, check_stop, encode_prompt
from tinygpt.model import TinyDecoderModel


def stream(model: TinyDecoderModel, tokenizer, prompt: str, max_new_tokens: int, *,
           stop: Sequence[str] = (), **options) -> Iterator[str]:
    """Yield the continuation of a text prompt piece by piece, as the tokens are drawn.

    The text is cut just before the first `stop` string, which is not yielded; text that could
    still become a stop string, or an incomplete multi-byte character, is held back until it is
    settled (`TextTail`: each token costs the same, however long the text grows). `options` takes
    `generate_steps`'s keywords (a `sampling=` among them).
    """
    check_stop(stop)
    ids = encode_prompt(tokenizer, prompt)
    tail = TextTail(tokenizer.decode, stop, getattr(tokenizer, "decode_bytes", None))
    for step in generate_steps(model, torch.tensor([ids]), max_new_tokens, **options):
        piece = tail.push(int(step.tokens[0]))
        if piece:
            yield piece
        if tail.stopped:
            return
    piece = tail.flush()
    if piece:
        yield piece


def complete(model: TinyDecoderModel, tokenizer, prompt: str, max_new_tokens: int, *,
             stop: Sequence[str] = (), **options) -> str:
    """The continuation of a text prompt: `stream`, all at once."""
    return "".join(stream(model, tokenizer, prompt, max_new_tokens, stop=stop, **options))
