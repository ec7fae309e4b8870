"""The decoder-only GPT: embeddings, a stack of blocks around the hand-written attention, a head."""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from tinygpt import masks
from tinygpt.attention import HookPoint, KVCache, MultiHeadAttention
from tinygpt.config import ModelConfig
from tinygpt.tiled import TileMask

_ACTIVATIONS = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
}

# State-dict keys before the LM head and the MLP's layers got their names: checkpoints written
# then still load (see `_rename_old_keys`).
_OLD_KEYS = ((re.compile(r"^head\."), "lm_head."),
             (re.compile(r"\.mlp\.0\."), ".mlp.fc_in."),
             (re.compile(r"\.mlp\.2\."), ".mlp.fc_out."))


class MLP(nn.Module):
    """The position-wise feed-forward layer: `(h d) -> f -> (h d)` with an activation between."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.fc_in = nn.Linear(config.d_model, config.d_ff)
        self.activation = _ACTIVATIONS[config.activation]()
        self.fc_out = nn.Linear(config.d_ff, config.d_model)

    def forward(self, x: Tensor) -> Tensor:  # b t (h d) -> b t (h d)
        return self.fc_out(self.activation(self.fc_in(x)))


class DecoderBlock(nn.Module):
    """Attention and a two-layer MLP, each with a residual and a LayerNorm.

    Post-norm (the seed, the original Transformer): `x = norm(x + sublayer(x))`.
    Pre-norm (GPT-2, `norm_first`): `x = x + sublayer(norm(x))`, which trains deeper stacks stably.
    With `attn_only` there is no MLP: `resid_post` is `resid_mid`.

    Hook points are declared in forward order (the attention's own sit between `hook_resid_pre`
    and `hook_attn_out`), so `inspection.hook_names` lists them in the order they fire.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm_first = config.norm_first
        self.input_scale = config.d_model ** -0.5 if config.seed_input_scale else None
        eps = config.layer_norm_eps
        self.hook_resid_pre = HookPoint()  # b t (h d)
        self.attention = MultiHeadAttention(config.d_model, config.n_heads, config.dropout,
                                            impl=config.attention_impl,
                                            n_kv_heads=config.n_kv_heads,
                                            rope=config.position == "rope")
        self.hook_attn_out = HookPoint()  # b t (h d), after dropout
        self.norm1 = nn.LayerNorm(config.d_model, eps=eps)
        self.hook_resid_mid = HookPoint()  # b t (h d)
        self.mlp = None if config.attn_only else MLP(config)
        self.hook_mlp_out = HookPoint()  # b t (h d), after dropout (zeros when attn_only)
        # Without an MLP there is nothing for a second LayerNorm to normalise.
        self.norm2 = nn.Identity() if config.attn_only else nn.LayerNorm(config.d_model, eps=eps)
        self.hook_resid_post = HookPoint()  # b t (h d)
        self.dropout = nn.Dropout(config.dropout)

    def _attend(self, x: Tensor, mask: Tensor | None, key_padding_mask: Tensor | None,
                cache: KVCache | None, positions: Tensor | None) -> Tensor:
        if self.input_scale is not None:
            x = x * self.input_scale
        out, _ = self.attention(x, attn_mask=mask, key_padding_mask=key_padding_mask, cache=cache,
                                positions=positions)
        return self.hook_attn_out(self.dropout(out))

    def _feed_forward(self, x: Tensor) -> Tensor:
        if self.mlp is None:
            return self.hook_mlp_out(torch.zeros_like(x))
        return self.hook_mlp_out(self.dropout(self.mlp(x)))

    def forward(self, x, mask=None, key_padding_mask=None, cache=None, positions=None):
        """x `(b t (h d))` -> `(b t (h d))`; `positions (t)` or `(b t)` reach RoPE, if used."""
        resid_pre = self.hook_resid_pre(x)
        if self.norm_first:
            attn_out = self._attend(self.norm1(resid_pre), mask, key_padding_mask, cache, positions)
            resid_mid = self.hook_resid_mid(resid_pre + attn_out)
            mlp_out = self._feed_forward(self.norm2(resid_mid))
            return self.hook_resid_post(resid_mid + mlp_out)
        attn_out = self._attend(resid_pre, mask, key_padding_mask, cache, positions)
        resid_mid = self.hook_resid_mid(self.norm1(resid_pre + attn_out))
        mlp_out = self._feed_forward(resid_mid)
        return self.hook_resid_post(self.norm2(resid_mid + mlp_out))


class TinyDecoderModel(nn.Module):
    """Token embedding (+ learned positions) -> blocks -> (final LayerNorm if pre-norm) -> LM head.

    `config.position` picks how positions enter: a learned table added here, or ALiBi's bias and
    RoPE's rotation inside each attention (built from `tinygpt.masks` and `tinygpt.positions`),
    or nothing. `forward` checks no token values (that would be a host sync per call on a GPU and
    a graph break under `torch.compile`): callers that take ids from outside call
    `check_token_ids` once.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        if config.position == "learned":
            self.positional = nn.Parameter(torch.empty(config.max_seq, config.d_model))  # t (h d)
        else:
            self.register_parameter("positional", None)
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(DecoderBlock(config) for _ in range(config.n_layers))
        self.final_norm = (nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
                           if config.norm_first else None)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=config.head_bias)
        # Not persistent: both are derived from the config, so checkpoints need not carry them.
        self.register_buffer("causal_mask", masks.causal_mask(config.max_seq), persistent=False)
        if config.position == "alibi":  # float64, cast to the activations' dtype where used
            self.register_buffer("alibi_slopes", masks.alibi_slopes(config.n_heads),
                                 persistent=False)
        init_weights(self)
        if config.tie_embeddings:
            self.lm_head.weight = self.embedding.weight  # one tensor: v (h d)
        self.register_state_dict_post_hook(_drop_tied_head)
        self.register_load_state_dict_pre_hook(_rename_old_keys)

    def forward(self, idx: Tensor, *, cache: list[KVCache] | None = None,
                positions: Tensor | None = None, key_padding_mask: Tensor | None = None,
                document_ids: Tensor | None = None, prefix_len: Tensor | None = None) -> Tensor:
        """idx `(b t)` token ids -> logits `(b t v)`.

        `cache` (from `new_cache`) holds each block's earlier keys and values: the t tokens
        follow the cached positions and their keys are appended. `positions (b t)` overrides each
        token's position, for rows padded on the left; `key_padding_mask (b j)` is True where key
        j (cached or new) is padding. `document_ids (b j)` labels every position, cached and new,
        with its document: no token sees another document, and learned and rotary positions
        restart at each one. `prefix_len (b)` lets the first `prefix_len` positions of each row
        see each other both ways (a prefix-LM); the rest stays causal.
        """
        t = idx.shape[1]
        if cache is not None and len(cache) != len(self.blocks):
            raise ValueError(f"cache has {len(cache)} layers, the model {len(self.blocks)}.")
        past = 0 if cache is None else cache[0].length  # a tensor for a fixed-size cache
        if isinstance(past, int) and past + t > self.config.max_seq:  # fixed buffers cannot grow
            raise ValueError(
                f"{past} cached + {t} new positions exceed max_seq={self.config.max_seq}."
            )
        if document_ids is not None and positions is None:
            positions = document_positions(_checked_documents(document_ids, idx, past))[:, past:]
        x = self.embedding(idx)
        if self.positional is not None:
            x = x + self._positional(idx, positions, past)
        x = self.dropout(x)
        mask = self._attention_mask(t, past, x, document_ids, prefix_len)
        for block, layer_cache in zip(self.blocks, cache or [None] * len(self.blocks)):
            x = block(x, mask, key_padding_mask, layer_cache, positions)
        if self.final_norm is not None:
            x = self.final_norm(x)
        return self.lm_head(x)

    def _attention_mask(self, t: int, past: int | Tensor, x: Tensor, document_ids: Tensor | None,
                        prefix_len: Tensor | None) -> Tensor | None:
        """The additive mask every block shares: `(i j)`, `(b i j)`, or `(1|b h i j)` with ALiBi;
        for the tiled core, the same mask as a `TileMask` (a prefix-LM's goes as a dense bias)."""
        config = self.config
        if config.attention_impl == "tiled" and prefix_len is None:
            return self._tile_mask(past, x.dtype, document_ids)
        if (config.window is None and config.position != "alibi" and document_ids is None
                and prefix_len is None):
            # = causal_mask(t, past + t); one new token may see every key, so it needs no mask.
            return None if t == 1 else self.causal_mask[past:past + t, :past + t].to(x.dtype)
        q_pos = masks.positions(t, device=x.device) + past
        # A fixed-size cache (its length a tensor, so one compiled graph serves every step) shows
        # the attention all of its max_seq columns; the unwritten ones are padding.
        n_keys = self.config.max_seq if isinstance(past, Tensor) else past + t
        k_pos = masks.positions(n_keys, device=x.device)
        if prefix_len is not None:
            if document_ids is not None or config.window is not None:
                raise ValueError("prefix_len cannot be combined with document_ids or a window.")
            blocked = masks.prefix_lm(q_pos, k_pos, prefix_len)
        elif document_ids is not None:
            blocked = masks.document(q_pos, k_pos, document_ids)
        else:
            blocked = masks.causal(q_pos, k_pos)
        if config.window is not None:
            blocked = masks.blocked_by_any(blocked,
                                           masks.sliding_window(q_pos, k_pos, config.window))
        mask = masks.additive_mask(blocked, x.dtype)
        if config.position == "alibi":
            bias = masks.alibi_bias(self.alibi_slopes, q_pos, k_pos)
            mask = masks.with_head_bias(mask, bias.to(x.dtype))
        return mask

    def _tile_mask(self, past: int, dtype: torch.dtype, document_ids: Tensor | None) -> TileMask:
        """The mask as structure, so that the tiled core skips the tiles it blocks; ALiBi as a
        bias the core asks for one tile of query and key positions at a time."""
        bias = None
        if self.config.position == "alibi":
            slopes = self.alibi_slopes

            def bias(q_pos: Tensor, k_pos: Tensor) -> Tensor:  # 1 h i j
                tile = masks.alibi_bias(slopes, q_pos, k_pos).to(dtype)
                return rearrange(tile, "h i j -> 1 h i j")

        return TileMask(causal=True, window=self.config.window, query_offset=past,
                        document_ids=document_ids, bias=bias)

    def _positional(self, idx: Tensor, positions: Tensor | None, past: int) -> Tensor:
        """Position embeddings `(t (h d))` after the cache, or `(b t (h d))` for given positions."""
        if positions is None:
            return self.positional[past:past + idx.shape[1]]
        if positions.shape != idx.shape:
            raise ValueError(
                f"positions {tuple(positions.shape)} must match idx {tuple(idx.shape)}."
            )
        return self.positional[positions]

    def new_cache(self) -> list[KVCache]:
        """An empty key/value cache, one `KVCache` per block, for `forward(..., cache=)`."""
        return [KVCache() for _ in self.blocks]


def _drop_tied_head(model: TinyDecoderModel, state: dict, prefix: str, local_metadata) -> None:
    """With tied embeddings the state dict holds the shared tensor once, as `embedding.weight`
    (safetensors refuses two names for one storage)."""
    if model.config.tie_embeddings:
        state.pop(f"{prefix}lm_head.weight", None)


def _rename_old_keys(model: TinyDecoderModel, state: dict, prefix: str, *args) -> None:
    """Load pre-hook: old names (`head.*`, `mlp.0.*`, `mlp.2.*`) to today's, and the tied head's
    weight from the embedding, so every checkpoint saved before still loads with `strict=True`."""
    for key in [k for k in state if k.startswith(prefix)]:
        local = key[len(prefix):]
        for old, new in _OLD_KEYS:
            local = old.sub(new, local, count=1)
        if prefix + local != key:
            state[prefix + local] = state.pop(key)
    tied = f"{prefix}embedding.weight"
    if tied in state and f"{prefix}lm_head.weight" not in state:
        state[f"{prefix}lm_head.weight"] = state[tied]


def _checked_documents(document_ids: Tensor, idx: Tensor, past: int) -> Tensor:
    expected = (idx.shape[0], past + idx.shape[1])
    if tuple(document_ids.shape) != expected:
        raise ValueError(f"document_ids {tuple(document_ids.shape)} must be (batch, cached + new "
                         f"positions) = {expected}.")
    return document_ids


def document_positions(document_ids: Tensor) -> Tensor:
    """Each token's position inside its document, `(b t)` from `document_ids (b t)`: 0 at every
    change of id, counting up until the next."""
    columns = torch.arange(document_ids.shape[1], device=document_ids.device)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    start = torch.where(starts, columns, 0).cummax(dim=1).values
    return columns - start


def init_weights(model: nn.Module) -> None:
    """The seed's initialisation: Xavier-normal for every Linear, Embedding and positional table,
    zero biases, LayerNorm at 1 and 0.

    On the fused (3E, E) `in_proj` this gives std √(2/4E), the same spread as the Xavier-uniform
    that `nn.MultiheadAttention` puts on its packed `in_proj_weight`.
    """
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.xavier_normal_(module.weight)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    positional = getattr(model, "positional", None)
    if isinstance(positional, nn.Parameter):
        nn.init.xavier_normal_(positional)


def gpt2_init(model: TinyDecoderModel) -> None:
    """GPT-2's initialisation: weights N(0, 0.02), and the projections that write into the residual
    stream (attention `out_proj`, the MLP's `fc_out`) shrunk by 1/sqrt(2 n_layers) so the stream's
    variance does not grow with depth; zero biases. An alternative to the model's own Xavier init,
    which trained faster on the laptop recipe at lr 1e-3 (smaller weights learn slower).
    """
    residual_writers = ("out_proj.weight", "fc_out.weight")
    std_out = 0.02 / math.sqrt(2 * model.config.n_layers)
    for name, param in model.named_parameters():
        if name.endswith("bias") or "norm" in name:
            continue
        nn.init.normal_(param, std=std_out if name.endswith(residual_writers) else 0.02)


def check_token_ids(idx: Tensor, config: ModelConfig) -> None:
    """Raise a ValueError naming the bad value, before an index error deep inside torch does."""
    if idx.dtype not in (torch.int64, torch.int32):  # the index dtypes nn.Embedding accepts
        raise ValueError(f"token ids must be an int64 or int32 tensor, got dtype {idx.dtype}.")
    if idx.ndim != 2:
        raise ValueError(f"token ids must have shape (batch, time), got {tuple(idx.shape)}.")
    t = idx.shape[1]
    if not 1 <= t <= config.max_seq:
        raise ValueError(f"sequence length {t} is outside 1..max_seq={config.max_seq}.")
    low, high = idx.aminmax()
    if low < 0 or high >= config.vocab_size:
        bad = int(low) if low < 0 else int(high)
        raise ValueError(f"token id {bad} is outside the vocabulary 0..{config.vocab_size - 1}.")


def check_positions(positions: Tensor, config: ModelConfig) -> None:
    """Raise a ValueError unless every position `(b t)` lies in 0..max_seq-1 (a boundary check:
    `forward` indexes the position table without looking)."""
    low, high = positions.aminmax()
    if low < 0 or high >= config.max_seq:
        raise ValueError(f"positions must lie in 0..{config.max_seq - 1}.")


def next_token_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy of logits `(b t v)` against targets `(b t)` (the inputs shifted by one).

    Flattened on purpose: `F.cross_entropy` reads a 3-D input as `(b v t)`, which is silently
    wrong when t == v.
    """
    flat_logits = rearrange(logits, "b t v -> (b t) v")
    return F.cross_entropy(flat_logits, rearrange(targets, "b t -> (b t)"))


def planned_parameter_table(config: ModelConfig) -> list[tuple[str, int]]:
    """The `parameter_table` that `TinyDecoderModel(config)` would have, from the config alone:
    counts at any size, instantly, with nothing allocated. (Building on the meta device would
    also allocate nothing, but in torch 2.13 its initialisers import the compiler stack, 70 MB
    resident for the rest of the process.) Tests compare it with built models over drawn configs.
    """
    d, v = config.d_model, config.vocab_size
    linear = lambda n_in, n_out: n_in * n_out + n_out  # noqa: E731 (weight and bias)
    layer_norm = 2 * d
    d_kv = (config.n_kv_heads or config.n_heads) * config.d_head
    rows = [("positional", config.max_seq * d)] if config.position == "learned" else []
    rows.append(("embedding", v * d))
    for n in range(config.n_layers):
        rows += [(f"blocks.{n}.attention", linear(d, d + 2 * d_kv) + linear(d, d)),
                 (f"blocks.{n}.norm1", layer_norm)]
        if not config.attn_only:
            rows += [(f"blocks.{n}.mlp", linear(d, config.d_ff) + linear(config.d_ff, d)),
                     (f"blocks.{n}.norm2", layer_norm)]
    if config.norm_first:
        rows.append(("final_norm", layer_norm))
    head_bias = v if config.head_bias else 0
    if config.tie_embeddings:
        rows.append(("lm_head (tied)", head_bias))
    else:
        rows.append(("lm_head", v * d + head_bias))
    return rows


def parameter_table(model: nn.Module) -> list[tuple[str, int]]:
    """Parameters per module, in the order the input flows through them. A tied LM head counts
    only its bias: its weight is the embedding's, counted there."""
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    rows = [] if model.positional is None else [("positional", model.positional.numel())]
    rows.append(("embedding", count(model.embedding)))
    for n, block in enumerate(model.blocks):
        rows += [(f"blocks.{n}.attention", count(block.attention)),
                 (f"blocks.{n}.norm1", count(block.norm1))]
        if block.mlp is not None:
            rows += [(f"blocks.{n}.mlp", count(block.mlp)),
                     (f"blocks.{n}.norm2", count(block.norm2))]
    if model.final_norm is not None:
        rows.append(("final_norm", count(model.final_norm)))
    head = model.lm_head
    if head.weight is model.embedding.weight:
        rows.append(("lm_head (tied)", 0 if head.bias is None else head.bias.numel()))
    else:
        rows.append(("lm_head", count(head)))
    return rows
