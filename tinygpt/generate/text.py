"""Text around decoding: prompts encoded to token ids, and stop strings found in decoded text."""

from __future__ import annotations

from collections.abc import Sequence


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of a text prompt; an empty prompt starts from a newline.

    A tokenizer that cannot encode a character (a strict one) raises a ValueError naming it.
    """
    text = text or "\n"
    try:
        return tokenizer.encode(text)
    except (KeyError, ValueError) as error:
        raise ValueError(f"cannot encode the prompt: {error}") from error


def unknown_characters(tokenizer, text: str) -> list[str]:
    """Characters of `text` that do not survive an encode/decode round trip (mapped to `<unk>`)."""
    unknown = []
    for char in sorted(set(text)):
        try:
            survives = tokenizer.decode(tokenizer.encode(char)) == char
        except (KeyError, ValueError):
            survives = False
        if not survives:
            unknown.append(char)
    return unknown


def check_stop(stop: Sequence[str]) -> None:
    """Raise a ValueError unless `stop` is a list of non-empty strings (one string is not)."""
    if isinstance(stop, str) or not all(isinstance(s, str) and s for s in stop):
        raise ValueError(f"stop must be a list of non-empty strings, got {stop!r}.")


def find_stop(text: str, stop: Sequence[str]) -> int | None:
    """Index in `text` where the earliest stop string starts, or None."""
    found = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(found) if found else None


def held_back(text: str, stop: Sequence[str]) -> int:
    """Length of the longest end of `text` that is the start of a stop string."""
    return max((n for s in stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
