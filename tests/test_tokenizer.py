"""Tokenizers: lossless round trips, unknown characters, save/load, and clear errors."""

import json
import subprocess
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tokenizers import pre_tokenizers

from tinygpt.tokenizer import (
    UNK_TEXT,
    BPETokenizer,
    CharTokenizer,
    TokenizerError,
    load_tokenizer,
)

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
CHAR = CharTokenizer.from_text(TEXT)
BPE = BPETokenizer.train(TEXT * 20, vocab_size=300)


def test_char_vocab_is_sorted_with_unk_last():
    assert CHAR.chars == sorted(set(TEXT))
    assert CHAR.vocab_size == len(set(TEXT)) + 1
    assert CHAR.unk_id == CHAR.vocab_size - 1


def test_char_vocab_is_stable_across_processes():
    """`set` order depends on the per-process string hash seed; the vocabulary must not."""
    code = ("from tinygpt.tokenizer import CharTokenizer as C; "
            f"print(''.join(C.from_text({TEXT!r}).chars))")
    seen = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={"PYTHONHASHSEED": str(seed)}).stdout
        for seed in (1, 2)
    }
    assert seen == {"".join(CHAR.chars) + "\n"}


@given(st.text(alphabet=sorted(set(TEXT))))
def test_char_roundtrip_over_vocabulary(text):
    assert CHAR.decode(CHAR.encode(text)) == text


@given(st.text())
def test_char_unknown_characters_never_crash(text):
    ids = CHAR.encode(text)
    assert len(ids) == len(text)
    assert all(0 <= i < CHAR.vocab_size for i in ids)
    decoded = CHAR.decode(ids)
    assert all(d == c or (d == UNK_TEXT and c not in CHAR.chars) for d, c in zip(decoded, text))


def test_char_unknown_maps_to_unk():
    assert CHAR.encode("F#") == [CHAR.chars.index("F"), CHAR.unk_id]


def test_char_strict_names_character_and_position():
    strict = CharTokenizer.from_text(TEXT, strict=True)
    with pytest.raises(TokenizerError, match=r"'#' at position 2"):
        strict.encode("Fi#")


def test_char_decode_rejects_out_of_range_id():
    with pytest.raises(TokenizerError, match=f"token id {CHAR.vocab_size}"):
        CHAR.decode([CHAR.vocab_size])


@given(st.text())
def test_bpe_is_lossless_on_any_text(text):
    ids = BPE.encode(text)
    assert all(0 <= i < BPE.vocab_size for i in ids)
    assert BPE.decode(ids) == text


def test_bpe_learns_merges():
    assert BPE.vocab_size == 300
    assert len(BPE.encode(TEXT)) < len(TEXT.encode("utf-8")) / 2


def test_bpe_vocab_must_exceed_bytes():
    with pytest.raises(TokenizerError, match="256"):
        BPETokenizer.train(TEXT, vocab_size=100)


@pytest.mark.parametrize("tokenizer", [CHAR, BPE], ids=["char", "bpe"])
def test_save_and_load_roundtrip(tmp_path, tokenizer):
    path = tmp_path / "tok.json"
    tokenizer.save(path)
    loaded = load_tokenizer(path)
    assert type(loaded) is type(tokenizer)
    assert loaded.vocab_size == tokenizer.vocab_size
    assert loaded.to_dict() == tokenizer.to_dict()
    sample = TEXT + "é∑🙂"
    assert loaded.encode(sample) == tokenizer.encode(sample)


def test_load_rejects_missing_bad_json_and_unknown_type(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="not valid JSON"):
        load_tokenizer(tmp_path / "bad.json")
    (tmp_path / "odd.json").write_text(json.dumps({"type": "wordpiece"}))
    with pytest.raises(TokenizerError, match="unknown tokenizer type 'wordpiece'"):
        load_tokenizer(tmp_path / "odd.json")


def test_bpe_bytes_read_as_utf8_are_its_decode_for_any_ids():
    """`decode_bytes` against the tokenizers library's own decode, on random id sequences (token
    boundaries inside characters, invalid bytes): the bytes, read as UTF-8 with replacement, are
    the text."""
    tokenizer = BPETokenizer.train("Thé café à Noël coûte 5 € — ça va? 😀 " * 20, vocab_size=300)
    generator = torch.Generator().manual_seed(0)
    for length in range(1, 400):
        ids = torch.randint(tokenizer.vocab_size, (length % 13 + 1,), generator=generator).tolist()
        assert tokenizer.decode_bytes(ids).decode("utf-8", "replace") == tokenizer.decode(ids)
    every_byte = [tokenizer._tokenizer.token_to_id(s) for s in pre_tokenizers.ByteLevel.alphabet()]
    assert sorted(tokenizer.decode_bytes(every_byte)) == list(range(256))
    with pytest.raises(TokenizerError, match="token id 300 is outside the vocabulary"):
        tokenizer.decode_bytes([300])
