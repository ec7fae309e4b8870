"""Interop behaviour the broader tests leave open: no builtin is callable from a meta.pkl, a
missing weight is never mistaken for a missing bias, an untied head of the embeddings' shape is
kept, import run names, and the end-of-text id an export declares."""

from __future__ import annotations

import json
import pickle
import re

import pytest
import torch
from nanogpt_files import nanogpt_forward, nanogpt_state, write_meta, write_nanogpt

from tinygpt.interop import InteropError, default_run_name, read_meta, read_nanogpt


class _ExecWritesAFile:
    """Unpickling this with an unpickler that trusts `builtins` runs `exec`: a file appears."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return exec, (f"open({str(self.path)!r}, 'w').close()",)


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_a_meta_pkl_calling_builtins_exec_is_refused_without_running(tmp_path, protocol):
    """`builtins` holds `exec`, `eval` and `getattr`: trusting that module alone lets a pickle run
    any code. Protocol 0 reaches it through GLOBAL, later ones through STACK_GLOBAL."""
    marker = tmp_path / "ran"
    payload = pickle.dumps({"itos": _ExecWritesAFile(marker)}, protocol=protocol)
    assert b"builtin" in payload and b"exec" in payload  # __builtin__ before protocol 3
    (tmp_path / "meta.pkl").write_bytes(payload)
    with pytest.raises(InteropError, match="refusing"):
        read_meta(tmp_path / "meta.pkl")
    assert not marker.exists()


@pytest.mark.parametrize("missing", ["h.0.attn.c_proj.weight", "ln_f.weight", "wpe.weight"])
def test_a_bias_free_nanogpt_checkpoint_missing_a_weight_is_refused_by_name(tmp_path, missing):
    """`bias=False` checkpoints lack their biases, which are exactly zeros; a missing *weight* is
    a damaged file, and filling it with zeros would import a broken model without a word."""
    state = nanogpt_state(1, 2, 8, 5, 6, bias=False, seed=0)
    del state[f"transformer.{missing}"]
    path = write_nanogpt(tmp_path, state, n_layer=1, n_head=2, n_embd=8, vocab=5, block=6,
                         bias=False)
    write_meta(tmp_path, "abcde")
    with pytest.raises(InteropError, match=f"has no weight '{re.escape(missing)}'"):
        read_nanogpt(path)


def test_an_untied_nanogpt_head_of_the_embeddings_shape_is_kept(tmp_path):
    """A head trained apart from `wte` has the same shape as `wte` but other values: it must be
    imported as its own matrix, so the logits equal nanoGPT's forward with that head."""
    state = nanogpt_state(1, 2, 8, 5, 6, bias=True, seed=1)
    state["lm_head.weight"] = torch.randn(5, 8, generator=torch.Generator().manual_seed(9),
                                          dtype=torch.float64)
    path = write_nanogpt(tmp_path, state, n_layer=1, n_head=2, n_embd=8, vocab=5, block=6,
                         bias=True)
    write_meta(tmp_path, "abcde")
    model, _ = read_nanogpt(path)
    idx = torch.tensor([[0, 3, 1, 4, 2]])
    expected = nanogpt_forward(state, idx, n_head=2)
    torch.testing.assert_close(model(idx)[..., :5], expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("source, name", [
    ("nanogpt:out/shakespeare-char/ckpt.pt", "shakespeare-char"),
    ("hf:models/gpt2-tiny/", "gpt2-tiny"),
    ("hf:openai-community/gpt2", "gpt2"),
])
def test_an_import_is_named_after_its_model_not_its_file(source, name):
    """nanoGPT always writes `ckpt.pt`, so its run is named after the directory holding it."""
    assert default_run_name(source) == name


def test_an_export_names_an_end_of_text_token_only_when_the_tokenizer_has_one(tmp_path):
    """`<|endoftext|>` becomes GPT-2's bos/eos id only when the tokenizer holds it as one token;
    a tokenizer that spells it in several pieces has no end token, and none is declared (a
    piece of it would end every generation early)."""
    from tokenizers import Tokenizer as RawTokenizer

    from tinygpt import ModelConfig, TinyDecoderModel
    from tinygpt.interop import export_hf
    from tinygpt.tokenizer import BPETokenizer

    plain = BPETokenizer.train("the cat sat on the mat " * 20, vocab_size=270)
    raw = RawTokenizer.from_str(json.dumps(plain.to_dict()["tokenizer"]))
    raw.add_special_tokens(["<|endoftext|>"])
    for tokenizer, end in ((plain, None), (BPETokenizer(raw), plain.vocab_size)):
        assert (len(tokenizer.encode("<|endoftext|>")) == 1) == (end is not None)
        model = TinyDecoderModel(ModelConfig(vocab_size=tokenizer.vocab_size, d_model=8,
                                             n_heads=2, n_layers=1, d_ff=8, max_seq=8,
                                             norm_first=True, head_bias=False))
        out = export_hf(model, tokenizer, tmp_path / f"end-{end}")
        config = json.loads((out / "config.json").read_text())
        assert config["eos_token_id"] == config["bos_token_id"] == end
        special = json.loads((out / "tokenizer_config.json").read_text())
        assert ("eos_token" in special) == (end is not None)
