"""Attention masks and biases as small pure functions of query and key positions.

Every mask builder returns a boolean *blocked* mask: True where the query may not see the key,
`nn.MultiheadAttention`'s convention (the opposite of `F.scaled_dot_product_attention`'s). Its last
two axes are `(i j)`; a mask that differs per batch row is `(b i j)`, key padding is `(b 1 j)`, and
all of them broadcast together. `additive_mask` is the one way to the 0/-inf float mask the
attention adds to its scores; `alibi_bias` is a float bias added on the same path.

The builders take query and key *positions* (index vectors `(i)` and `(j)`) rather than sizes,
so one builder serves a full pass (both `0..t-1`), a KV cache (the queries are the last positions)
and a tiled kernel that asks for one tile of positions at a time.
"""

from __future__ import annotations

import functools
import math

import torch
from einops import rearrange
from torch import Tensor


def positions(n: int, start: int = 0, *, device=None) -> Tensor:
    """The index vector `start, ..., start + n - 1`, for queries `(i)` or keys `(j)`."""
    return torch.arange(start, start + n, device=device)


def _offset(q_pos: Tensor, k_pos: Tensor) -> Tensor:
    """How far each key lies behind each query, `(i j)`: q - k, negative for a future key."""
    return rearrange(q_pos, "i -> i 1") - rearrange(k_pos, "j -> 1 j")


def causal(q_pos: Tensor, k_pos: Tensor) -> Tensor:
    """`(i j)`: blocks every key after its query."""
    return _offset(q_pos, k_pos) < 0


def sliding_window(q_pos: Tensor, k_pos: Tensor, window: int) -> Tensor:
    """`(i j)`: each query sees `window` keys, itself and the `window - 1` before it (causal)."""
    offset = _offset(q_pos, k_pos)
    return (offset < 0) | (offset >= window)


def prefix_lm(q_pos: Tensor, k_pos: Tensor, prefix_len: Tensor) -> Tensor:
    """`(b i j)`: bidirectional among the first `prefix_len (b)` positions of each row, causal
    after them. A key is blocked only if it is in the query's future *and* outside the prefix."""
    outside_prefix = rearrange(k_pos, "j -> 1 1 j") >= rearrange(prefix_len, "b -> b 1 1")
    return causal(q_pos, k_pos) & outside_prefix


def document(q_pos: Tensor, k_pos: Tensor, document_ids: Tensor) -> Tensor:
    """`(b i j)`: causal inside each document, nothing across documents (block-diagonal causal).

    `document_ids (b t)` labels every position of a row (cached and new), so packed sequences
    never see each other; queries and keys pick their labels by position.
    """
    q_doc = rearrange(document_ids[:, q_pos], "b i -> b i 1")
    k_doc = rearrange(document_ids[:, k_pos], "b j -> b 1 j")
    return causal(q_pos, k_pos) | (q_doc != k_doc)


def key_padding(is_pad: Tensor) -> Tensor:
    """`(b 1 j)` from `is_pad (b j)`, True where key j is padding: blocked for every query."""
    return rearrange(is_pad, "b j -> b 1 j")


def blocked_by_any(*masks: Tensor) -> Tensor:
    """Blocked wherever any mask blocks: the keys *every* mask allows (FlexAttention's
    `and_masks` of the allowed sets)."""
    return functools.reduce(torch.logical_or, masks)


def blocked_by_all(*masks: Tensor) -> Tensor:
    """Blocked only where every mask blocks: the keys *some* mask allows (FlexAttention's
    `or_masks` of the allowed sets)."""
    return functools.reduce(torch.logical_and, masks)


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


def causal_mask(n_queries: int, n_keys: int | None = None, *, device=None) -> Tensor:
    """Additive mask `(i j)`: 0 where key j is at or before query i, -inf where it is in the future.

    With `n_keys > n_queries` the queries are the *last* `n_queries` positions (decoding with a
    cache), so query i sits at absolute position `i + n_keys - n_queries`.
    """
    n_keys = n_queries if n_keys is None else n_keys
    q_pos = positions(n_queries, n_keys - n_queries, device=device)
    return additive_mask(causal(q_pos, positions(n_keys, device=device)))


def padding_mask(is_pad: Tensor) -> Tensor:
    """Additive mask `(b 1 1 j)` from `is_pad (b j)`, True where key j is padding to be ignored."""
    return rearrange(additive_mask(is_pad), "b j -> b 1 1 j")


def combine_masks(*masks: Tensor | None) -> Tensor | None:
    """Sum of additive masks and biases, broadcast: `(i j)` + `(b 1 1 j)` -> `(b 1 i j)`."""
    present = [m for m in masks if m is not None]
    if not present:
        return None
    return functools.reduce(torch.add, present)


def with_head_bias(mask: Tensor, bias: Tensor) -> Tensor:
    """An additive mask `(i j)` or `(b i j)` plus a per-head bias `(h i j)`: `(1 h i j)` or
    `(b h i j)`. (Adding `(b i j)` to `(h i j)` as they stand would pair batch rows with heads.)"""
    if mask.ndim == 3:
        mask = rearrange(mask, "b i j -> b 1 i j")
    return mask + rearrange(bias, "h i j -> 1 h i j")


def alibi_slopes(n_heads: int) -> Tensor:
    """ALiBi's per-head slopes `(h)` (float64), as the paper gives them (Press et al., 2022).

    For a power of two n: the geometric sequence 2^(-8/n), 2^(-16/n), ..., 2^(-8). Otherwise: the
    slopes of the nearest lower power of two c, then every other slope of 2c (its 1st, 3rd, ...)
    until there are n.
    """
    def geometric(n: int) -> list[float]:
        return [2.0 ** (-8.0 * k / n) for k in range(1, n + 1)]

    lower = 2 ** int(math.log2(n_heads))
    slopes = geometric(lower) + geometric(2 * lower)[0::2][: n_heads - lower]
    return torch.tensor(slopes, dtype=torch.float64)


def alibi_bias(slopes: Tensor, q_pos: Tensor, k_pos: Tensor) -> Tensor:
    """ALiBi's additive bias `(h i j)`: -slope_h x |i - j|, a linear penalty on distance.

    For keys at or before the query this is the paper's -m (i - j); the absolute value makes it
    symmetric for the keys a bidirectional prefix lets a query see ahead of it. Returned in the
    slopes' dtype: add it to the 0/-inf mask (and so to the scores) through `combine_masks`.
    """
    distance = _offset(q_pos, k_pos).abs().to(slopes.dtype)
    return -rearrange(slopes, "h -> h 1 1") * distance
