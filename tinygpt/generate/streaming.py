"""A text prompt continued piece by piece as the tokens are drawn, cut before a stop string."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from tinygpt.generate.decoder import generate_steps
from tinygpt.generate.text import check_stop, encode_prompt, find_stop, held_back
from tinygpt.model import TinyDecoderModel


def stream(model: TinyDecoderModel, tokenizer, prompt: str, max_new_tokens: int, *,
           stop: Sequence[str] = (), **options) -> Iterator[str]:
    """Yield the continuation of a text prompt piece by piece, as the tokens are drawn.

    The text is cut just before the first `stop` string, which is not yielded; text that could
    still become a stop string, or an incomplete multi-byte character, is held back until it is
    settled. `options` takes `generate_steps`'s keywords (a `sampling=` among them).
    """
    check_stop(stop)
    ids = encode_prompt(tokenizer, prompt)
    new: list[int] = []
    sent = 0  # characters of the decoded continuation already yielded
    for step in generate_steps(model, torch.tensor([ids]), max_new_tokens, **options):
        new.append(int(step.tokens[0]))
        text = tokenizer.decode(new)
        if text.endswith("\ufffd"):
            continue  # a multi-byte character is still incomplete
        end = find_stop(text, stop)
        if end is not None:
            if end > sent:
                yield text[sent:end]
            return
        settled = len(text) - held_back(text, stop)
        if settled > sent:
            yield text[sent:settled]
            sent = settled
    text = tokenizer.decode(new)
    if len(text) > sent:
        yield text[sent:]


def complete(model: TinyDecoderModel, tokenizer, prompt: str, max_new_tokens: int, *,
             stop: Sequence[str] = (), **options) -> str:
    """The continuation of a text prompt: `stream`, all at once."""
    return "".join(stream(model, tokenizer, prompt, max_new_tokens, stop=stop, **options))
