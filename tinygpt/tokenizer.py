"""Text <-> token ids: a character tokenizer and a byte-level BPE, both saved as JSON.

Both expose the same small surface (`vocab_size`, `encode`, `decode`, `to_dict`, `save`), so the
data pipeline, the trainer and every checkpoint treat them alike; `load_tokenizer` reads either
back.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from tinygpt.files import read_json, write_atomic

UNK = "<unk>"
# What an `<unk>` id decodes to: visible in samples, and one character so positions stay aligned.
UNK_TEXT = "\N{REPLACEMENT CHARACTER}"


class TokenizerError(ValueError):
    """A tokenizer file or an input text the tokenizer cannot handle."""


class CharTokenizer:
    """One id per character of the training text, in sorted order, then `<unk>` last.

    Sorting (not `set` order, which changes between processes) keeps ids stable. Unknown characters
    become the `<unk>` id, or raise with the character and its position when `strict`.
    """

    kind = "char"

    def __init__(self, chars: Sequence[str], *, strict: bool = False):
        chars = list(chars)
        if not chars:
            raise TokenizerError("a character tokenizer needs at least one character.")
        bad = [c for c in chars if not isinstance(c, str) or len(c) != 1]
        if bad:
            raise TokenizerError(f"vocabulary entries must be single characters, got {bad[0]!r}.")
        if len(set(chars)) != len(chars):
            raise TokenizerError("the character vocabulary has duplicates.")
        self.chars = chars
        self.strict = strict
        self.unk_id = len(chars)
        self._ids = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str, *, strict: bool = False) -> CharTokenizer:
        return cls(sorted(set(text)), strict=strict)

    @classmethod
    def from_texts(cls, texts: Iterable[str], *, strict: bool = False) -> CharTokenizer:
        """The tokenizer of the characters of all `texts`, read one at a time (for example
        `tinygpt.data.text_chunks` of a corpus larger than memory)."""
        chars: set[str] = set()
        for text in texts:
            chars.update(text)
        return cls(sorted(chars), strict=strict)

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + 1

    def encode(self, text: str) -> list[int]:
        if self.strict:
            for position, char in enumerate(text):
                if char not in self._ids:
                    raise TokenizerError(
                        f"character {char!r} at position {position} is not in the vocabulary."
                    )
        return [self._ids.get(c, self.unk_id) for c in text]

    def decode(self, ids: Iterable[int]) -> str:
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise TokenizerError(
                    f"token id {i} is outside the vocabulary 0..{self.vocab_size - 1}.")
            out.append(self.chars[i] if i < self.unk_id else UNK_TEXT)
        return "".join(out)

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.kind, "chars": self.chars, "strict": self.strict}

    def save(self, path: str | os.PathLike) -> None:
        write_atomic(Path(path), json.dumps(self.to_dict(), ensure_ascii=False).encode("utf-8"))


class BPETokenizer:
    """Byte-level BPE from the `tokenizers` library: lossless on any UTF-8 text.

    Every byte is in the base alphabet, so nothing is ever unknown; merges learned from a corpus
    make frequent byte runs into single tokens.
    """

    kind = "bpe"

    def __init__(self, tokenizer: Any):
        self._tokenizer = tokenizer

    @classmethod
    def train(cls, texts: Iterable[str] | str, vocab_size: int) -> BPETokenizer:
        """Learn merges from `texts` until the vocabulary holds `vocab_size` tokens (> 256), or
        fewer when the texts run out of pairs to merge."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        alphabet = pre_tokenizers.ByteLevel.alphabet()
        too_small = not isinstance(vocab_size, int) or vocab_size <= len(alphabet)
        if isinstance(vocab_size, bool) or too_small:
            raise TokenizerError(
                f"BPE vocab_size must be an integer above the {len(alphabet)} byte tokens, "
                f"got {vocab_size!r}."
            )
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, initial_alphabet=alphabet, show_progress=False,
            special_tokens=[],
        )
        pieces = _chunks([texts] if isinstance(texts, str) else texts)
        tokenizer.train_from_iterator(pieces, trainer)
        return cls(tokenizer)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BPETokenizer:
        from tokenizers import Tokenizer

        try:
            return cls(Tokenizer.from_str(json.dumps(data["tokenizer"])))
        except Exception as error:  # the library raises its own exception type
            raise TokenizerError(f"cannot read the BPE tokenizer: {error}") from error

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise TokenizerError(
                    f"token id {i} is outside the vocabulary 0..{self.vocab_size - 1}.")
        return self._tokenizer.decode(ids, skip_special_tokens=False)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The bytes that `ids` stand for: `decode` is these, read as UTF-8 with every invalid
        sequence replaced by U+FFFD. A token can hold part of a character, so decoding a stream
        token by token needs the bytes (see `tinygpt.generate.text.TextTail`)."""
        ids = [int(i) for i in ids]
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise TokenizerError(
                    f"token id {i} is outside the vocabulary 0..{self.vocab_size - 1}.")
        to_byte = _byte_of_symbol()
        return bytes(to_byte[symbol] for i in ids for symbol in self._tokenizer.id_to_token(i))

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.kind, "tokenizer": json.loads(self._tokenizer.to_str())}

    def save(self, path: str | os.PathLike) -> None:
        write_atomic(Path(path), json.dumps(self.to_dict(), ensure_ascii=False).encode("utf-8"))


Tokenizer = CharTokenizer | BPETokenizer


def tokenizer_from_dict(data: dict[str, Any]) -> Tokenizer:
    """Rebuild a tokenizer from its `to_dict()`."""
    kind = data.get("type") if isinstance(data, dict) else None
    if kind == CharTokenizer.kind:
        if not isinstance(data.get("chars"), list):
            raise TokenizerError("a char tokenizer file needs a 'chars' list.")
        return CharTokenizer(data["chars"], strict=bool(data.get("strict", False)))
    if kind == BPETokenizer.kind:
        return BPETokenizer.from_dict(data)
    raise TokenizerError(f"unknown tokenizer type {kind!r}; expected 'char' or 'bpe'.")


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Read a tokenizer saved by `save` (either kind)."""
    path = Path(path)
    name = f"tokenizer file {str(path)!r}"
    if path.is_dir():
        raise TokenizerError(f"{name} is a directory; give the JSON file a tokenizer was saved to.")
    data = read_json(path, missing=TokenizerError(f"{name} does not exist."),
                     invalid=lambda error: TokenizerError(f"{name} is not valid JSON: {error}."))
    kind = data.get("type") if isinstance(data, dict) else None
    if kind not in (CharTokenizer.kind, BPETokenizer.kind):  # another library's, say
        raise TokenizerError(f"{name} is not a TinyGPT tokenizer: unknown tokenizer type "
                             f"{kind!r}; expected 'char' or 'bpe'.")
    return tokenizer_from_dict(data)


def _chunks(texts: Iterable[str], size: int = 1 << 16) -> Iterator[str]:
    """Feed the trainer pieces of bounded size, so a whole corpus is never one huge sequence."""
    for text in texts:
        for start in range(0, len(text), size):
            yield text[start:start + size]


@functools.cache
def _byte_of_symbol() -> dict[str, int]:
    """Byte-level BPE writes each byte as one printable symbol: the printable Latin-1 bytes as
    themselves, and the other 68 bytes (controls, space, soft hyphen) as the code points from 256
    on, in byte order. This is that map read backwards, symbol -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\N{INVERTED EXCLAMATION MARK}"),
                 ord("\N{NOT SIGN}") + 1), *range(ord("\N{REGISTERED SIGN}"), 256)]
    others = [b for b in range(256) if b not in printable]
    symbols = {chr(b): b for b in printable}
    symbols.update({chr(256 + n): b for n, b in enumerate(others)})
    return symbols
