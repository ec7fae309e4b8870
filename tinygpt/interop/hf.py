"""GPT-2 in Hugging Face's format: a directory `save_pretrained` wrote (`config.json` and
`model.safetensors` or `pytorch_model.bin`, with the tokenizer's files), read into TinyGPT and
written back out so that `transformers.GPT2LMHeadModel.from_pretrained` loads it.

`transformers` itself is never imported: the format is plain JSON and safetensors.
`huggingface_hub` is imported only to download a model by name.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from tinygpt.config import ModelConfig
from tinygpt.files import read_json
from tinygpt.interop.layout import InteropError, from_tinygpt, to_tinygpt
from tinygpt.interop.vocab import (
    BPE_FILES,
    END_OF_TEXT,
    fit_vocabulary,
    read_bpe_directory,
    read_tokenizer,
)
from tinygpt.model import TinyDecoderModel
from tinygpt.tokenizer import BPETokenizer, Tokenizer

# GPT2Config's defaults: `save_pretrained` may leave out a field that has its default value.
_DEFAULTS = dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
                 n_inner=None, activation_function="gelu_new", resid_pdrop=0.1,
                 layer_norm_epsilon=1e-5, tie_word_embeddings=True)
# transformers' names for the activations TinyGPT has ("gelu_new" is GPT-2's tanh approximation).
_ACTIVATION_IN = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu",
                  "relu": "relu"}
_ACTIVATION_OUT = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}
# GPT-2 variants whose attention TinyGPT does not compute: field -> the value TinyGPT needs.
_FIXED = (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
          ("add_cross_attention", False))
# GPT-2's Conv1D layers; every other weight is an nn.Embedding, nn.LayerNorm or nn.Linear.
_CONV1D = re.compile(r"^h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")
# Buffers older GPT-2 files carry: the causal mask and its fill value, not weights.
_MASK_BUFFER = re.compile(r"\.attn\.(bias|masked_bias)$")
_DOWNLOAD = ["config.json", "model.safetensors", "model-*.safetensors",
             "model.safetensors.index.json", *BPE_FILES]


def read_hf(where: str, tokenizer: str | Path | None = None) -> tuple[TinyDecoderModel, Tokenizer]:
    """The model and tokenizer in directory `where`, or of Hub model `where` when no such
    directory exists; `tokenizer` overrides the one found beside the weights."""
    directory = Path(where)
    if not directory.is_dir():
        directory = download(where)
    source = str(directory)
    config = model_config(_read_config(directory), source)
    model = to_tinygpt(_linear_layout(read_weights(directory), config), config, source=source)
    found = read_tokenizer(tokenizer) if tokenizer is not None else read_bpe_directory(directory)
    if found is None:
        raise InteropError(f"{source} holds no tokenizer (tokenizer.json, or vocab.json and "
                           f"merges.txt); pass one with --tokenizer-path.")
    return model, fit_vocabulary(found, config.vocab_size, source)


def model_config(values: dict[str, Any], source: str) -> ModelConfig:
    """The ModelConfig of a GPT-2 `config.json`, or InteropError naming what GPT-2 has that
    TinyGPT does not."""
    if values.get("model_type") != "gpt2":
        raise InteropError(f"{source}: model_type is {values.get('model_type')!r}; only GPT-2 "
                           f"('gpt2') models can be imported.")
    for name, needed in _FIXED:
        if values.get(name, needed) != needed:
            raise InteropError(f"{source}: {name}={values[name]!r} is a GPT-2 variant whose "
                               f"attention TinyGPT does not compute.")
    v = {**_DEFAULTS, **values}
    if v["activation_function"] not in _ACTIVATION_IN:
        raise InteropError(f"{source}: activation_function {v['activation_function']!r} is not "
                           f"one of TinyGPT's ({', '.join(_ACTIVATION_IN)}).")
    try:
        return ModelConfig(
            vocab_size=v["vocab_size"], d_model=v["n_embd"], n_heads=v["n_head"],
            n_layers=v["n_layer"], d_ff=v["n_inner"] or 4 * v["n_embd"],
            max_seq=v["n_positions"], dropout=v["resid_pdrop"], norm_first=True,
            activation=_ACTIVATION_IN[v["activation_function"]],
            tie_embeddings=v["tie_word_embeddings"], head_bias=False,
            layer_norm_eps=v["layer_norm_epsilon"])
    except (TypeError, ValueError) as error:
        raise InteropError(f"{source}/config.json: {error}") from None


def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    values = read_json(
        path, missing=InteropError(f"{str(directory)!r} has no config.json."),
        invalid=lambda error: InteropError(f"{str(path)!r} is not valid JSON: {error}."))
    if not isinstance(values, dict):
        raise InteropError(f"{str(path)!r} does not hold a JSON object.")
    return values


def read_weights(directory: Path) -> dict[str, Tensor]:
    """Every tensor of `directory` (one safetensors file, shards listed by an index, or a
    `pytorch_model.bin` read with `weights_only=True`), as stored."""
    single, index = directory / "model.safetensors", directory / "model.safetensors.index.json"
    binary = directory / "pytorch_model.bin"
    if single.is_file() or index.is_file():
        files = [single] if single.is_file() else _shards(index)
        weights = {}
        for file in files:
            try:
                weights.update(load_file(file))
            except (SafetensorError, OSError) as error:
                raise InteropError(f"cannot read {str(file)!r}: {error}") from None
        return weights
    if binary.is_file():
        try:
            return torch.load(binary, map_location="cpu", weights_only=True)
        except Exception as error:  # pickle and zip errors of every kind: refuse the file
            message = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise InteropError(f"cannot read {str(binary)!r} as plain tensors: {message}") from None
    raise InteropError(f"{str(directory)!r} has no weights (model.safetensors or "
                       f"pytorch_model.bin).")


def _shards(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return [index.parent / name for name in sorted(set(weight_map.values()))]
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise InteropError(f"{str(index)!r} is not a safetensors index: {error!r}.") from None


def _linear_layout(weights: dict[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    """GPT-2 names without the `transformer.` prefix, mask buffers dropped, every weight in
    `nn.Linear` layout; the LM head dropped when tied (GPT-2 then uses `wte`, as TinyGPT does)."""
    out = {}
    for name, tensor in weights.items():
        name = name.removeprefix("transformer.")
        if _MASK_BUFFER.search(name) or (config.tie_embeddings and name == "lm_head.weight"):
            continue
        # GPT-2's Conv1D stores its weight as (in x out), the transpose of nn.Linear's (out x in):
        # it computes x @ W where nn.Linear computes x @ W.T. So every Conv1D weight is
        # transposed here; c_attn becomes (3 (h d)) x (h d) with rows q, k, v, as in_proj.
        out[name] = tensor.t() if _CONV1D.match(name) and tensor.ndim == 2 else tensor
    return out


def download(name: str) -> Path:
    """The local snapshot of Hub model `name` (weights, config and tokenizer files only)."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError
    except ImportError:
        raise InteropError(f"{name!r} is not a directory, and downloading it needs "
                           f"huggingface_hub (pip install 'tinygpt[hf]').") from None
    try:
        directory = Path(snapshot_download(name, allow_patterns=_DOWNLOAD))
        if not any(directory.glob("model*.safetensors*")):  # an older repository: pickles only
            directory = Path(snapshot_download(name, allow_patterns=["pytorch_model.bin"]))
        return directory
    except HFValidationError:
        raise InteropError(f"{name!r} is neither a directory nor a Hub model name.") from None
    except RepositoryNotFoundError:
        raise InteropError(f"the Hugging Face Hub has no model {name!r}.") from None
    except OSError:  # the hub's offline and connection errors are all OSErrors
        raise InteropError(
            f"cannot download {name!r}: the Hugging Face Hub is unreachable (offline?); download "
            f"it where there is a network (hf download {name} --local-dir DIR) and "
            f"pass hf:DIR.") from None


def check_exportable(config: ModelConfig) -> None:
    """Raise InteropError naming the first field GPT-2's architecture cannot express."""
    problems = (
        ("norm_first", not config.norm_first, "GPT-2 is pre-norm (norm_first true)"),
        ("activation", config.activation not in _ACTIVATION_OUT,
         f"GPT-2 has no {config.activation!r}"),
        ("seed_input_scale", config.seed_input_scale, "GPT-2 does not scale attention's input"),
        ("attn_only", config.attn_only, "every GPT-2 block has an MLP"),
        ("head_bias", config.head_bias, "GPT-2's LM head has no bias"),
        ("position", config.position != "learned", "GPT-2 adds a learned table of positions"),
        ("window", config.window is not None, "GPT-2's attention sees every earlier token"),
        ("n_kv_heads", config.n_kv_heads not in (None, config.n_heads),
         "GPT-2 has one key and value head per query head"),
    )
    for name, bad, reason in problems:
        if bad:
            raise InteropError(f"cannot export to GPT-2: {name}={getattr(config, name)!r}, "
                               f"but {reason}.")


def export_hf(model: TinyDecoderModel, tokenizer: Tokenizer, out: str | Path) -> Path:
    """Write `model` (and a byte-level BPE tokenizer's files) as a new GPT-2 directory `out`.

    Built in a temporary directory beside `out` and renamed into place, so `out` is either
    complete or absent; an existing non-empty `out` is refused.
    """
    check_exportable(model.config)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InteropError(f"{str(out)!r} already exists and is not an empty directory.")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".tmp-{out.name}-"))
    try:
        save_file(_gpt2_weights(model), tmp / "model.safetensors", metadata={"format": "pt"})
        end = _end_of_text_id(tokenizer)
        _write_json(tmp / "config.json", _gpt2_config(model, end))
        if isinstance(tokenizer, BPETokenizer):
            _write_json(tmp / "tokenizer.json", tokenizer.to_dict()["tokenizer"])
            _write_json(tmp / "tokenizer_config.json", _tokenizer_config(model.config, end))
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _gpt2_weights(model: TinyDecoderModel) -> dict[str, Tensor]:
    """GPT2LMHeadModel's state dict: `transformer.`-prefixed, Conv1D weights stored (in x out)."""
    out = {}
    for name, tensor in from_tinygpt(model).items():
        tensor = tensor.t() if _CONV1D.match(name) else tensor  # nn.Linear (out x in) -> Conv1D
        key = name if name.startswith("lm_head.") else f"transformer.{name}"
        out[key] = tensor.detach().to("cpu").contiguous()
    return out


def _gpt2_config(model: TinyDecoderModel, end: int | None) -> dict[str, Any]:
    c = model.config
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": c.vocab_size, "n_positions": c.max_seq, "n_ctx": c.max_seq,
        "n_embd": c.d_model, "n_layer": c.n_layers, "n_head": c.n_heads, "n_inner": c.d_ff,
        "activation_function": _ACTIVATION_OUT[c.activation],
        "resid_pdrop": c.dropout, "embd_pdrop": c.dropout, "attn_pdrop": c.dropout,
        "layer_norm_epsilon": c.layer_norm_eps, "tie_word_embeddings": c.tie_embeddings,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False, "bos_token_id": end, "eos_token_id": end,
        "dtype": dtype,
    }


def _tokenizer_config(config: ModelConfig, end: int | None) -> dict[str, Any]:
    special = {} if end is None else {"bos_token": END_OF_TEXT, "eos_token": END_OF_TEXT,
                                      "unk_token": END_OF_TEXT}
    return {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": config.max_seq,
            "add_prefix_space": False, **special}


def _end_of_text_id(tokenizer: Tokenizer) -> int | None:
    if not isinstance(tokenizer, BPETokenizer):
        return None
    ids = tokenizer.encode(END_OF_TEXT)
    return ids[0] if len(ids) == 1 else None


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")
