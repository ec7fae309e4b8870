"""Corpus reading the broader data tests leave open: the offset of a bad byte that follows a
character cut between two blocks, a cache meta whose split overruns its tokens, and the share of
unknown tokens counted block by block."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tinygpt import data
from tinygpt.data import CorpusError, TokenData
from tinygpt.tokenizer import CharTokenizer


@pytest.mark.parametrize("chunk_chars", [1, 2, 3])
def test_a_bad_byte_is_reported_at_its_offset_wherever_the_blocks_cut(tmp_path, chunk_chars):
    """The streamed reader names the same byte and offset as decoding the whole file at once,
    for every shift of the text against its blocks: some cut a two-byte character in half just
    before the bad byte."""
    corpus = tmp_path / "bad.txt"
    for lead in range(8):
        blob = b"a" * lead + "é".encode() * 5 + b"\xff" + b"tail"
        corpus.write_bytes(blob)
        with pytest.raises(CorpusError) as whole:
            data.read_text(corpus)
        with pytest.raises(CorpusError) as streamed:
            list(data.text_chunks(corpus, chunk_chars))
        assert str(streamed.value) == str(whole.value), (lead, chunk_chars)
        assert str(whole.value).endswith(f"byte 0xff at offset {lead + 10}.")


def test_a_cache_meta_whose_split_runs_past_its_tokens_is_damaged_and_rebuilt(tmp_path):
    """A meta.json whose train split is longer than the token file would leave no validation
    tokens at all; it is damage, repaired like a corrupted token file."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("to be or not to be, that is the question\n" * 20, encoding="utf-8")
    tokenizer = CharTokenizer.from_text(corpus.read_text(encoding="utf-8"))
    first = data.cached_tokens(corpus, tokenizer, tmp_path / "cache")
    where = data.token_cache_dir(corpus, tokenizer, tmp_path / "cache")
    n_train, n_val = len(first.train), len(first.val)
    del first
    meta = json.loads((where / "meta.json").read_text(encoding="utf-8"))
    meta["n_train"] = meta["n_tokens"] + 5
    (where / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    with pytest.raises(data.DamagedCacheError, match="meta.json lacks a field or holds a bad"):
        TokenData.open(where)
    again = data.cached_tokens(corpus, tokenizer, tmp_path / "cache")
    assert again.repaired is not None and "meta.json" in again.repaired
    assert (len(again.train), len(again.val)) == (n_train, n_val)


@pytest.mark.parametrize("block", [1, 2, 3, 7, 100])
def test_the_unknown_share_counts_every_token_whatever_the_block(block):
    """The share of `<unk>` ids, counted block by block over a memory map, equals the count
    over the whole array, for blocks that do and do not divide its length."""
    tokenizer = CharTokenizer(list("abc"))
    ids = np.array(tokenizer.encode("ab?c??a?bc???a"), dtype=np.uint16)  # "?" is <unk>
    assert data.unknown_share(ids, tokenizer, block=block) == 7 / 14
