"""nanoGPT's files written out for tests: a checkpoint's state dict, `ckpt.pt`, `meta.pkl`, and
nanoGPT's forward pass as an oracle that shares nothing with TinyGPT."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import torch
import torch.nn.functional as F


def nanogpt_state(n_layer, n_head, n_embd, vocab, block, bias, seed, dtype=torch.float64):
    """A state dict with nanoGPT's names and shapes (nn.Linear layout), random values, the LM
    head tied to wte (one tensor under two names, as nanoGPT's torch.save writes it)."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype) * 0.3  # noqa: E731
    state = {"transformer.wte.weight": rand(vocab, n_embd),
             "transformer.wpe.weight": rand(block, n_embd)}
    layers = {"ln_1": (n_embd,), "attn.c_attn": (3 * n_embd, n_embd),
              "attn.c_proj": (n_embd, n_embd), "ln_2": (n_embd,),
              "mlp.c_fc": (4 * n_embd, n_embd), "mlp.c_proj": (n_embd, 4 * n_embd)}
    for n in range(n_layer):
        for name, shape in layers.items():
            key = f"transformer.h.{n}.{name}"
            state[f"{key}.weight"] = 1 + rand(*shape) if name.startswith("ln") else rand(*shape)
            if bias:
                state[f"{key}.bias"] = rand(shape[0])
        state[f"transformer.h.{n}.attn.bias"] = torch.tril(torch.ones(block, block)).view(
            1, 1, block, block)  # the causal-mask buffer nanoGPT saves without flash attention
    state["transformer.ln_f.weight"] = 1 + rand(n_embd)
    if bias:
        state["transformer.ln_f.bias"] = rand(n_embd)
    state["lm_head.weight"] = state["transformer.wte.weight"]
    return state


def nanogpt_forward(state, idx, n_head):
    """nanoGPT's forward written out: F.layer_norm (eps 1e-5, no bias when bias=False), explicit
    causal softmax attention, exact GELU, tied head. Shares nothing with TinyGPT."""
    s = {k.removeprefix("_orig_mod.").removeprefix("transformer."): v for k, v in state.items()}
    t = idx.shape[1]
    n_layer = 1 + max(int(k.split(".")[1]) for k in s if k.startswith("h."))

    def ln(x, name):
        return F.layer_norm(x, x.shape[-1:], s[f"{name}.weight"], s.get(f"{name}.bias"), 1e-5)

    def linear(x, name):
        return F.linear(x, s[f"{name}.weight"], s.get(f"{name}.bias"))

    x = s["wte.weight"][idx] + s["wpe.weight"][:t]
    future = torch.triu(torch.ones(t, t, dtype=torch.bool), diagonal=1)
    for n in range(n_layer):
        q, k, v = linear(ln(x, f"h.{n}.ln_1"), f"h.{n}.attn.c_attn").chunk(3, dim=-1)
        q, k, v = (z.unflatten(-1, (n_head, -1)).transpose(1, 2) for z in (q, k, v))
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        weights = scores.masked_fill(future, float("-inf")).softmax(dim=-1)
        y = (weights @ v).transpose(1, 2).flatten(2)
        x = x + linear(y, f"h.{n}.attn.c_proj")
        hidden = F.gelu(linear(ln(x, f"h.{n}.ln_2"), f"h.{n}.mlp.c_fc"))
        x = x + linear(hidden, f"h.{n}.mlp.c_proj")
    return ln(x, "ln_f") @ s["lm_head.weight"].T


def write_nanogpt(directory: Path, state, *, n_layer, n_head, n_embd, vocab, block, bias,
                  compiled=False) -> Path:
    if compiled:
        state = {f"_orig_mod.{k}": v for k, v in state.items()}
    model_args = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block,
                      bias=bias, vocab_size=vocab, dropout=0.0)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "ckpt.pt"
    torch.save({"model": state, "model_args": model_args, "iter_num": 100,
                "best_val_loss": torch.tensor(1.5), "config": {"dataset": "shakespeare_char"},
                "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0]}]}}, path)
    return path


def write_meta(directory: Path, text: str) -> dict:
    """nanoGPT's data/shakespeare_char/prepare.py vocabulary: sorted characters, ids from 0."""
    chars = sorted(set(text))
    meta = {"vocab_size": len(chars), "itos": dict(enumerate(chars)),
            "stoi": {c: i for i, c in enumerate(chars)}}
    with open(directory / "meta.pkl", "wb") as f:
        pickle.dump(meta, f)
    return meta
