"""Corpus reading the broader data tests leave open: the offset of a bad byte that follows a
character cut between two blocks of the streamed read."""

from __future__ import annotations

import pytest

from tinygpt import data
from tinygpt.data import CorpusError


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
