"""`tinygpt.model` built on `nn.MultiheadAttention(batch_first=True)`, name for name.

Only the configuration and the weight initialisation come from `tinygpt`; the attention, the
causal mask (torch's own `generate_square_subsequent_mask`) and the mask handling are torch's.
Sliding windows, documents, prefixes and ALiBi reach MHA as a float `((b h) i j)` mask from
`reference.masks`; RoPE and grouped key/value heads have no MHA form, so the reference refuses
them (their oracles are in the tests).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn

from reference import masks
from tinygpt.config import ModelConfig
from tinygpt.model import init_weights

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "gelu_tanh": lambda: nn.GELU(approximate="tanh")}


class ReferenceDecoderBlock(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm_first = config.norm_first
        self.input_scale = config.d_model ** -0.5 if config.seed_input_scale else None
        self.attention = nn.MultiheadAttention(
            config.d_model, config.n_heads, dropout=config.dropout, batch_first=True
        )
        eps = config.layer_norm_eps
        self.norm1 = nn.LayerNorm(config.d_model, eps=eps)
        self.mlp = None if config.attn_only else nn.Sequential(OrderedDict(
            fc_in=nn.Linear(config.d_model, config.d_ff),
            activation=_ACTIVATIONS[config.activation](),
            fc_out=nn.Linear(config.d_ff, config.d_model),
        ))
        self.norm2 = nn.Identity() if config.attn_only else nn.LayerNorm(config.d_model, eps=eps)
        self.dropout = nn.Dropout(config.dropout)

    def _attend(self, x: Tensor, mask: Tensor) -> Tensor:
        if self.input_scale is not None:
            x = x * self.input_scale
        out, _ = self.attention(x, x, x, attn_mask=mask, need_weights=False)
        return self.dropout(out)

    def _feed_forward(self, x: Tensor) -> Tensor:
        return torch.zeros_like(x) if self.mlp is None else self.dropout(self.mlp(x))

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        if self.norm_first:
            x = x + self._attend(self.norm1(x), mask)
            return x + self._feed_forward(self.norm2(x))
        x = self.norm1(x + self._attend(x, mask))
        return self.norm2(x + self._feed_forward(x))


class ReferenceDecoderModel(nn.Module):
    """The oracle. `bool_mask=True` passes the boolean twin of the causal mask (True = blocked),
    which lets `nn.MultiheadAttention` take its native fast path in eval + inference mode."""

    def __init__(self, config: ModelConfig, bool_mask: bool = False):
        super().__init__()
        if config.position == "rope" or config.n_kv_heads not in (None, config.n_heads):
            raise ValueError("nn.MultiheadAttention has no RoPE and no grouped key/value heads.")
        self.config = config
        if config.position == "learned":
            self.positional = nn.Parameter(torch.empty(config.max_seq, config.d_model))
        else:
            self.register_parameter("positional", None)
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(ReferenceDecoderBlock(config) for _ in range(config.n_layers))
        self.final_norm = (nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
                           if config.norm_first else None)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=config.head_bias)
        mask = nn.Transformer.generate_square_subsequent_mask(config.max_seq)
        self.register_buffer("causal_mask", torch.isinf(mask) if bool_mask else mask,
                             persistent=False)
        init_weights(self)
        for block in self.blocks:  # init_weights never sees MHA's bare packed parameters
            nn.init.xavier_normal_(block.attention.in_proj_weight)
            nn.init.zeros_(block.attention.in_proj_bias)
        if config.tie_embeddings:
            self.lm_head.weight = self.embedding.weight

    def forward(self, idx: Tensor, document_ids: Tensor | None = None,
                prefix_len: Tensor | None = None) -> Tensor:
        t = idx.shape[1]
        x = self.embedding(idx)
        if self.positional is not None:
            x = x + self._positional(t, document_ids)
        x = self.dropout(x)
        config = self.config
        if (config.position == "alibi" or config.window is not None or document_ids is not None
                or prefix_len is not None):
            may_attend = masks.allowed(idx.shape[0], t, window=config.window,
                                       document_ids=document_ids, prefix_len=prefix_len)
            mask = masks.float_mask(may_attend, config.n_heads, x.dtype,
                                    alibi=config.position == "alibi")
        else:
            mask = self.causal_mask[:t, :t]
            if mask.is_floating_point():
                mask = mask.to(x.dtype)
        for block in self.blocks:
            x = block(x, mask)
        if self.final_norm is not None:
            x = self.final_norm(x)
        return self.lm_head(x)

    def _positional(self, t: int, document_ids: Tensor | None) -> Tensor:
        """The table's first t rows, or `(b t (h d))` restarting at 0 in every document."""
        if document_ids is None:
            return self.positional[:t]
        rows = []
        for ids in document_ids:
            lengths = torch.unique_consecutive(ids, return_counts=True)[1].tolist()
            rows.append(torch.cat([torch.arange(n) for n in lengths]))
        return self.positional[torch.stack(rows)]
