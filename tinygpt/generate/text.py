"""Text around decoding: prompts encoded to token ids, and stop strings found in decoded text."""

from __future__ import annotations

import codecs
from collections.abc import Callable, Sequence


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


class TextTail:
    """One row's new text, decoded as its tokens arrive, with constant work per token.

    `push(token)` decodes that token alone and returns the text now safe to show. With
    `decode_bytes` (a byte-level BPE's), the token's bytes go through an incremental UTF-8
    decoder, which holds back a character cut between tokens and replaces invalid bytes by U+FFFD
    exactly as decoding the whole stream would; without it (a character tokenizer), `decode` of
    one token is its text. Text that could still begin a stop string is held back too, and the
    search for a stop string looks only at that held-back end and the new piece. `stopped` turns
    True at the token that completes a stop string; the text before it has then been returned,
    and nothing after it. `flush()` returns what is held back, as the text ends there.

    The pieces join to exactly what decoding all the tokens at once gives, cut before the first
    stop string.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = (),
                 decode_bytes: Callable[[list[int]], bytes] | None = None):
        self.decode, self.decode_bytes, self.stop = decode, decode_bytes, list(stop)
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.unsent = ""  # settled text held back because a stop string could begin in it
        self.stopped = False

    def push(self, token: int) -> str:
        """The text that `token` settles (often "", never anything once stopped)."""
        if self.stopped:
            return ""
        if self.decode_bytes is None:
            piece = self.decode([token])
        else:
            piece = self.utf8.decode(self.decode_bytes([token]))
        return self._settle(self.unsent + piece, final=False)

    def flush(self) -> str:
        """Whatever is still held back, as the text ends here (cut before a stop string)."""
        if self.stopped:
            return ""
        return self._settle(self.unsent + self.utf8.decode(b"", final=True), final=True)

    def _settle(self, text: str, final: bool) -> str:
        end = find_stop(text, self.stop)
        if end is not None:
            self.stopped, self.unsent = True, ""
            return text[:end]
        settled = len(text) if final else len(text) - held_back(text, self.stop)
        self.unsent = text[settled:]
        return text[:settled]
