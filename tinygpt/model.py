"""The decoder-only GPT: embeddings, a stack of blocks around the hand-written attention, a head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from tinygpt.attention import HookPoint, KVCache, MultiHeadAttention, causal_mask
from tinygpt.config import ModelConfig

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU}


class DecoderBlock(nn.Module):
    """Attention and a two-layer MLP, each with a residual and a LayerNorm.

    Post-norm (the seed, the original Transformer): `x = norm(x + sublayer(x))`.
    Pre-norm (GPT-2, `norm_first`): `x = x + sublayer(norm(x))`, which trains deeper stacks stably.
    """

    HOOKS = ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post")

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm_first = config.norm_first
        self.input_scale = config.d_model ** -0.5 if config.seed_input_scale else None
        self.attention = MultiHeadAttention(config.d_model, config.n_heads, config.dropout)
        self.norm1 = nn.LayerNorm(config.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(config.d_model, config.d_ff),
            _ACTIVATIONS[config.activation](),
            nn.Linear(config.d_ff, config.d_model),
        )
        self.norm2 = nn.LayerNorm(config.d_model)
        self.dropout = nn.Dropout(config.dropout)
        for name in self.HOOKS:
            self.add_module(f"hook_{name}", HookPoint())

    def _attend(self, x: Tensor, mask: Tensor | None, key_padding_mask: Tensor | None,
                cache: KVCache | None) -> Tensor:
        if self.input_scale is not None:
            x = x * self.input_scale
        out, _ = self.attention(x, attn_mask=mask, key_padding_mask=key_padding_mask, cache=cache)
        return self.hook_attn_out(self.dropout(out))

    def forward(self, x, mask=None, key_padding_mask=None, cache=None):  # b t (h d) -> b t (h d)
        x = self.hook_resid_pre(x)
        if self.norm_first:
            x = self.hook_resid_mid(x + self._attend(self.norm1(x), mask, key_padding_mask, cache))
            return self.hook_resid_post(x + self.hook_mlp_out(self.dropout(self.mlp(self.norm2(x)))))
        x = self.hook_resid_mid(self.norm1(x + self._attend(x, mask, key_padding_mask, cache)))
        return self.hook_resid_post(self.norm2(x + self.hook_mlp_out(self.dropout(self.mlp(x)))))


class TinyDecoderModel(nn.Module):
    """Token embedding + learned positions -> blocks -> (final LayerNorm if pre-norm) -> head."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.positional = nn.Parameter(torch.empty(config.max_seq, config.d_model))  # t (h d)
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(DecoderBlock(config) for _ in range(config.n_layers))
        self.final_norm = nn.LayerNorm(config.d_model) if config.norm_first else None
        self.head = nn.Linear(config.d_model, config.vocab_size)
        # Not persistent: it is derived from max_seq, so checkpoints need not carry it.
        self.register_buffer("causal_mask", causal_mask(config.max_seq), persistent=False)
        init_weights(self)

    def forward(self, idx: Tensor, *, cache: list[KVCache] | None = None,
                positions: Tensor | None = None, key_padding_mask: Tensor | None = None) -> Tensor:
        """idx `(b t)` token ids -> logits `(b t v)`.

        The keywords serve decoding (`tinygpt.generate`). `cache` (from `new_cache`) holds each
        block's earlier keys and values: the t tokens follow the cached positions and their keys are
        appended. `positions (b t)` overrides each token's position, for rows padded on the left;
        `key_padding_mask (b j)` is True where key j (cached or new) is padding.
        """
        check_token_ids(idx, self.config)
        t = idx.shape[1]
        if cache is not None and len(cache) != len(self.blocks):
            raise ValueError(f"cache has {len(cache)} layers, the model {len(self.blocks)}.")
        past = 0 if cache is None else cache[0].length
        if past + t > self.config.max_seq:
            raise ValueError(
                f"{past} cached + {t} new positions exceed max_seq={self.config.max_seq}."
            )
        x = self.dropout(self.embedding(idx) + self._positional(idx, positions, past))
        # = causal_mask(t, past + t); one new token may see every key, so it needs no mask.
        mask = None if t == 1 else self.causal_mask[past:past + t, :past + t].to(x.dtype)
        for block, layer_cache in zip(self.blocks, cache or [None] * len(self.blocks)):
            x = block(x, mask, key_padding_mask, layer_cache)
        if self.final_norm is not None:
            x = self.final_norm(x)
        return self.head(x)

    def _positional(self, idx: Tensor, positions: Tensor | None, past: int) -> Tensor:
        """Position embeddings `(t (h d))` after the cache, or `(b t (h d))` for given positions."""
        if positions is None:
            return self.positional[past:past + idx.shape[1]]
        if positions.shape != idx.shape:
            raise ValueError(
                f"positions {tuple(positions.shape)} must match idx {tuple(idx.shape)}."
            )
        low, high = positions.aminmax()
        if low < 0 or high >= self.config.max_seq:
            raise ValueError(f"positions must lie in 0..{self.config.max_seq - 1}.")
        return self.positional[positions]

    def new_cache(self) -> list[KVCache]:
        """An empty key/value cache, one `KVCache` per block, for `forward(..., cache=)`."""
        return [KVCache() for _ in self.blocks]


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


def next_token_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy of logits `(b t v)` against targets `(b t)` (the inputs shifted by one).

    Flattened on purpose: `F.cross_entropy` reads a 3-D input as `(b v t)`, which is silently
    wrong when t == v.
    """
    return F.cross_entropy(rearrange(logits, "b t v -> (b t) v"), rearrange(targets, "b t -> (b t)"))


def parameter_table(model: nn.Module) -> list[tuple[str, int]]:
    """Parameters per module, in the order the input flows through them."""
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    rows = [("positional", model.positional.numel()), ("embedding", count(model.embedding))]
    for n, block in enumerate(model.blocks):
        rows += [
            (f"blocks.{n}.attention", count(block.attention)),
            (f"blocks.{n}.norm1", count(block.norm1)),
            (f"blocks.{n}.mlp", count(block.mlp)),
            (f"blocks.{n}.norm2", count(block.norm2)),
        ]
    if model.final_norm is not None:
        rows.append(("final_norm", count(model.final_norm)))
    rows.append(("head", count(model.head)))
    return rows
