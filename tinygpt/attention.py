"""Multi-head scaled-dot-product attention, written out by hand: the subject of TinyGPT.

Legend (used in every einops pattern and shape comment of the project):
    b batch   t position   h heads   d per-head width   (h d) = d_model
    i query position   j key position   v vocab   f d_ff

The module mirrors `nn.MultiheadAttention(batch_first=True)` used for self-attention, parameter for
parameter: `in_proj` packs the q, k, v projections in that order (MHA's `in_proj_weight`), and
`out_proj` is MHA's `out_proj`. Masks are additive floats: 0 where attention is allowed, -inf where
it is not.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from torch import Tensor, nn

from tinygpt.config import ATTENTION_IMPLS
from tinygpt.tiled import multihead_core


def causal_mask(n_queries: int, n_keys: int | None = None, *, device=None) -> Tensor:
    """Additive mask `(i j)`: 0 where key j is at or before query i, -inf where it is in the future.

    With `n_keys > n_queries` the queries are the *last* `n_queries` positions (decoding with a
    cache), so query i sits at absolute position `i + n_keys - n_queries`.
    """
    n_keys = n_queries if n_keys is None else n_keys
    is_future = torch.ones(n_queries, n_keys, dtype=torch.bool, device=device).triu(
        n_keys - n_queries + 1
    )
    return additive_mask(is_future)


def padding_mask(is_pad: Tensor) -> Tensor:
    """Additive mask `(b 1 1 j)` from `is_pad (b j)`, True where key j is padding to be ignored."""
    return rearrange(additive_mask(is_pad), "b j -> b 1 1 j")


def additive_mask(is_blocked: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """0/-inf float mask from a boolean one whose True means *blocked*.

    That is `nn.MultiheadAttention`'s convention, and the opposite of
    `F.scaled_dot_product_attention`, where True means *may attend*. The classic traps:
    `torch.tril(ones).bool()` handed to MHA as-is blocks the past and the diagonal and opens the
    future; `torch.tril(ones)` handed over as a float mask is *added* to the scores (+1 where
    allowed) and masks nothing. Both leak silently; the second does not even make a NaN.
    """
    if is_blocked.dtype != torch.bool:
        raise TypeError(f"expected a boolean mask (True = blocked), got dtype {is_blocked.dtype}.")
    return torch.zeros(is_blocked.shape, dtype=dtype, device=is_blocked.device).masked_fill(
        is_blocked, float("-inf")
    )


def combine_masks(*masks: Tensor | None) -> Tensor | None:
    """Sum of additive masks, broadcast together (`(i j)` + `(b 1 1 j)` -> `(b 1 i j)`)."""
    present = [m for m in masks if m is not None]
    if not present:
        return None
    combined = present[0]
    for mask in present[1:]:
        combined = combined + mask
    return combined


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


def scaled_dot_product(q, k, v, mask=None, *, dropout_p=0.0, hook=_no_hook):
    """softmax(q kᵀ / √d + mask) v for q `(b h i d)`, k and v `(b h j d)`; returns out, weights.

    A query row whose keys are all masked gets all-zero weights (so its output is 0, not NaN, and
    its gradients stay finite): the rule `F.scaled_dot_product_attention` follows too. A causal
    mask never does this; only padding can. `hook(name, x)` lets `inspection` observe or replace
    the scores, the masked scores and the weights without touching the maths.
    """
    # Scaling q `(b h i d)`, not the scores `(b h i j)`, spares a pass over the largest tensor.
    scores = hook("scores", einsum(q * q.shape[-1] ** -0.5, k, "b h i d, b h j d -> b h i j"))
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

    The hook points are declared in the order the forward pass reaches them, each with the shape
    it observes, so `inspection` reads that order from the module itself.
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, impl: str = "dense"):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads}).")
        if impl not in ATTENTION_IMPLS:
            raise ValueError(f"impl must be one of {', '.join(ATTENTION_IMPLS)}, got {impl!r}.")
        self.n_heads, self.dropout, self.impl = n_heads, dropout, impl
        self.in_proj = nn.Linear(d_model, 3 * d_model)  # rows: q, k, v, each (h d)
        self.hook_q = HookPoint()  # b h i d
        self.hook_k = HookPoint()  # b h j d (the new positions only, before the cache)
        self.hook_v = HookPoint()  # b h j d
        if impl == "dense":  # the tiled core (tinygpt.tiled) never forms these (b h i j) tensors
            self.hook_scores = HookPoint()  # b h i j, q kᵀ / √d
            self.hook_masked_scores = HookPoint()  # b h i j, scores + mask
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

    def forward(self, x, attn_mask=None, key_padding_mask=None, need_weights=False,
                average_attn_weights=True, cache: KVCache | None = None):
        """x `(b t (h d))` -> out `(b t (h d))`, weights `(b i j)`, `(b h i j)` or None.

        Masks follow MHA: `attn_mask (i j)` and `key_padding_mask (b j)`, each either additive
        float or boolean with True = blocked. With a `cache`, the t new positions are the last
        queries and attend to the cached keys too, so j counts cached + new positions.
        """
        qkv = self.in_proj(x)
        q, k, v = rearrange(qkv, "b t (three h d) -> three b h t d", three=3, h=self.n_heads)
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        if cache is not None:
            k, v = cache.append(k, v)  # b h j d
        if self.impl == "tiled":  # attn_mask may be a TileMask: its blocked tiles are skipped
            z = multihead_core(q, k, v, attn_mask, key_padding_mask, need_weights=need_weights,
                               dropout_p=self.dropout if self.training else 0.0)
            return self.out_proj(rearrange(self.hook_z(z), "b h t d -> b t (h d)")), None
        if key_padding_mask is not None:
            key_padding_mask = rearrange(_additive(key_padding_mask, q.dtype), "b j -> b 1 1 j")
        mask = combine_masks(_additive(attn_mask, q.dtype), key_padding_mask)
        dropout_p = self.dropout if self.training else 0.0
        z, weights = scaled_dot_product(q, k, v, mask, dropout_p=dropout_p, hook=self._hook)
        out = self.out_proj(rearrange(self.hook_z(z), "b h t d -> b t (h d)"))
        if not need_weights:
            return out, None
        return out, weights.mean(dim=1) if average_attn_weights else weights
