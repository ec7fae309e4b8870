"""One function that copies weights between the hand-written model and the oracle, either way."""

from __future__ import annotations

from torch import nn

from reference.model import ReferenceDecoderModel
from tinygpt.attention import MultiHeadAttention
from tinygpt.model import TinyDecoderModel

# tinygpt's fused Linear `in_proj` <-> nn.MultiheadAttention's packed parameters (q, k, v rows).
_HAND_TO_REFERENCE = {"in_proj.weight": "in_proj_weight", "in_proj.bias": "in_proj_bias"}
_HAND_TYPES = (TinyDecoderModel, MultiHeadAttention)
_TWINS = ((TinyDecoderModel, ReferenceDecoderModel), (MultiHeadAttention, nn.MultiheadAttention))


def _rename(key: str, mapping: dict[str, str]) -> str:
    for old, new in mapping.items():
        if key.endswith(old):
            return key[: -len(old)] + new
    return key


def reference_key(hand_key: str) -> str:
    """The reference's name for a parameter of the hand-written model or attention."""
    return _rename(hand_key, _HAND_TO_REFERENCE)


def _shape(module: nn.Module):
    if isinstance(module, nn.MultiheadAttention):
        return ("attention", module.embed_dim, module.num_heads)
    if isinstance(module, MultiHeadAttention):
        return ("attention", module.out_proj.in_features, module.n_heads)
    return module.config


def copy_weights(src: nn.Module, dst: nn.Module) -> None:
    """Copy every parameter of `src` into `dst`: hand-written -> reference or back, for whole models
    or for single attention modules.

    Refuses a config mismatch, and loads with `strict=True` so that no parameter is left behind: a
    non-strict load would silently keep `dst`'s untrained attention.
    """
    hand, reference = (src, dst) if isinstance(src, _HAND_TYPES) else (dst, src)
    if not any(isinstance(hand, h) and isinstance(reference, r) for h, r in _TWINS):
        raise TypeError("copy_weights copies between a hand-written module and its reference twin, "
                        f"not {type(src).__name__} and {type(dst).__name__}.")
    if _shape(src) != _shape(dst):
        raise ValueError(f"cannot copy weights between {_shape(src)} and {_shape(dst)}.")
    mapping = _HAND_TO_REFERENCE if isinstance(src, _HAND_TYPES) else {
        ref: hand for hand, ref in _HAND_TO_REFERENCE.items()
    }
    state = {_rename(k, mapping): v for k, v in src.state_dict().items()}
    if isinstance(dst, ReferenceDecoderModel) and dst.config.tie_embeddings:
        state.setdefault("lm_head.weight", state["embedding.weight"])  # tinygpt stores it once
    dst.load_state_dict(state, strict=True)
