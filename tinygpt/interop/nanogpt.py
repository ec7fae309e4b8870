"""nanoGPT checkpoints (`ckpt.pt`: a dict with `model_args` and the `model` state dict) and the
character vocabulary (`meta.pkl`) its char-level runs keep beside the data.

nanoGPT is GPT-2's architecture with `nn.Linear` layers (no Conv1D transpose), exact GELU
(`nn.GELU()`), LayerNorm epsilon 1e-5, an LM head without bias tied to the token embedding, and
optionally no bias anywhere (`bias=False`, where its LayerNorm has no bias either). TinyGPT's layers
always have biases: the missing ones are zeros, which is exact (adding 0.0 returns the same float).
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tinygpt.config import ModelConfig
from tinygpt.interop.layout import InteropError, to_tinygpt
from tinygpt.interop.vocab import fit_vocabulary, read_tokenizer
from tinygpt.model import TinyDecoderModel
from tinygpt.tokenizer import CharTokenizer, Tokenizer, TokenizerError

_MODEL_ARGS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "bias")
_MASK_BUFFER = re.compile(r"\.attn\.bias$")  # the causal mask nanoGPT keeps without flash attention
# The logit of the `<unk>` id TinyGPT's char tokenizer adds: exp(-1e4 - max logit) is exactly 0
# in every float dtype, so the probabilities of nanoGPT's own ids stay nanoGPT's.
UNK_LOGIT = -1e4


def read_nanogpt(path: str | Path,
                 tokenizer: str | Path | None = None) -> tuple[TinyDecoderModel, Tokenizer]:
    """The model of nanoGPT's `ckpt.pt` at `path` with its tokenizer: `tokenizer` if given, else
    the `meta.pkl` beside the checkpoint (char-level runs)."""
    path = Path(path)
    source = str(path)
    checkpoint = _load(path)
    args = _model_args(checkpoint, source)
    weights = _weights(checkpoint, source)
    head = weights.get("lm_head.weight")
    tied = head is None or _same(head, weights["wte.weight"])
    if tied:
        weights.pop("lm_head.weight", None)
    if tokenizer is not None:
        vocab = fit_vocabulary(read_tokenizer(tokenizer), args["vocab_size"], source)
    else:
        meta = path.parent / "meta.pkl"
        if not meta.is_file():
            raise InteropError(f"{source} has no meta.pkl beside it; for a GPT-2 BPE run pass "
                               f"GPT-2's tokenizer files with --tokenizer-path DIR.")
        vocab = char_tokenizer(read_meta(meta), args["vocab_size"], str(meta))
    with_unk = isinstance(vocab, CharTokenizer)
    if with_unk:
        weights = _add_unk(weights, tied)
    config = _config(args, vocab.vocab_size, tied, with_unk, source)
    model = to_tinygpt(weights, config, source=source, zero_missing_biases=not args["bias"])
    return model, vocab


def _load(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise InteropError(f"nanoGPT checkpoint {str(path)!r} does not exist.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle and zip errors of every kind: refuse the file
        raise InteropError(f"cannot read {str(path)!r} as a nanoGPT checkpoint: "
                           f"{_unreadable(path, error)}.") from None
    if not isinstance(checkpoint, dict) or not {"model", "model_args"} <= set(checkpoint):
        raise InteropError(f"{str(path)!r} is not a nanoGPT checkpoint (a dict with 'model' and "
                           f"'model_args').")
    return checkpoint


def _unreadable(path: Path, error: Exception) -> str:
    """Why torch.load refused `path`, in words: its own errors are a bare key ('101'), an empty
    EOFError, or zip internals."""
    if "GLOBAL" in str(error):  # torch's weights-only unpickler met a class or a function
        return ("it holds objects other than plain tensors and data, and unpickling them could "
                "run code")
    if path.stat().st_size == 0:
        return "the file is empty"
    return "it is not a file that torch.save wrote, or it is damaged"


def _model_args(checkpoint: dict[str, Any], source: str) -> dict[str, Any]:
    args = checkpoint["model_args"]
    missing = [k for k in _MODEL_ARGS if not isinstance(args, dict) or k not in args]
    if missing:
        raise InteropError(f"{source}: model_args has no {missing[0]!r}.")
    return args


def _weights(checkpoint: dict[str, Any], source: str) -> dict[str, Tensor]:
    """GPT-2 names: without `torch.compile`'s `_orig_mod.` and nanoGPT's `transformer.`."""
    state = checkpoint["model"]
    if not isinstance(state, dict):
        raise InteropError(f"{source}: 'model' is not a state dict.")
    weights = {}
    for name, tensor in state.items():
        name = name.removeprefix("_orig_mod.").removeprefix("transformer.")
        if not _MASK_BUFFER.search(name):
            weights[name] = tensor
    if "wte.weight" not in weights:
        raise InteropError(f"{source} has no token embedding 'transformer.wte.weight'.")
    return weights


def _same(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and bool(torch.equal(a, b))


def _add_unk(weights: dict[str, Tensor], tied: bool) -> dict[str, Tensor]:
    """One more vocabulary row for the char tokenizer's `<unk>`: a zero embedding, and through
    the LM head's bias (0 for every other id) the logit UNK_LOGIT, so it is never produced."""
    weights = dict(weights)
    wte = weights["wte.weight"]
    if wte.ndim != 2:
        raise InteropError(f"'wte.weight' has shape {tuple(wte.shape)}, not (vocab, n_embd).")
    weights["wte.weight"] = torch.cat([wte, wte.new_zeros(1, wte.shape[1])])
    if not tied and weights["lm_head.weight"].shape == wte.shape:
        head = weights["lm_head.weight"]
        weights["lm_head.weight"] = torch.cat([head, head.new_zeros(1, head.shape[1])])
    bias = wte.new_zeros(wte.shape[0] + 1)
    bias[-1] = UNK_LOGIT
    weights["lm_head.bias"] = bias
    return weights


def _config(args: dict[str, Any], vocab_size: int, tied: bool, head_bias: bool,
            source: str) -> ModelConfig:
    try:
        return ModelConfig(
            vocab_size=vocab_size, d_model=args["n_embd"], n_heads=args["n_head"],
            n_layers=args["n_layer"], d_ff=4 * args["n_embd"], max_seq=args["block_size"],
            dropout=float(args.get("dropout", 0.0)), norm_first=True, activation="gelu",
            tie_embeddings=tied, head_bias=head_bias, layer_norm_eps=1e-5)
    except (TypeError, ValueError) as error:
        raise InteropError(f"{source}: model_args: {error}") from None


class _PlainDataUnpickler(pickle.Unpickler):
    """Unpickles dicts, strings, numbers and containers, never a class or a function: every
    pickle opcode that reaches code (GLOBAL, STACK_GLOBAL, INST, OBJ, EXT*) goes through
    `find_class`, which refuses all, so nothing in the file can run."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refusing a persistent reference")


def read_meta(path: str | Path) -> dict[str, Any]:
    """nanoGPT's `meta.pkl` as plain data, refusing anything but dicts, strings and integers."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = _PlainDataUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError,
            AttributeError, MemoryError) as error:
        raise InteropError(f"{str(path)!r} holds something other than dicts, strings and "
                           f"integers; refusing to load it ({error}).") from None
    if not isinstance(data, dict) or not _plain(data):
        raise InteropError(f"{str(path)!r} holds something other than dicts, strings and "
                           f"integers; refusing to use it.")
    return data


def _plain(value: Any) -> bool:
    if isinstance(value, dict):
        return all(_plain(k) and _plain(v) for k, v in value.items())
    return isinstance(value, (str, int))


def char_tokenizer(meta: dict[str, Any], vocab_size: int, source: str) -> CharTokenizer:
    """A CharTokenizer giving each character nanoGPT's own id (`itos[i]` is id i), its `<unk>`
    coming after them at id `vocab_size`."""
    itos, stoi = meta.get("itos"), meta.get("stoi")
    if not isinstance(itos, dict) or not isinstance(stoi, dict):
        raise InteropError(f"{source} has no 'itos' and 'stoi' dicts.")
    if sorted(itos) != list(range(vocab_size)):
        raise InteropError(f"{source}: 'itos' must map the ids 0..{vocab_size - 1} of the "
                           f"model's vocabulary, got {len(itos)} entries.")
    chars = [itos[i] for i in range(vocab_size)]
    if any(stoi.get(char) != i for i, char in enumerate(chars)) or len(stoi) != vocab_size:
        raise InteropError(f"{source}: 'stoi' and 'itos' disagree.")
    try:
        return CharTokenizer(chars)
    except TokenizerError as error:
        raise InteropError(f"{source}: {error}") from None
