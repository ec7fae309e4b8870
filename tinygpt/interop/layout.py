"""GPT-2's parameter layout, shared by Hugging Face's GPT-2 and nanoGPT, mapped onto TinyGPT's.

Both name their tensors after OpenAI's GPT-2 code (`wte`, `wpe`, `h.N.ln_1`, `attn.c_attn`, ...).
TinyGPT's names differ but its pre-norm GELU model holds the same tensors: its packed `in_proj`
has `c_attn`'s rows in `c_attn`'s order (q, k, v, each `(h d)`), so no row is moved. The maps here
work in `nn.Linear` layout (out x in); each format turns its own storage into that first.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tinygpt.config import ModelConfig
from tinygpt.model import TinyDecoderModel


class InteropError(ValueError):
    """A model, tokenizer or file that cannot be brought into or out of TinyGPT as it is."""


# (TinyGPT name, GPT-2 name) inside block N: `blocks.N.` and `h.N.` are prepended.
_BLOCK = (
    ("norm1.weight", "ln_1.weight"), ("norm1.bias", "ln_1.bias"),
    ("attention.in_proj.weight", "attn.c_attn.weight"),
    ("attention.in_proj.bias", "attn.c_attn.bias"),
    ("attention.out_proj.weight", "attn.c_proj.weight"),
    ("attention.out_proj.bias", "attn.c_proj.bias"),
    ("norm2.weight", "ln_2.weight"), ("norm2.bias", "ln_2.bias"),
    ("mlp.fc_in.weight", "mlp.c_fc.weight"), ("mlp.fc_in.bias", "mlp.c_fc.bias"),
    ("mlp.fc_out.weight", "mlp.c_proj.weight"), ("mlp.fc_out.bias", "mlp.c_proj.bias"),
)
_OUTER = (
    ("embedding.weight", "wte.weight"), ("positional", "wpe.weight"),
    ("final_norm.weight", "ln_f.weight"), ("final_norm.bias", "ln_f.bias"),
)


def gpt2_names(config: ModelConfig) -> dict[str, str]:
    """TinyGPT state-dict name -> GPT-2 name, for every tensor a model of `config` saves.

    A tied LM head has no entry (it is `wte`); `lm_head.bias` exists only with `head_bias`, which
    GPT-2 itself never has.
    """
    names = dict(_OUTER)
    for n in range(config.n_layers):
        names.update({f"blocks.{n}.{ours}": f"h.{n}.{theirs}" for ours, theirs in _BLOCK})
    if not config.tie_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    if config.head_bias:
        names["lm_head.bias"] = "lm_head.bias"
    return names


def to_tinygpt(weights: dict[str, Tensor], config: ModelConfig, *, source: str,
               zero_missing_biases: bool = False) -> TinyDecoderModel:
    """A TinyGPT model (eval mode, in the weights' dtype) holding GPT-2-named `weights`.

    `weights` are in `nn.Linear` layout. With `zero_missing_biases`, an absent `.bias` becomes
    zeros (nanoGPT's `bias=False`); that is exact, because adding 0.0 to a float returns the same
    float. Raises InteropError naming the first missing, unexpected or misshapen tensor.
    """
    names = gpt2_names(config)
    unexpected = sorted(set(weights) - set(names.values()))
    if unexpected:
        raise InteropError(f"{source} holds {unexpected[0]!r}, which a GPT-2 model with this "
                           f"config does not have.")
    if "wte.weight" not in weights:
        raise InteropError(f"{source} has no token embedding 'wte.weight'.")
    dtype = weights["wte.weight"].dtype
    if not dtype.is_floating_point:
        raise InteropError(f"{source}: 'wte.weight' has dtype {dtype}, not a floating point one.")
    model = TinyDecoderModel(config).to(dtype)
    expected = model.state_dict()
    state = {}
    for ours, theirs in names.items():
        shape = tuple(expected[ours].shape)
        if theirs not in weights:
            if zero_missing_biases and theirs.endswith(".bias"):
                state[ours] = torch.zeros(shape, dtype=dtype)
                continue
            raise InteropError(f"{source} has no weight {theirs!r}.")
        if tuple(weights[theirs].shape) != shape:
            raise InteropError(f"{source}: {theirs!r} has shape {tuple(weights[theirs].shape)}, "
                               f"but its config needs {shape}.")
        state[ours] = weights[theirs].to(dtype)
    model.load_state_dict(state, strict=True)
    return model.eval()


def from_tinygpt(model: TinyDecoderModel) -> dict[str, Tensor]:
    """The model's tensors under GPT-2's names, in `nn.Linear` layout (a tied head: `wte` only)."""
    state = model.state_dict()
    return {theirs: state[ours] for ours, theirs in gpt2_names(model.config).items()}
