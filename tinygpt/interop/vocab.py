"""The tokenizers that come with real models, as TinyGPT tokenizers saved in every checkpoint.

GPT-2's byte-level BPE arrives as `tokenizer.json` (the `tokenizers` library's own file) or as
OpenAI's `vocab.json` + `merges.txt`; either becomes a `BPETokenizer`, so it is saved and loaded
like one TinyGPT trained itself.
"""

from __future__ import annotations

import json
from pathlib import Path

from tinygpt.interop.layout import InteropError
from tinygpt.tokenizer import BPETokenizer, Tokenizer, TokenizerError, load_tokenizer

END_OF_TEXT = "<|endoftext|>"  # GPT-2's one special token (id 50256)
BPE_FILES = ("tokenizer.json", "vocab.json", "merges.txt")


def read_bpe_directory(directory: Path) -> BPETokenizer | None:
    """The byte-level BPE saved in `directory` by `transformers` or OpenAI, or None if it has
    none. `tokenizer.json` wins over `vocab.json` + `merges.txt` when both are there."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    try:
        if (directory / "tokenizer.json").is_file():
            return BPETokenizer(RawTokenizer.from_file(str(directory / "tokenizer.json")))
        vocab, merges = directory / "vocab.json", directory / "merges.txt"
        if not (vocab.is_file() and merges.is_file()):
            return None
        raw = RawTokenizer(models.BPE.from_file(str(vocab), str(merges)))
    except Exception as error:  # the tokenizers library raises its own exception type
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise InteropError(f"cannot read the tokenizer in {str(directory)!r}: {message}") from None
    # GPT-2's own settings: no space added before the text, its regex splitting, bytes back on
    # decoding, and <|endoftext|> kept whole instead of being split into BPE pieces.
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    if END_OF_TEXT in raw.get_vocab():
        raw.add_special_tokens([END_OF_TEXT])
    return BPETokenizer(raw)


def read_tokenizer(path: str | Path) -> Tokenizer:
    """`--tokenizer PATH`: a directory holding GPT-2 tokenizer files, or a TinyGPT tokenizer JSON
    (as `tinygpt tokenizer train` writes)."""
    path = Path(path)
    if path.is_dir():
        found = read_bpe_directory(path)
        if found is None:
            raise InteropError(f"{str(path)!r} holds no tokenizer.json, nor vocab.json and "
                               f"merges.txt.")
        return found
    try:
        return load_tokenizer(path)
    except TokenizerError as error:
        raise InteropError(str(error)) from None


def fit_vocabulary(tokenizer: Tokenizer, vocab_size: int, source: str) -> Tokenizer:
    """`tokenizer` with exactly the model's `vocab_size` ids.

    A BPE smaller than the model (nanoGPT pads GPT-2's 50,257 tokens to 50,304 for speed) gets
    special tokens `<|unused:N|>` for the ids past its end: they are never produced by encoding, so
    every text keeps its ids, and the model's rows for them stay what they were.
    """
    missing = vocab_size - tokenizer.vocab_size
    if missing == 0:
        return tokenizer
    if missing < 0 or not isinstance(tokenizer, BPETokenizer):
        raise InteropError(f"{source}: the tokenizer has {tokenizer.vocab_size} tokens but the "
                           f"model {vocab_size}.")
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as RawTokenizer

    raw = RawTokenizer.from_str(json.dumps(tokenizer.to_dict()["tokenizer"]))
    start = tokenizer.vocab_size
    raw.add_special_tokens([AddedToken(f"<|unused:{i}|>", special=True)
                            for i in range(start, vocab_size)])
    return BPETokenizer(raw)
