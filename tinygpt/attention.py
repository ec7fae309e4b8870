"""Multi-head scaled-dot-product attention, written out by hand: the subject of TinyGPT.

Legend (used in every einops pattern and shape comment of the project):
    b batch   t position   h heads   d per-head width   (h d) = d_model
    i query position   j key position   v vocab   f d_ff   g key/value heads

The module mirrors `nn.MultiheadAttention(batch_first=True)` used for self-attention, parameter for
parameter: `in_proj` packs the q, k, v projections in that order (MHA's `in_proj_weight`), and
`out_proj` is MHA's `out_proj`. Masks are additive floats: 0 where attention is allowed, -inf where
it is not, plus any bias (ALiBi); the builders are in `tinygpt.masks`. Two variants change the
projections: grouped key/value heads (g of them, each shared by h / g query heads) and rotary
position embedding of q and k (`tinygpt.positions`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import einsum, rearrange, repeat
from torch import Tensor, nn

from tinygpt.config import ATTENTION_IMPLS
from tinygpt.masks import additive_mask, causal_mask, combine_masks, padding_mask
from tinygpt.positions import apply_rope
from tinygpt.tiled import TileMask, multihead_core

__all__ = ["HookPoint", "KVCache", "MultiHeadAttention", "additive_mask", "causal_mask",
           "combine_masks", "padding_mask", "scaled_dot_product"]


def _additive(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    if mask is None:
        return None
    return additive_mask(mask, dtype) if mask.dtype == torch.bool else mask.to(dtype)


def _no_hook(name: str, x: Tensor) -> Tensor:
    return x


def _empty_rows(mask: Tensor | None) -> Tensor | None:
    """Boolean `(... i 1)`, True for query rows whose keys are all masked; None if there are none.

    Returning None in the usual case (a causal mask never empties a row) spares two passes over
    the `(b h i j)` weights, forward and backward. Under torch.compile the check is not made, as
    a data-dependent branch would split the graph, and the fix fuses into the softmax for free.
    """
    if mask is None:
        return None
    empty = torch.isneginf(mask).all(dim=-1, keepdim=True)
    return empty if torch.compiler.is_compiling() or empty.any() else None


def _per_row(mask: Tensor | None) -> Tensor | None:
    """A 3-D mask is one `(i j)` mask per batch row: `(b i j) -> (b 1 i j)`, shared by the heads.

    (nn.MultiheadAttention reads a 3-D mask as `((b h) i j)` instead; a mask that differs per head
    is passed here as `(b h i j)`.)
    """
    if mask is None or mask.ndim != 3:
        return mask
    return rearrange(mask, "b i j -> b 1 i j")


def scaled_dot_product(q, k, v, mask=None, *, dropout_p=0.0, hook=_no_hook):
    """softmax(q kᵀ / √d + mask) v for q `(b h i d)`, k and v `(b h j d)`; returns out, weights.

    The additive mask is `(i j)`, `(b i j)` (one per batch row) or anything that broadcasts to
    `(b h i j)` (a bias such as ALiBi's differs per head). A query row whose keys are all masked
    gets all-zero weights (so its output is 0, not NaN, and its gradients stay finite): the rule
    `F.scaled_dot_product_attention` follows too. Causal, window, prefix and document masks never
    do this (a query always sees itself); only padding can. `hook(name, x)` lets `inspection`
    observe or replace the scores, the masked scores and the weights without touching the maths.
    """
    # Scaling q `(b h i d)`, not the scores `(b h i j)`, spares a pass over the largest tensor.
    scores = hook("scores", einsum(q * q.shape[-1] ** -0.5, k, "b h i d, b h j d -> b h i j"))
    mask = _per_row(mask)
    empty = _empty_rows(mask)
    if empty is not None:
        mask = mask.masked_fill(empty, 0.0)  # keeps a row with no visible key from becoming NaN
    scores = hook("masked_scores", scores if mask is None else scores + mask)
    weights = scores.softmax(dim=-1)
    if empty is not None:
        weights = weights.masked_fill(empty, 0.0)
    weights = hook("pattern", F.dropout(weights, dropout_p) if dropout_p > 0 else weights)
    out = einsum(weights, v, "b h i j, b h j d -> b h i d")
    return out, weights


@dataclass
class KVCache:
    """Keys and values `(b h j d)` one attention layer has already computed, so that decoding a new
    token projects one position instead of re-running the window. Appended along j."""

    k: Tensor | None = None
    v: Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Add the new positions' k and v `(b h t d)`; return all keys and values `(b h j d)`."""
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v


class HookPoint(nn.Identity):
    """An identity whose forward hooks observe or replace one activation (see `inspection`)."""


class MultiHeadAttention(nn.Module):
    """Self-attention with `nn.MultiheadAttention(batch_first=True)`'s parameters and signature.

    `n_kv_heads` (g, dividing h; None means h) shares each key/value head among h / g query heads
    (grouped-query attention; g = 1 is multi-query): `in_proj` then has (h + 2 g) d rows, q's then
    k's then v's, and the cache keeps only the g key/value heads. With g = h it is MHA's packed
    (3 (h d), (h d)) projection unchanged. `rope` rotates q and k by their positions (RoPE) after
    the projection and before the scores, and adds the hook points `hook_rot_q` and `hook_rot_k`.

    The hook points are declared in the order the forward pass reaches them, each with the shape
    it observes, so `inspection` reads that order from the module itself.
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, impl: str = "dense", *,
                 n_kv_heads: int | None = None, rope: bool = False):
        super().__init__()
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads}).")
        if impl not in ATTENTION_IMPLS:
            raise ValueError(f"impl must be one of {', '.join(ATTENTION_IMPLS)}, got {impl!r}.")
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads ({n_heads}) must be divisible by n_kv_heads ({n_kv_heads}).")
        if rope and (d_model // n_heads) % 2:
            raise ValueError(f"rotary positions need an even head width, got {d_model // n_heads}.")
        self.n_heads, self.n_kv_heads, self.dropout, self.impl = n_heads, n_kv_heads, dropout, impl
        d_kv = n_kv_heads * (d_model // n_heads)
        self.in_proj = nn.Linear(d_model, d_model + 2 * d_kv)  # rows: q (h d), k (g d), v (g d)
        self.hook_q = HookPoint()  # b h i d
        self.hook_k = HookPoint()  # b g j d (the new positions only, before the cache; g = h)
        self.hook_v = HookPoint()  # b g j d
        self.rope = rope
        if rope:
            self.hook_rot_q = HookPoint()  # b h i d, q rotated by its positions
            self.hook_rot_k = HookPoint()  # b g j d, k rotated by its positions
        if impl == "dense":  # the tiled core (tinygpt.tiled) never forms these (b h i j) tensors
            self.hook_scores = HookPoint()  # b h i j, q kᵀ / √d
            self.hook_masked_scores = HookPoint()  # b h i j, scores + mask (+ bias)
            self.hook_pattern = HookPoint()  # b h i j, the weights after softmax (and dropout)
        self.hook_z = HookPoint()  # b h i d, the weighted values before out_proj
        self.out_proj = nn.Linear(d_model, d_model)

    def _hook(self, name: str, x: Tensor) -> Tensor:
        """The hook points `scaled_dot_product` passes its intermediates through."""
        if name == "scores":
            return self.hook_scores(x)
        if name == "masked_scores":
            return self.hook_masked_scores(x)
        return self.hook_pattern(x)

    def _project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x `(b t (h d))` -> q `(b h t d)`, k and v `(b g t d)`."""
        qkv = self.in_proj(x)
        if self.n_kv_heads == self.n_heads:
            return rearrange(qkv, "b t (three h d) -> three b h t d", three=3, h=self.n_heads)
        d_q = x.shape[-1]
        q = rearrange(qkv[..., :d_q], "b t (h d) -> b h t d", h=self.n_heads)
        k, v = rearrange(qkv[..., d_q:], "b t (two g d) -> two b g t d", two=2, g=self.n_kv_heads)
        return q, k, v

    def _rotate(self, q: Tensor, k: Tensor, positions: Tensor | None,
                cache: KVCache | None) -> tuple[Tensor, Tensor]:
        """RoPE on the new positions: `positions (t)` or `(b t)`, by default those after the
        cache. Keys are rotated before they are cached, so a cached key keeps its position."""
        if positions is None:
            past = 0 if cache is None else cache.length
            positions = torch.arange(past, past + q.shape[2], device=q.device)
        return self.hook_rot_q(apply_rope(q, positions)), self.hook_rot_k(apply_rope(k, positions))

    def forward(self, x, attn_mask=None, key_padding_mask=None, need_weights=False,
                average_attn_weights=True, cache: KVCache | None = None,
                positions: Tensor | None = None):
        """x `(b t (h d))` -> out `(b t (h d))`, weights `(b i j)`, `(b h i j)` or None.

        Masks follow MHA: `attn_mask` and `key_padding_mask (b j)`, each either additive float or
        boolean with True = blocked; but a 3-D `attn_mask` is `(b i j)`, one per batch row, and a
        4-D one `(b h i j)` (MHA's 3-D is `((b h) i j)`). With a `cache`, the t new positions are
        the last queries and attend to the cached keys too, so j counts cached + new positions.
        `positions (t)` or `(b t)` place the new tokens for RoPE (default: right after the cache).
        """
        q, k, v = self._project(x)
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        if self.rope:
            q, k = self._rotate(q, k, positions, cache)
        if cache is not None:
            k, v = cache.append(k, v)  # b g j d
        if self.n_kv_heads != self.n_heads:  # each key/value head serves h / g query heads
            k, v = (repeat(kv, "b g j d -> b (g r) j d", r=self.n_heads // self.n_kv_heads)
                    for kv in (k, v))
        dropout_p = self.dropout if self.training else 0.0
        if self.impl == "tiled":  # attn_mask may be a TileMask: its blocked tiles are skipped
            tiled_mask = attn_mask if isinstance(attn_mask, TileMask) else _per_row(attn_mask)
            z = multihead_core(q, k, v, tiled_mask, key_padding_mask, need_weights=need_weights,
                               dropout_p=dropout_p)
            weights = None  # the tiled core never forms them
        else:
            if key_padding_mask is not None:
                key_padding_mask = rearrange(_additive(key_padding_mask, q.dtype),
                                             "b j -> b 1 1 j")
            mask = combine_masks(_per_row(_additive(attn_mask, q.dtype)), key_padding_mask)
            z, weights = scaled_dot_product(q, k, v, mask, dropout_p=dropout_p, hook=self._hook)
        out = self.out_proj(rearrange(self.hook_z(z), "b h t d -> b t (h d)"))
        if not need_weights:
            return out, None
        return out, weights.mean(dim=1) if average_attn_weights else weights
