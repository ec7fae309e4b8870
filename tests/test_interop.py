"""Real models in and out: GPT-2 checkpoints of `transformers` and nanoGPT checkpoints imported,
TinyGPT runs exported, each checked against a forward pass TinyGPT's code has no part in.

Oracles: `transformers.GPT2LMHeadModel` (eager attention, so it returns its attention weights),
transformers' own GPT-2 tokenizer, and a nanoGPT forward written below in plain torch ops.
Tolerances: fp64 rtol = atol = 1e-10 (the two sides differ only in summation order, ~1e-16 per
op), fp32 1e-5 (GPT-2 small's 12 layers, ~1e-6 measured). Nothing here touches the network.
"""

from __future__ import annotations

import itertools
import json
import os
import pickle
import pickletools
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from nanogpt_files import nanogpt_forward, nanogpt_state, write_meta, write_nanogpt
from safetensors.torch import load_file, save_file
from tokenizers import pre_tokenizers

from tinygpt import cli
from tinygpt.checkpoint import load_checkpoint
from tinygpt.config import ModelConfig
from tinygpt.generate import generate
from tinygpt.inspection import run_with_cache
from tinygpt.interop import (
    InteropError,
    export_checkpoint,
    export_hf,
    import_checkpoint,
    read_hf,
    read_meta,
    read_nanogpt,
)
from tinygpt.interop.nanogpt import UNK_LOGIT
from tinygpt.interop.vocab import read_bpe_directory
from tinygpt.model import TinyDecoderModel, parameter_table
from tinygpt.pictures import display_token
from tinygpt.tokenizer import BPETokenizer, CharTokenizer

transformers = pytest.importorskip("transformers")

FP64 = dict(rtol=1e-10, atol=1e-10)
FP32 = dict(rtol=1e-5, atol=1e-5)
END = "<|endoftext|>"
ALPHABET = sorted(pre_tokenizers.ByteLevel.alphabet())  # GPT-2's 256 byte characters
# Each example builds, saves and reloads models: no shrinking (a failure shows its example).
FEW = dict(phases=[Phase.explicit, Phase.generate])
ROOT = Path(__file__).resolve().parent.parent
TEXT = "the cat sat on the mat; Élan vital\n\tthe end"


# --- GPT-2 checkpoints written by transformers -----------------------------------------------

def write_tokenizer(directory: Path, vocab_size: int, *, files: str = "tokenizer.json") -> None:
    """A byte-level BPE in GPT-2's layout (256 bytes, merges, `<|endoftext|>` last) with exactly
    `vocab_size` ids, saved as `vocab.json` + `merges.txt` or by transformers as tokenizer.json."""
    pairs = itertools.product("Ġtheacsmno" + "".join(ALPHABET), repeat=2)
    vocab = {c: i for i, c in enumerate(ALPHABET)}
    merges = []
    for a, b in pairs:
        if len(vocab) == vocab_size - 1:
            break
        if a + b not in vocab:
            vocab[a + b] = len(vocab)
            merges.append(f"{a} {b}")
    vocab[END] = len(vocab)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n",
                                          encoding="utf-8")
    if files == "tokenizer.json":
        hf_tokenizer(directory).save_pretrained(directory)
        (directory / "vocab.json").unlink()
        (directory / "merges.txt").unlink()


def hf_tokenizer(directory: Path):
    """transformers' own GPT-2 tokenizer of `directory`: the oracle for ours."""
    if (directory / "tokenizer.json").exists():
        return transformers.AutoTokenizer.from_pretrained(directory)
    return transformers.GPT2Tokenizer(str(directory / "vocab.json"),
                                      str(directory / "merges.txt"))


def hf_model(directory: Path, dtype: torch.dtype, seed: int, *, every_parameter: bool = True,
             **config) -> object:
    """A random GPT2LMHeadModel saved with `save_pretrained` into `directory`, in eval mode with
    eager attention. transformers draws the weights; `every_parameter` draws the LayerNorms and
    biases too (which it starts at 1 and 0), so that a misplaced one shows."""
    torch.manual_seed(seed)
    gpt2_config = transformers.GPT2Config(bos_token_id=None, eos_token_id=None,
                                          attn_implementation="eager", **config)
    model = transformers.GPT2LMHeadModel(gpt2_config).to(dtype).eval()
    with torch.no_grad():
        for name, param in model.named_parameters() if every_parameter else ():
            if "ln" in name and name.endswith("weight"):
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0.0, 0.02 if param.ndim == 2 else 0.1)
    model.save_pretrained(directory)
    return model


def load_hf(directory: Path, dtype: torch.dtype):
    model = transformers.GPT2LMHeadModel.from_pretrained(directory, attn_implementation="eager",
                                                         dtype=dtype)
    return model.eval()


def hf_logits_and_patterns(model, idx):
    with torch.no_grad():
        out = model(idx, output_attentions=True)
    return out.logits, out.attentions


def tinygpt_logits_and_patterns(model: TinyDecoderModel, idx):
    names = [f"blocks.{n}.attention.hook_pattern" for n in range(model.config.n_layers)]
    with torch.no_grad():
        logits, cache = run_with_cache(model, idx, names)
    return logits, [cache[name] for name in names]


def hf_greedy(model, idx, n: int):
    with torch.no_grad():
        return model.generate(idx, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              pad_token_id=0)


def assert_same_model(hf, ours: TinyDecoderModel, idx, tol) -> None:
    """Logits, every attention pattern, and 20 greedy tokens equal to transformers'."""
    hf_logits, hf_patterns = hf_logits_and_patterns(hf, idx)
    logits, patterns = tinygpt_logits_and_patterns(ours, idx)
    torch.testing.assert_close(logits, hf_logits, **tol)
    assert len(patterns) == len(hf_patterns)
    for layer, (pattern, hf_pattern) in enumerate(zip(patterns, hf_patterns)):
        torch.testing.assert_close(pattern, hf_pattern, **tol, msg=f"layer {layer}")
    prompt = idx[:1, :4]
    assert torch.equal(generate(ours, prompt, 20, temperature=0.0), hf_greedy(hf, prompt, 20))


@st.composite
def gpt2_configs(draw):
    n_head = draw(st.integers(1, 4))
    n_embd = n_head * draw(st.integers(1, 8))
    return dict(
        vocab_size=draw(st.integers(258, 300)), n_positions=draw(st.integers(24, 40)),
        n_embd=n_embd, n_layer=draw(st.integers(1, 3)), n_head=n_head,
        n_inner=draw(st.one_of(st.none(), st.integers(1, 40))),
        activation_function=draw(st.sampled_from(["gelu_new", "gelu", "relu",
                                                  "gelu_pytorch_tanh"])),
        layer_norm_epsilon=draw(st.sampled_from([1e-5, 1e-3])),
        tie_word_embeddings=draw(st.booleans()),
    )


@settings(max_examples=6, **FEW)
@given(config=gpt2_configs(), seed=st.integers(0, 2**16),
       files=st.sampled_from(["tokenizer.json", "vocab.json"]))
def test_hf_import_equals_transformers_fp64(tmp_path_factory, config, seed, files):
    directory = tmp_path_factory.mktemp("hf")
    hf = hf_model(directory, torch.float64, seed, **config)
    write_tokenizer(directory, config["vocab_size"], files=files)
    imported = import_checkpoint(f"hf:{directory}", directory / "runs" / "gpt2")
    idx = torch.randint(0, config["vocab_size"], (2, config["n_positions"]),
                        generator=torch.Generator().manual_seed(seed))
    assert_same_model(hf, imported.model, idx, FP64)
    assert imported.model.config.tie_embeddings == config["tie_word_embeddings"]
    assert imported.tokenizer.encode(TEXT) == hf_tokenizer(directory).encode(TEXT)
    # The checkpoint written is an ordinary one: it loads (in fp32, TinyGPT's dtype) with the
    # same weights.
    loaded = load_checkpoint(imported.checkpoint).model.state_dict()
    assert loaded.keys() == imported.model.state_dict().keys()
    for name, tensor in imported.model.state_dict().items():
        assert torch.equal(loaded[name], tensor.float()), name


@pytest.mark.slow
def test_hf_import_at_gpt2_small_sizes_fp32(tmp_path):
    """GPT-2 small's own sizes (124M parameters, 50,257 tokens, 1,024 positions), in fp32."""
    hf = hf_model(tmp_path, torch.float32, seed=0, every_parameter=False)
    assert sum(p.numel() for p in hf.parameters()) == 124_439_808
    write_tokenizer(tmp_path, 50257, files="vocab.json")
    model, tokenizer = read_hf(str(tmp_path))
    assert model.config == ModelConfig.preset("gpt2", dropout=0.1)
    assert sum(p.numel() for p in model.parameters()) == 124_439_808
    idx = torch.randint(0, 50257, (1, 24), generator=torch.Generator().manual_seed(0))
    assert_same_model(hf, model, idx, FP32)
    assert tokenizer.encode(TEXT) == hf_tokenizer(tmp_path).encode(TEXT)


@settings(max_examples=4, **FEW)
@given(config=gpt2_configs(), seed=st.integers(0, 2**16))
def test_export_loads_in_transformers_with_the_same_logits(tmp_path_factory, config, seed):
    directory = tmp_path_factory.mktemp("hf")
    hf_model(directory, torch.float64, seed, **config)
    write_tokenizer(directory, config["vocab_size"])
    model, tokenizer = read_hf(str(directory))
    out = export_hf(model, tokenizer, directory / "exported")
    exported = load_hf(out, torch.float64)
    idx = torch.randint(0, config["vocab_size"], (2, config["n_positions"]),
                        generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        torch.testing.assert_close(exported(idx).logits, model(idx), **FP64)
    assert hf_tokenizer(out).encode(TEXT) == tokenizer.encode(TEXT)
    # and back: HF -> TinyGPT -> HF gives transformers the very tensors it saved
    original = load_hf(directory, torch.float64).state_dict()
    for name, tensor in exported.state_dict().items():
        assert torch.equal(tensor, original[name]), name


@settings(max_examples=6, **FEW)
@given(seed=st.integers(0, 2**16), n_heads=st.integers(1, 4), d_head=st.integers(1, 6),
       activation=st.sampled_from(["gelu_tanh", "gelu", "relu"]), tied=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_tinygpt_to_hf_to_tinygpt_is_bitwise(tmp_path_factory, seed, n_heads, d_head, activation,
                                             tied, dtype):
    tokenizer = BPETokenizer.train("the cat sat on the mat " * 20, vocab_size=270)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, d_model=n_heads * d_head,
                         n_heads=n_heads, n_layers=2, d_ff=12, max_seq=16, norm_first=True,
                         activation=activation, tie_embeddings=tied, head_bias=False)
    torch.manual_seed(seed)
    model = TinyDecoderModel(config).to(dtype)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_()
    out = export_hf(model, tokenizer, tmp_path_factory.mktemp("rt") / "hf")
    back, back_tokenizer = read_hf(str(out))
    assert back.config == config
    assert back.state_dict().keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name
    assert back_tokenizer.to_dict() == tokenizer.to_dict()


def test_cli_import_then_generate_and_export(tmp_path):
    """`tinygpt import` and `tinygpt export` as a user runs them, in their own interpreter."""
    source = tmp_path / "hf"
    hf = hf_model(source, torch.float32, seed=3, vocab_size=280, n_positions=32, n_embd=16,
                  n_layer=2, n_head=4)
    write_tokenizer(source, 280)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-m", "tinygpt", "import", "--from", f"hf:{source}",
                          "--runs-dir", str(tmp_path / "runs"), "--name", "small"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "ckpt-00000000" in run.stdout
    assert cli.main(["export", "--checkpoint", str(tmp_path / "runs" / "small"), "--to", "hf",
                     str(tmp_path / "out")]) == 0
    exported = load_hf(tmp_path / "out", torch.float32)
    idx = torch.randint(0, 280, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(exported(idx).logits, hf(idx).logits, **FP32)


def test_hub_name_offline_is_one_sentence(tmp_path):
    """hf:NAME with the Hub unreachable (HF_ENDPOINT on a closed loopback port): one sentence
    that says so and how to pass a directory instead; exit 2; no run directory."""
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_DISABLE_TELEMETRY": "1", "PYTHONPATH": str(ROOT)}
    env.pop("HF_HUB_OFFLINE", None)
    run = subprocess.run([sys.executable, "-m", "tinygpt", "import", "--from",
                          "hf:openai-community/gpt2", "--runs-dir", str(tmp_path / "runs")],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert "unreachable" in lines[0] and "hf:DIR" in lines[0]
    assert not (tmp_path / "runs").exists()


# --- nanoGPT checkpoints ----------------------------------------------------------------------

@pytest.mark.parametrize("bias, compiled", [(True, False), (False, False), (False, True)])
def test_nanogpt_import_equals_an_independent_forward(tmp_path, bias, compiled):
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n"
    sizes = dict(n_layer=2, n_head=3, n_embd=12, block=16, bias=bias)
    meta_dir = tmp_path / "out-shakespeare-char"
    meta_dir.mkdir()
    meta = write_meta(meta_dir, text)
    vocab = meta["vocab_size"]
    state = nanogpt_state(sizes["n_layer"], sizes["n_head"], sizes["n_embd"], vocab,
                          sizes["block"], bias, seed=1)
    path = write_nanogpt(meta_dir, state, vocab=vocab, compiled=compiled, **sizes)
    imported = import_checkpoint(f"nanogpt:{path}", tmp_path / "runs" / "char")
    model, tokenizer = imported.model, imported.tokenizer
    ids = [meta["stoi"][c] for c in text[:16]]
    assert tokenizer.encode(text[:16]) == ids  # nanoGPT's own ids, char for char
    assert tokenizer.decode(ids) == text[:16]
    idx = torch.tensor([ids])
    with torch.no_grad():
        logits = model(idx)
        expected = nanogpt_forward(state, idx, sizes["n_head"])
    torch.testing.assert_close(logits[..., :vocab], expected, **FP64)
    # TinyGPT's <unk> (one id past nanoGPT's) can never be produced: its probability is 0.
    assert torch.all(logits[..., vocab] == UNK_LOGIT)
    assert torch.all(logits.softmax(-1)[..., vocab] == 0)
    torch.testing.assert_close(logits.softmax(-1)[..., :vocab], expected.softmax(-1), **FP64)
    assert load_checkpoint(imported.checkpoint).tokenizer.encode(text) == tokenizer.encode(text)


def test_nanogpt_bpe_run_takes_gpt2_tokenizer_padded_to_its_vocabulary(tmp_path):
    """A GPT-2 BPE run (no meta.pkl) pads 50,257 tokens to 50,304 in nanoGPT: here 270 -> 280."""
    write_tokenizer(tmp_path / "gpt2", 270)
    state = nanogpt_state(1, 2, 8, 280, 8, True, seed=2)
    path = write_nanogpt(tmp_path / "run", state, n_layer=1, n_head=2, n_embd=8, vocab=280,
                         block=8, bias=True)
    model, tokenizer = read_nanogpt(path, tokenizer=tmp_path / "gpt2")
    assert tokenizer.vocab_size == 280
    assert tokenizer.encode(TEXT) == hf_tokenizer(tmp_path / "gpt2").encode(TEXT)
    idx = torch.tensor([tokenizer.encode("the cat")])
    with torch.no_grad():
        torch.testing.assert_close(model(idx), nanogpt_forward(state, idx, 2), **FP64)


def test_tied_embeddings_share_one_tensor_after_import(tmp_path):
    state = nanogpt_state(1, 2, 8, 20, 8, False, seed=3)
    path = write_nanogpt(tmp_path, state, n_layer=1, n_head=2, n_embd=8, vocab=20, block=8,
                         bias=False)
    write_meta(tmp_path, "abcdefghijklmnopqrst")
    imported = import_checkpoint(f"nanogpt:{path}", tmp_path / "runs" / "tied")
    for model in (imported.model, load_checkpoint(imported.checkpoint).model):
        assert model.lm_head.weight is model.embedding.weight
        unique = {id(p): p for p in model.parameters()}
        assert sum(p.numel() for p in model.parameters()) == sum(
            p.numel() for p in unique.values())
        # nanoGPT's own count (wte once, its mask buffers not at all) + TinyGPT's zero biases
        # (bias=False) and the <unk> row with its head bias.
        nanogpt_count = sum(v.numel() for k, v in state.items()
                            if k != "lm_head.weight" and not k.endswith(".attn.bias"))
        zero_biases = 1 * (8 + 24 + 8 + 8 + 32 + 8) + 8
        unk = 8 + 21
        assert sum(count for _, count in parameter_table(model)) == (
            nanogpt_count + zero_biases + unk)
        before = model.embedding.weight.detach().clone()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        model(torch.tensor([[1, 2, 3]])).sum().backward()
        optimizer.step()
        assert not torch.equal(model.embedding.weight, before)
        assert torch.equal(model.lm_head.weight, model.embedding.weight)


class _CreatesAFile:
    """Unpickling this with a permissive unpickler calls open(path, "w"): a file appears."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def test_malicious_meta_pkl_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"vocab_size": 2, "itos": _CreatesAFile(marker)})
    # It really would run code: the pickle calls a global (builtins.open)...
    opcodes = [op.name for op, _, _ in pickletools.genops(payload)]
    assert "STACK_GLOBAL" in opcodes and "REDUCE" in opcodes and b"open" in payload
    (tmp_path / "meta.pkl").write_bytes(payload)
    with pytest.raises(InteropError, match="refusing"):
        read_meta(tmp_path / "meta.pkl")
    assert not marker.exists()  # ...and nothing ran.
    # Plain data of other kinds (a list, a float) is refused too; dicts, str and int pass.
    (tmp_path / "meta.pkl").write_bytes(pickle.dumps({"itos": [1.5]}))
    with pytest.raises(InteropError, match="refusing"):
        read_meta(tmp_path / "meta.pkl")
    (tmp_path / "meta.pkl").write_bytes(pickle.dumps({"itos": {0: "a"}, "stoi": {"a": 0}}))
    assert read_meta(tmp_path / "meta.pkl") == {"itos": {0: "a"}, "stoi": {"a": 0}}


def test_char_vocabulary_keeps_nanogpt_order_not_sorted(tmp_path):
    """ids follow `itos`, even out of sorted order (where CharTokenizer.from_text would sort)."""
    state = nanogpt_state(1, 1, 4, 3, 4, True, seed=4)
    path = write_nanogpt(tmp_path, state, n_layer=1, n_head=1, n_embd=4, vocab=3, block=4,
                         bias=True)
    meta = {"vocab_size": 3, "itos": {0: "z", 1: "a", 2: "m"}, "stoi": {"z": 0, "a": 1, "m": 2}}
    (tmp_path / "meta.pkl").write_bytes(pickle.dumps(meta))
    _, tokenizer = read_nanogpt(path)
    assert isinstance(tokenizer, CharTokenizer)
    assert tokenizer.encode("zam") == [0, 1, 2] and tokenizer.encode("?") == [3]


# --- bad inputs: one sentence, exit code 2, nothing written ----------------------------------

def _import_fails(tmp_path, capsys, source: str, *words: str) -> None:
    runs = tmp_path / "runs"
    capsys.readouterr()  # what writing the bad input printed is not the command's output
    code = cli.main(["import", "--from", source, "--runs-dir", str(runs), "--name", "bad"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("tinygpt: error: ")
    for word in words:
        assert word in err, err
    assert not (runs / "bad").exists()


@pytest.fixture
def small_hf(tmp_path):
    directory = tmp_path / "hf"
    hf_model(directory, torch.float32, seed=5, vocab_size=270, n_positions=8, n_embd=8,
             n_layer=1, n_head=2)
    write_tokenizer(directory, 270)
    return directory


def test_bad_hf_directories(tmp_path, capsys, small_hf):
    (small_hf / "model.safetensors").rename(tmp_path / "weights")
    _import_fails(tmp_path, capsys, f"hf:{small_hf}", "has no weights")
    # a truncated safetensors file
    data = (tmp_path / "weights").read_bytes()
    (small_hf / "model.safetensors").write_bytes(data[: len(data) // 2])
    _import_fails(tmp_path, capsys, f"hf:{small_hf}", "cannot read")
    (small_hf / "model.safetensors").write_bytes(data)
    config = json.loads((small_hf / "config.json").read_text())
    # shapes that disagree with the config
    (small_hf / "config.json").write_text(json.dumps({**config, "n_embd": 16}))
    _import_fails(tmp_path, capsys, f"hf:{small_hf}", "shape")
    # another architecture
    (small_hf / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    _import_fails(tmp_path, capsys, f"hf:{small_hf}", "model_type", "llama")
    (small_hf / "config.json").write_text(json.dumps({**config, "scale_attn_weights": False}))
    _import_fails(tmp_path, capsys, f"hf:{small_hf}", "scale_attn_weights")
    (small_hf / "config.json").write_text(json.dumps(config))
    (small_hf / "tokenizer.json").unlink()
    _import_fails(tmp_path, capsys, f"hf:{small_hf}", "no tokenizer")


def test_bad_nanogpt_checkpoints(tmp_path, capsys):
    state = nanogpt_state(1, 2, 8, 5, 8, True, seed=6)
    path = write_nanogpt(tmp_path / "run", state, n_layer=1, n_head=2, n_embd=8, vocab=5,
                         block=8, bias=True)
    _import_fails(tmp_path, capsys, f"nanogpt:{path}", "meta.pkl")
    write_meta(tmp_path / "run", "abcde")
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["model_args"]["n_embd"] = 16
    torch.save(checkpoint, path)
    _import_fails(tmp_path, capsys, f"nanogpt:{path}", "shape")
    path.write_bytes(path.read_bytes()[:100])
    _import_fails(tmp_path, capsys, f"nanogpt:{path}", "cannot read")
    _import_fails(tmp_path, capsys, "gguf:model.bin", "hf:DIR")


@pytest.mark.parametrize("field, value", [
    ("norm_first", False), ("head_bias", True), ("attn_only", True), ("seed_input_scale", True),
    ("position", "rope"), ("position", "alibi"), ("position", "none"), ("window", 4),
    ("n_kv_heads", 1)])
def test_export_refuses_what_gpt2_cannot_express(tmp_path, capsys, field, value):
    tokenizer = CharTokenizer.from_text("abc")
    exportable = dict(norm_first=True, activation="gelu", head_bias=False)
    config = ModelConfig(vocab_size=4, d_model=8, n_heads=2, n_layers=1, d_ff=8, max_seq=8,
                         **{**exportable, field: value})
    from tinygpt.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "run", model=TinyDecoderModel(config), tokenizer=tokenizer, step=1)
    code = cli.main(["export", "--checkpoint", str(tmp_path / "run"), "--to", "hf",
                     str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and field in err
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_export_of_a_char_model_writes_no_tokenizer(tmp_path):
    tokenizer = CharTokenizer.from_text("abc")
    config = ModelConfig(vocab_size=4, d_model=8, n_heads=2, n_layers=1, d_ff=8, max_seq=8,
                         norm_first=True, activation="gelu", head_bias=False)
    from tinygpt.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "run", model=TinyDecoderModel(config), tokenizer=tokenizer, step=1)
    out = export_checkpoint(tmp_path / "run", tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]


def test_every_byte_level_token_has_a_visible_one_line_label(tmp_path):
    """GPT-2's vocabulary has a token for every byte, control bytes included: each one's label
    (as `inspect` makes it: the token decoded alone, then `display_token`) is printable, has no
    whitespace and is not empty; a leading space shows as `·`."""
    write_tokenizer(tmp_path, 300)
    tokenizer = read_bpe_directory(tmp_path)
    labels = [display_token(tokenizer.decode([i])) for i in range(tokenizer.vocab_size)]
    for i, label in enumerate(labels):
        assert label and label.isprintable() and not any(c.isspace() for c in label), (i, label)
    assert [display_token(tokenizer.decode([i])) for i in tokenizer.encode(" t")] == ["·t"]
    assert display_token("\x1b[0m") == "\\x1b[0m"


def test_hub_layout_without_prefix_and_with_mask_buffers(tmp_path):
    """The files on the Hub were saved from GPT2Model: names without `transformer.`, no
    `lm_head`, and each layer's causal-mask buffers (`attn.bias`, `attn.masked_bias`)."""
    hf = hf_model(tmp_path, torch.float64, seed=7, vocab_size=270, n_positions=8, n_embd=8,
                  n_layer=2, n_head=2)
    write_tokenizer(tmp_path, 270)
    weights = load_file(tmp_path / "model.safetensors")
    hub = {k.removeprefix("transformer."): v for k, v in weights.items() if k != "lm_head.weight"}
    for n in range(2):
        hub[f"h.{n}.attn.bias"] = torch.tril(torch.ones(8, 8)).view(1, 1, 8, 8)
        hub[f"h.{n}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(hub, tmp_path / "model.safetensors", metadata={"format": "pt"})
    model, _ = read_hf(str(tmp_path))
    idx = torch.randint(0, 270, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), hf(idx).logits, **FP64)


def test_hub_errors_become_one_sentence(monkeypatch):
    """What snapshot_download raises (an invalid name, no network) is mapped to one sentence;
    the download itself is replaced, so nothing reaches the network."""
    import huggingface_hub
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    for error, words in ((HFValidationError("bad id"), "neither a directory nor a Hub model"),
                         (LocalEntryNotFoundError("no connection"), "unreachable")):
        def fail(*args, error=error, **kwargs):
            raise error

        monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
        with pytest.raises(InteropError, match=words):
            read_hf("not/a/dir/nor/a/name")


def test_resuming_an_imported_run_is_one_sentence(tmp_path):
    """An import holds weights but no optimizer state: `train --resume` on it must say so, not
    fail with a KeyError deep in the trainer."""
    from tinygpt.checkpoint import CheckpointError
    from tinygpt.data import TokenData
    from tinygpt.interop import import_checkpoint
    from tinygpt.train import TrainConfig, train

    source = tmp_path / "hf"
    hf_model(source, torch.float32, seed=5, vocab_size=280, n_positions=16, n_embd=16,
             n_layer=1, n_head=2)
    write_tokenizer(source, 280)
    imported = import_checkpoint(f"hf:{source}", tmp_path / "runs" / "imported")
    data = TokenData.from_tokens(list(range(280)) * 2)
    settings = TrainConfig(steps=2, batch_size=2, eval_every=1, eval_batches=1, save_every=1)
    with pytest.raises(CheckpointError, match="holds no optimizer state") as error:
        train(tmp_path / "runs" / "imported", data, imported.tokenizer, imported.model.config,
              settings, resume=True)
    assert "\n" not in str(error.value)
