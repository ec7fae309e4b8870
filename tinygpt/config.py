"""Model configuration: one validated dataclass and the named presets built from it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

ACTIVATIONS = ("relu", "gelu", "gelu_tanh")  # gelu_tanh: GPT-2's approximation
# dense: scaled_dot_product, every hook point; tiled: tinygpt.tiled, memory linear in the context.
ATTENTION_IMPLS = ("dense", "tiled")
POSITIONS = ("learned", "alibi", "rope", "none")


@dataclass(frozen=True)
class ModelConfig:
    """Every size of the decoder, with the names of "Attention Is All You Need".

    `seed_input_scale` reproduces a quirk of the seed code: the input of every attention layer is
    multiplied by `d_model ** -0.5` (on top of attention's own `d_head ** -0.5`). Because q, k and
    v are linear in that input, with zero biases the scores shrink by a further factor of `d_model`
    (each of q and k by `d_model ** -0.5`) and the values by `d_model ** -0.5`, so the softmax
    starts out almost uniform. Only the `seed` preset turns it on.

    `attn_only` drops each block's MLP (and its LayerNorm): the attention-only models in which
    induction heads are studied. `tie_embeddings` makes the LM head's weight the token embedding
    itself (GPT-2), `head_bias` gives the LM head a bias (GPT-2 has none) and `layer_norm_eps` is
    every LayerNorm's epsilon. Their defaults keep the seed design and every saved checkpoint.

    `attention_impl` chooses the attention core: "dense" (`scaled_dot_product`, every hook point,
    memory quadratic in the context) or "tiled" (`tinygpt.tiled`, FlashAttention: linear memory,
    tiles above the causal diagonal skipped, but no scores, pattern or weights to observe).

    `position` says how tokens know where they are: a `learned` table added to the embeddings
    (the seed), ALiBi's per-head linear penalty on distance added to the scores (`alibi`), queries
    and keys rotated by their positions (`rope`, which needs an even `d_head`), or nothing but
    the causal mask (`none`). `window` (None, or the number of keys a query sees, itself
    included) makes the attention a sliding window. `n_kv_heads` (None means `n_heads`) shares
    each key/value head among `n_heads / n_kv_heads` query heads; 1 is multi-query attention.
    """

    vocab_size: int = 40
    d_model: int = 32
    n_heads: int = 4
    n_layers: int = 2
    d_ff: int = 64
    max_seq: int = 32
    dropout: float = 0.0
    norm_first: bool = False  # False: post-LayerNorm (the seed); True: pre-LayerNorm (GPT-2)
    activation: str = "relu"
    seed_input_scale: bool = False
    attn_only: bool = False
    tie_embeddings: bool = False
    head_bias: bool = True
    layer_norm_eps: float = 1e-5
    attention_impl: str = "dense"
    position: str = "learned"
    window: int | None = None
    n_kv_heads: int | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_heads", "n_layers", "d_ff", "max_seq"):
            check_positive_int(name, getattr(self, name))
        for name in ("norm_first", "seed_input_scale", "attn_only", "tie_embeddings", "head_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}.")
        eps = self.layer_norm_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
            raise ValueError(f"layer_norm_eps must be a number in (0, 1), got {eps!r}.")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})."
            )
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}.")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl must be one of {', '.join(ATTENTION_IMPLS)}, "
                             f"got {self.attention_impl!r}.")
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}."
            )
        self._check_attention_variant()

    def _check_attention_variant(self) -> None:
        if self.position not in POSITIONS:
            raise ValueError(
                f"position must be one of {', '.join(POSITIONS)}, got {self.position!r}."
            )
        if self.window is not None:
            check_positive_int("window", self.window)
        if self.n_kv_heads is not None:
            check_positive_int("n_kv_heads", self.n_kv_heads)
            if self.n_heads % self.n_kv_heads:
                raise ValueError(f"n_heads ({self.n_heads}) must be divisible by n_kv_heads "
                                 f"({self.n_kv_heads}).")
        if self.position == "rope" and self.d_head % 2:
            raise ValueError(f"rope positions need an even d_head, got {self.d_head}.")

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """The preset `name` with any field replaced by `overrides`."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}.")
        return cls.from_dict({**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        """Build from a plain dict (a checkpoint's or a command line's), naming any unknown key."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"unknown config field {unknown[0]!r}; known fields: {', '.join(sorted(known))}."
            )
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def is_int_at_least(value: Any, low: int) -> bool:
    """True for an int >= `low`; a bool is not an int here (Python's `True` would pass as 1).
    Every count and size check of the package asks this, each with its own sentence."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def check_positive_int(name: str, value: Any) -> None:
    """Raise a one-sentence ValueError unless `value` is an int >= 1."""
    if not is_int_at_least(value, 1):
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def _gpt2(n_layers: int, n_heads: int, d_model: int) -> dict[str, Any]:
    """GPT-2's architecture at one of its four published sizes (random weights until imported)."""
    return dict(
        vocab_size=50257, d_model=d_model, n_heads=n_heads, n_layers=n_layers, d_ff=4 * d_model,
        max_seq=1024, dropout=0.0, norm_first=True, activation="gelu_tanh",
        tie_embeddings=True, head_bias=False, layer_norm_eps=1e-5,
    )


# vocab_size of shakespeare-cpu and baby is a placeholder: training replaces it with the tokenizer's
# size. The gpt2 family keeps GPT-2's own 50,257 tokens.
PRESETS: dict[str, dict[str, Any]] = {
    "seed": dict(
        vocab_size=40, d_model=32, n_heads=4, n_layers=2, d_ff=64, max_seq=32,
        dropout=0.0, norm_first=False, activation="relu", seed_input_scale=True,
    ),
    "shakespeare-cpu": dict(
        vocab_size=65, d_model=128, n_heads=4, n_layers=4, d_ff=512, max_seq=64,
        dropout=0.0, norm_first=True, activation="gelu",
    ),
    "baby": dict(
        vocab_size=65, d_model=384, n_heads=6, n_layers=6, d_ff=1536, max_seq=256,
        dropout=0.2, norm_first=True, activation="gelu",
    ),
    "gpt2": _gpt2(n_layers=12, n_heads=12, d_model=768),  # 124M parameters
    "gpt2-medium": _gpt2(n_layers=24, n_heads=16, d_model=1024),  # 355M
    "gpt2-large": _gpt2(n_layers=36, n_heads=20, d_model=1280),  # 774M
    "gpt2-xl": _gpt2(n_layers=48, n_heads=25, d_model=1600),  # 1.5B
}
