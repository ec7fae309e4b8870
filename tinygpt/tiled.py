"""FlashAttention written out by hand: the attention core over tiles, never forming `(b h i j)`.

`scaled_dot_product` (in `attention`) computes every score of a `(b h i j)` matrix, then the
weights, and keeps them for the backward pass: memory grows with the square of the context. Here
the same softmax(q kᵀ / √d + mask) v is computed one tile of `query_tile` rows by `key_tile` keys
at a time:

- forward, an *online softmax*: each row keeps a running maximum `m`, a running denominator `l`
  and an accumulator of weighted values, rescaled by exp(m_old - m_new) whenever a later tile
  raises the maximum. At the end out = accumulator / l, and the row's log-sum-exp m + log l is
  kept: one number per row instead of j weights.
- backward (FlashAttention-2): each tile's weights are recomputed from q, k and the log-sum-exp,
  P = exp(S - lse), and dV += Pᵀ dO, dP = dO Vᵀ, dS = P ∘ (dP - rowsum(dO ∘ O)), dQ += dS K,
  dK += dSᵀ Q. Nothing of size i x j is ever stored; only one tile lives at a time.

Masks are described by structure (`TileMask`), so a tile the mask blocks entirely (above the
causal diagonal, outside a sliding window, between two documents) is skipped, not computed and
masked. Same legend as `attention`: b batch, h heads, i query, j key positions, d per-head width.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from einops import einsum, rearrange
from torch import Tensor

# From `python -m benchmarks.tile_sizes` (causal, fwd+bwd, 6 heads of width 64, context 2,048):
# 128 x 128 was among the fastest. Larger tiles compute more wasted scores on the causal
# diagonal and fall out of the CPU's cache ((b h) x 128 x 128 fp32 is 384 KiB at 6 heads);
# smaller ones pay Python's overhead on more tiles. Rough: measured on a loaded, shared machine.
QUERY_TILE = 128
KEY_TILE = 128

Bias = Tensor | Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True, eq=False)
class TileMask:
    """Which keys each query may see, stated by structure so that whole tiles can be skipped.

    Queries sit at absolute positions `query_offset + i` (`query_offset` = keys already cached
    when decoding), keys at positions `j`. A key is blocked for a query when any of these says so:
    - `causal`: the key comes after the query;
    - `window` W: the key is W or more positions behind the query (each query sees at most its
      last W keys, itself included when causal);
    - `is_pad (b j)`: True where the key is padding;
    - `document_ids (b j)`: non-decreasing ids of packed documents, one per key position (queries
      take the ids at their own positions); a query sees only keys of its own document;
    - `bias`: added to the scores; -inf blocks. Either a tensor broadcastable to the scores
      `(b h i j)`, or a function `(query positions (i), key positions (j)) -> tensor broadcastable
      to (b h i j)` called per tile with absolute positions (ALiBi, for instance). It is a
      constant: no gradient flows into it.
    A query with no visible key gets a zero output (and zero gradients), as in `attention`.
    """

    causal: bool = False
    window: int | None = None
    query_offset: int = 0
    is_pad: Tensor | None = None  # b j
    document_ids: Tensor | None = None  # b j
    bias: Bias | None = None

    def __post_init__(self) -> None:
        if self.window is not None and (isinstance(self.window, bool) or self.window < 1):
            raise ValueError(f"window must be a positive number of keys, got {self.window!r}.")
        if self.query_offset < 0:
            raise ValueError(f"query_offset must be >= 0, got {self.query_offset}.")
        if self.is_pad is not None and self.is_pad.dtype != torch.bool:
            raise TypeError(f"is_pad must be boolean (True = padding), got {self.is_pad.dtype}.")
        if isinstance(self.bias, Tensor) and self.bias.requires_grad:
            raise ValueError("the tiled attention treats bias as a constant; detach it first.")
        # document_ids as Python ints, read from the device once here, so skipping never syncs.
        documents = None if self.document_ids is None else self.document_ids.tolist()
        if documents is not None and any(a > b for ids in documents for a, b in zip(ids, ids[1:])):
            raise ValueError("document_ids must be non-decreasing along each row (packed "
                             "documents), so that a tile's documents are a range.")
        object.__setattr__(self, "_documents", documents)


    def is_blocked(self, rows: range, cols: range) -> bool:
        """True if every (query, key) pair of the tile is blocked by the structure, from ints.

        The tile's corners decide: its earliest and latest query against its first and last key.
        Padding and the bias are data, not structure, and never block a tile here.
        """
        first, last = rows.start + self.query_offset, rows.stop - 1 + self.query_offset
        if self.causal and cols.start > last:  # every key after the latest query
            return True
        if self.window is not None and first - (cols.stop - 1) >= self.window:
            return True  # the nearest key is out of the earliest query's window
        if self._documents is not None:  # ids are sorted: a tile's documents are [first, last]
            return all(ids[last] < ids[cols.start] or ids[cols.stop - 1] < ids[first]
                       for ids in self._documents)
        return False

    def is_open(self, rows: range, cols: range) -> bool:
        """True if the structure blocks nothing in the tile (no causal, window or document mask
        is needed there), so the tile can skip building one."""
        first, last = rows.start + self.query_offset, rows.stop - 1 + self.query_offset
        if self.causal and cols.stop - 1 > first:  # the last key is after the earliest query
            return False
        if self.window is not None and last - cols.start >= self.window:
            return False
        if self._documents is not None:
            return all(ids[first] == ids[last] == ids[cols.start] == ids[cols.stop - 1]
                       for ids in self._documents)
        return True

    def tile(self, rows: range, cols: range, *, device=None, dtype=torch.float32
             ) -> Tensor | None:
        """The additive mask of the tile, broadcastable to `(b h i j)` scores of query rows
        `rows` and key columns `cols` (local indices of this call), or None if nothing is masked.

        0 where the key is visible, -inf where blocked, plus the bias.
        """
        is_blocked = None if self.is_open(rows, cols) else self._structure(rows, cols, device)
        if self.is_pad is not None:
            is_pad = rearrange(self.is_pad[:, cols.start:cols.stop], "b j -> b 1 1 j")
            is_blocked = is_pad if is_blocked is None else is_blocked | is_pad
        mask = None
        if is_blocked is not None:
            zeros = torch.zeros(is_blocked.shape, device=device, dtype=dtype)
            mask = zeros.masked_fill(is_blocked, float("-inf"))
        bias = self._bias(rows, cols, device, dtype)
        if bias is None:
            return mask
        return bias if mask is None else mask + bias

    def _structure(self, rows: range, cols: range, device) -> Tensor:
        """Boolean `(1|b 1 i j)`, True where causal, window or documents block the key."""
        query = torch.arange(rows.start, rows.stop, device=device) + self.query_offset  # i
        key = torch.arange(cols.start, cols.stop, device=device)  # j
        behind = rearrange(query, "i -> i 1") - rearrange(key, "j -> 1 j")  # i j
        is_blocked = torch.zeros(behind.shape, dtype=torch.bool, device=device)
        if self.causal:
            is_blocked |= behind < 0
        if self.window is not None:
            is_blocked |= behind >= self.window
        is_blocked = rearrange(is_blocked, "i j -> 1 1 i j")
        if self.document_ids is not None:
            first = rows.start + self.query_offset
            query_ids = self.document_ids[:, first:first + len(rows)]  # b i
            key_ids = self.document_ids[:, cols.start:cols.stop]  # b j
            other = rearrange(query_ids, "b i -> b 1 i 1") != rearrange(key_ids, "b j -> b 1 1 j")
            is_blocked = is_blocked | other
        return is_blocked

    def _bias(self, rows: range, cols: range, device, dtype) -> Tensor | None:
        if self.bias is None:
            return None
        if callable(self.bias) and not isinstance(self.bias, Tensor):
            query = torch.arange(rows.start, rows.stop, device=device) + self.query_offset
            return self.bias(query, torch.arange(cols.start, cols.stop, device=device)).to(dtype)
        bias = self.bias
        if bias.shape[-2] != 1:
            bias = bias[..., rows.start:rows.stop, :]
        if bias.shape[-1] != 1:
            bias = bias[..., cols.start:cols.stop]
        return bias.to(dtype)

    def dense(self, n_queries: int, n_keys: int, *, device=None, dtype=torch.float32
              ) -> Tensor | None:
        """The whole additive mask `(1|b 1|h i j)`, for the dense path (one tile of everything)."""
        return self.tile(range(n_queries), range(n_keys), device=device, dtype=dtype)

    def check(self, batch: int, n_queries: int, n_keys: int) -> None:
        """Raise a ValueError if the tensors of the mask do not fit a call of these sizes."""
        if self.document_ids is not None and self.query_offset + n_queries > n_keys:
            raise ValueError(f"query_offset {self.query_offset} + {n_queries} queries run past "
                             f"the {n_keys} keys whose document_ids they take.")
        for name in ("is_pad", "document_ids"):
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != (batch, n_keys):
                raise ValueError(f"{name} has shape {tuple(value.shape)}, expected "
                                 f"(batch, keys) = {(batch, n_keys)}.")


@dataclass(frozen=True)
class TileDropout:
    """Dropout of the attention weights, tile by tile: each tile's random keep-mask comes from a
    generator seeded with (seed, first row, first key), so the backward pass draws it again
    instead of storing an i x j mask."""

    p: float
    seed: int

    def keep(self, rows: range, cols: range, shape, *, device, dtype) -> Tensor:
        """The tile's `(b h i j)` keep-mask: 0 where a weight is dropped, 1 / (1 - p) elsewhere."""
        generator = torch.Generator(device=device)
        generator.manual_seed(hash((self.seed, rows.start, cols.start)) % 2**63)
        kept = torch.rand(shape, generator=generator, device=device) >= self.p
        return kept.to(dtype) / (1.0 - self.p)


def tiles(length: int, size: int) -> list[range]:
    """Consecutive ranges of `size` positions covering 0..length (the last may be shorter)."""
    return [range(start, min(start + size, length)) for start in range(0, length, size)]


def tile_plan(n_queries: int, n_keys: int, mask: TileMask, *, query_tile: int = QUERY_TILE,
              key_tile: int = KEY_TILE) -> list[tuple[range, list[range]]]:
    """For each tile of query rows, the key tiles that are computed (the others are blocked)."""
    return [(rows, [cols for cols in tiles(n_keys, key_tile) if not mask.is_blocked(rows, cols)])
            for rows in tiles(n_queries, query_tile)]


def _scores(q_rows: Tensor, k: Tensor, mask: TileMask, rows: range, cols: range) -> Tensor:
    """Masked scores `(b h i j)` of one tile; q is already scaled by 1/√d."""
    scores = einsum(q_rows, k[:, :, cols.start:cols.stop], "b h i d, b h j d -> b h i j")
    additive = mask.tile(rows, cols, device=scores.device, dtype=scores.dtype)
    return scores if additive is None else scores.add_(additive)


def _forward_rows(q_rows: Tensor, k: Tensor, v: Tensor, mask: TileMask, rows: range,
                  key_tiles: list[range], dropout: TileDropout | None) -> tuple[Tensor, Tensor]:
    """Online softmax of one tile of query rows over its key tiles: out `(b h i d)`, lse `(b h i)`.

    Per row: m is the largest score seen so far, l the sum of exp(score - m), acc the sum of
    exp(score - m) v. A new tile with a larger maximum rescales l and acc by exp(m_old - m_new).
    `m_safe` stands in for m while a row has seen only -inf (exp(-inf - -inf) would be NaN).
    Dropout acts on the weights that multiply v, never on the denominator l.
    """
    b, h, n, _ = q_rows.shape
    m = q_rows.new_full((b, h, n, 1), float("-inf"))
    m_safe = q_rows.new_zeros(b, h, n, 1)
    l = q_rows.new_zeros(b, h, n, 1)  # noqa: E741 - the paper's name
    acc = q_rows.new_zeros(b, h, n, v.shape[-1])
    for cols in key_tiles:
        scores = _scores(q_rows, k, mask, rows, cols)  # b h i j
        m_new = torch.maximum(m, scores.amax(dim=-1, keepdim=True))
        m_safe = m_new.masked_fill(torch.isneginf(m_new), 0.0)
        weights = scores.sub_(m_safe).exp_()  # unnormalised, <= 1; in place: no autograd here
        rescale = (m - m_safe).exp()  # 0 on the first visible tile, 1 if the maximum held
        l = l * rescale + weights.sum(dim=-1, keepdim=True)  # noqa: E741
        if dropout is not None:
            weights *= dropout.keep(rows, cols, weights.shape, device=weights.device,
                                    dtype=weights.dtype)
        acc = acc * rescale + einsum(weights, v[:, :, cols.start:cols.stop],
                                     "b h i j, b h j d -> b h i d")
        m = m_new
    out = acc / l.masked_fill(l == 0, 1.0)  # a row with no visible key: 0 / 1 = 0
    lse = rearrange(m_safe + l.log(), "b h i 1 -> b h i")  # -inf for a row with no visible key
    return out, lse


def _backward_rows(q_rows, k, v, grad_out_rows, delta_rows, lse_rows, mask, rows, key_tiles,
                   dropout, grad_k, grad_v) -> Tensor:
    """FlashAttention-2's backward for one tile of query rows: returns dQ `(b h i d)` (of the
    scaled q) and adds this tile's share into dK and dV `(b h j d)` in place.

    The weights are recomputed, P = exp(S - lse). `delta` = rowsum(dO ∘ O) - d(loss)/d(lse) is
    the term every dS of the row shares: dS = P ∘ (dP - delta). With dropout's keep-mask Z
    (0 or 1 / (1 - p)), out used P ∘ Z: dV takes P ∘ Z and dP is (dO Vᵀ) ∘ Z.
    """
    lse_rows = rearrange(lse_rows.masked_fill(torch.isneginf(lse_rows), float("inf")),
                         "b h i -> b h i 1")  # a row with no visible key: P = exp(-inf) = 0
    delta_rows = rearrange(delta_rows, "b h i -> b h i 1")
    grad_q_rows = torch.zeros_like(q_rows)
    for cols in key_tiles:
        k_cols, v_cols = k[:, :, cols.start:cols.stop], v[:, :, cols.start:cols.stop]
        weights = _scores(q_rows, k, mask, rows, cols).sub_(lse_rows).exp_()  # b h i j
        keep = None if dropout is None else dropout.keep(rows, cols, weights.shape,
                                                         device=weights.device, dtype=weights.dtype)
        grad_v[:, :, cols.start:cols.stop] += einsum(weights if keep is None else weights * keep,
                                                     grad_out_rows, "b h i j, b h i d -> b h j d")
        grad_weights = einsum(grad_out_rows, v_cols, "b h i d, b h j d -> b h i j")
        if keep is not None:
            grad_weights = grad_weights * keep
        grad_scores = weights * grad_weights.sub_(delta_rows)
        grad_q_rows = grad_q_rows + einsum(grad_scores, k_cols, "b h i j, b h j d -> b h i d")
        grad_k[:, :, cols.start:cols.stop] += einsum(grad_scores, q_rows,
                                                     "b h i j, b h i d -> b h j d")
    return grad_q_rows


class TiledAttention(torch.autograd.Function):
    """softmax(q kᵀ / √d + mask) v and its log-sum-exp, forward and backward over tiles.

    The backward is written with differentiable torch operations and saves only q, k, v, out and
    lse, so autograd can differentiate it again: second derivatives (gradgradcheck) work, at the
    cost of forming the backward's tiles once more.
    """

    @staticmethod
    def forward(ctx, q, k, v, mask: TileMask, query_tile: int, key_tile: int,
                dropout: TileDropout | None):
        plan = tile_plan(q.shape[2], k.shape[2], mask, query_tile=query_tile, key_tile=key_tile)
        q_scaled = q * q.shape[-1] ** -0.5
        out = q.new_empty(*q.shape[:-1], v.shape[-1])  # b h i d
        lse = q.new_empty(q.shape[:-1])  # b h i
        for rows, key_tiles in plan:
            out[:, :, rows.start:rows.stop], lse[:, :, rows.start:rows.stop] = _forward_rows(
                q_scaled[:, :, rows.start:rows.stop], k, v, mask, rows, key_tiles, dropout)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.mask, ctx.plan, ctx.dropout = mask, plan, dropout
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        scale = q.shape[-1] ** -0.5
        q_scaled = q * scale
        grad_out = torch.zeros_like(out) if grad_out is None else grad_out
        delta = (grad_out * out).sum(dim=-1)  # b h i
        if grad_lse is not None:
            delta = delta - grad_lse
        grad_q, grad_k, grad_v = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for rows, key_tiles in ctx.plan:
            part = slice(rows.start, rows.stop)
            grad_q[:, :, part] = _backward_rows(
                q_scaled[:, :, part], k, v, grad_out[:, :, part], delta[:, :, part],
                lse[:, :, part], ctx.mask, rows, key_tiles, ctx.dropout, grad_k, grad_v)
        return grad_q * scale, grad_k, grad_v, None, None, None, None


def tiled_attention(q: Tensor, k: Tensor, v: Tensor, mask: TileMask | None = None, *,
                    query_tile: int = QUERY_TILE, key_tile: int = KEY_TILE,
                    dropout_p: float = 0.0, dropout_seed: int | None = None
                    ) -> tuple[Tensor, Tensor]:
    """softmax(q kᵀ / √d + mask) v for q `(b h i d)`, k and v `(b h j d)`: out `(b h i d)` and
    the log-sum-exp of each row's masked scores `(b h i)` (-inf for a row with no visible key).

    Equal to `attention.scaled_dot_product` given `mask.dense(i, j)`, in memory linear in i and j.
    Decoding (a few queries against a long cache) takes the same path: the keys are split into
    tiles whose partial softmaxes are combined through their maxima and sums, which is the
    log-sum-exp of the whole row. `dropout_p` drops attention weights (after the softmax, as
    `scaled_dot_product` does), with tile masks drawn from `dropout_seed`, or from a seed taken
    from torch's default generator (so `torch.manual_seed` makes a call repeatable).
    """
    mask = TileMask() if mask is None else mask
    if (q.ndim != 4 or k.shape[:-1] != v.shape[:-1] or q.shape[:2] != k.shape[:2]
            or q.shape[-1] != k.shape[-1]):
        raise ValueError(f"expected q (b h i d), k (b h j d) and v (b h j d_v), got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}.")
    if query_tile < 1 or key_tile < 1:
        raise ValueError(f"tile sizes must be positive, got {query_tile} x {key_tile}.")
    mask.check(q.shape[0], q.shape[2], k.shape[2])
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}.")
    dropout = None
    if dropout_p > 0:
        seed = int(torch.randint(2**62, (1,))) if dropout_seed is None else dropout_seed
        dropout = TileDropout(dropout_p, seed)
    return TiledAttention.apply(q, k, v, mask, query_tile, key_tile, dropout)


def multihead_core(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | TileMask | None = None,
                   key_padding_mask: Tensor | None = None, *, need_weights: bool = False,
                   dropout_p: float = 0.0) -> Tensor:
    """The tiled core behind `MultiHeadAttention(impl="tiled")`: z `(b h i d)` from q, k, v.

    `attn_mask` is a `TileMask` (whose blocked tiles are skipped) or MHA's dense `(i j)` mask,
    boolean (True = blocked) or additive, which becomes the bias; `key_padding_mask (b j)` is
    likewise boolean or additive. The weights are never formed, so none can be returned.
    """
    if need_weights:
        raise ValueError("the tiled attention never forms the (b h i j) weights; use "
                         "attention_impl='dense' for need_weights=True.")
    mask = attn_mask if isinstance(attn_mask, TileMask) else TileMask(bias=_additive(attn_mask))
    if key_padding_mask is not None and key_padding_mask.dtype == torch.bool:
        is_pad = key_padding_mask if mask.is_pad is None else mask.is_pad | key_padding_mask
        mask = replace(mask, is_pad=is_pad)
    elif key_padding_mask is not None:
        padding = rearrange(key_padding_mask, "b j -> b 1 1 j")
        if mask.bias is not None and not isinstance(mask.bias, Tensor):
            raise ValueError("an additive key_padding_mask cannot join a callable bias; pass "
                             "it as a boolean (True = padding).")
        mask = replace(mask, bias=padding if mask.bias is None else mask.bias + padding)
    return tiled_attention(q, k, v, mask, query_tile=QUERY_TILE, key_tile=KEY_TILE,
                           dropout_p=dropout_p)[0]


def _additive(mask: Tensor | None) -> Tensor | None:
    """MHA's boolean mask (True = blocked) as 0/-inf; an additive float mask as it is."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, device=mask.device).masked_fill(mask, float("-inf"))
