"""The five attention implementations under test, built with the same weights and checked to agree.

- `hand`: TinyGPT's hand-written einops attention (`tinygpt.attention.MultiHeadAttention`).
- `mha`: `torch.nn.MultiheadAttention(batch_first=True)`, the reference of every ratio.
- `sdpa`: the hand-written module with its core swapped for `F.scaled_dot_product_attention`, the
  fused kernel. It lives here, apart from the readable attention, because it hides the maths.
- `compiled`: the hand-written module under `torch.compile`.
- `tiled`: the hand-written module with `impl="tiled"`: FlashAttention written out by hand
  (`tinygpt.tiled`), given the causal mask as structure (`TileMask(causal=True)`), so that the
  tiles above the diagonal are skipped and no `(b h i j)` tensor is formed.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from reference import ReferenceDecoderModel, copy_weights
from tinygpt.attention import KVCache, MultiHeadAttention, causal_mask
from tinygpt.config import ModelConfig
from tinygpt.model import TinyDecoderModel
from tinygpt.tiled import TileMask

IMPLEMENTATIONS = {
    "hand": "hand-written (einops)",
    "mha": "nn.MultiheadAttention",
    "sdpa": "hand-written, SDPA core",
    "compiled": "hand-written, torch.compile",
    "tiled": "hand-written, tiled (FlashAttention)",
}
REFERENCE = "mha"


class FusedAttention(MultiHeadAttention):
    """`MultiHeadAttention` whose core is torch's fused `scaled_dot_product_attention`.

    Same parameters and projections as the hand-written module, so its weights load unchanged; only
    softmax(q kᵀ / √d + mask) v is delegated. It takes an additive float mask, which SDPA adds to
    the scores exactly as the hand-written core does (a *boolean* mask would mean the opposite
    there: True = may attend). It never returns weights: the fused kernel never forms them.
    """

    def forward(self, x, attn_mask=None, key_padding_mask=None, need_weights=False,
                average_attn_weights=True, cache: KVCache | None = None, positions=None):
        """x `(b t (h d))`, attn_mask `(i j)` additive float -> out `(b t (h d))`, None.
        (`positions` is for RoPE, which the benchmarked models do not use.)"""
        if need_weights or key_padding_mask is not None:
            raise ValueError("FusedAttention takes only an attn_mask and returns no weights.")
        if attn_mask is not None and not attn_mask.is_floating_point():
            raise ValueError(
                f"FusedAttention needs an additive float mask, got dtype {attn_mask.dtype}.")
        q, k, v = rearrange(self.in_proj(x), "b t (three h d) -> three b h t d", three=3,
                            h=self.n_heads)
        if cache is not None:
            k, v = cache.append(k, v)  # b h j d
        dropout_p = self.dropout if self.training else 0.0
        z = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
        return self.out_proj(rearrange(z, "b h t d -> b t (h d)")), None


def _fresh_compile_cache() -> None:
    """Forget earlier compiled graphs. Every shape and grad mode adds one to the cache of the same
    `forward`, and past torch.compile's recompile limit it would silently fall back to eager."""
    torch._dynamo.reset()


def fused_twin(hand: MultiHeadAttention) -> FusedAttention:
    """A FusedAttention holding a copy of `hand`'s weights (same dtype and device)."""
    n_heads, d_model = hand.n_heads, hand.out_proj.in_features
    fused = FusedAttention(d_model, n_heads, hand.dropout).to(hand.out_proj.weight)
    fused.load_state_dict(hand.state_dict(), strict=True)
    return fused.train(hand.training)


def tiled_twin(hand: MultiHeadAttention) -> MultiHeadAttention:
    """A MultiHeadAttention with the tiled core holding a copy of `hand`'s weights."""
    n_heads, d_model = hand.n_heads, hand.out_proj.in_features
    tiled = MultiHeadAttention(d_model, n_heads, hand.dropout, impl="tiled")
    tiled.to(hand.out_proj.weight).load_state_dict(hand.state_dict(), strict=True)
    return tiled.train(hand.training)


def attention_implementations(d_model: int, n_heads: int, *, device, dtype, compile_options: dict,
                              seed: int = 0) -> dict[str, Callable[[Tensor, Tensor], Tensor]]:
    """name -> `f(x (b t (h d)), causal_mask (i j)) -> out (b t (h d))`, all with the same weights.

    `mha` gets the boolean twin of the mask (True = blocked) so that, in inference mode, it can take
    its native fast path: a float mask would shut that path off. `tiled` gets its structural twin,
    `TileMask(causal=True)`. The others take the float mask.
    `compile_options` go to `torch.compile` (backend, dynamic).
    """
    _fresh_compile_cache()
    torch.manual_seed(seed)
    hand = MultiHeadAttention(d_model, n_heads).to(device=device, dtype=dtype)
    mha = nn.MultiheadAttention(d_model, n_heads, batch_first=True).to(device=device, dtype=dtype)
    copy_weights(hand, mha)
    fused = fused_twin(hand)
    compiled = torch.compile(hand, **compile_options)
    tiled = tiled_twin(hand)
    return {
        "hand": lambda x, mask: hand(x, attn_mask=mask)[0],
        "mha": lambda x, mask: mha(x, x, x, attn_mask=torch.isinf(mask), need_weights=False)[0],
        "sdpa": lambda x, mask: fused(x, attn_mask=mask)[0],
        "compiled": lambda x, mask: compiled(x, attn_mask=mask)[0],
        "tiled": lambda x, mask: tiled(x, attn_mask=TileMask(causal=True))[0],
    }


def model_implementations(config: ModelConfig, *, device, dtype, compile_options: dict,
                          seed: int = 0) -> dict[str, nn.Module]:
    """name -> a whole decoder `(b t) ids -> (b t v) logits` with that attention, same weights.

    `mha` is the oracle `reference.ReferenceDecoderModel`; `sdpa` and `compiled` are the TinyGPT
    model with every block's attention replaced (only the attention changes between them); `tiled`
    is the TinyGPT model built with `attention_impl="tiled"`.
    """
    _fresh_compile_cache()
    torch.manual_seed(seed)
    hand = TinyDecoderModel(config).to(device=device, dtype=dtype)
    reference = ReferenceDecoderModel(config).to(device=device, dtype=dtype)
    copy_weights(hand, reference)
    fused, compiled = copy.deepcopy(hand), copy.deepcopy(hand)
    for block in fused.blocks:
        block.attention = fused_twin(block.attention)
    for block in compiled.blocks:
        block.attention = torch.compile(block.attention, **compile_options)
    tiled = TinyDecoderModel(dataclasses.replace(config, attention_impl="tiled"))
    tiled.to(device=device, dtype=dtype).load_state_dict(hand.state_dict(), strict=True)
    return {"hand": hand, "mha": reference, "sdpa": fused, "compiled": compiled, "tiled": tiled}


def tolerances(dtype: torch.dtype) -> dict[str, float]:
    """assert_close tolerances: fp32 at torch's own default-init agreement (about 5e-7 between
    MHA's fast and slow paths, so 1e-5 leaves room); bf16 looser."""
    if dtype == torch.bfloat16:
        return {"rtol": 2e-2, "atol": 2e-2}
    return {"rtol": 1e-4, "atol": 1e-5}


def check_attention_agreement(implementations, x: Tensor, *, dtype, backward: bool = True
                              ) -> dict[str, float]:
    """Assert every implementation matches `mha` (output, and input gradient unless `backward`
    is False: the sweep's longest contexts, where one backward pass takes seconds); return the
    largest |diff| per implementation.

    Run before any timing: a fast implementation that computes something else is worth nothing.
    """
    mask = causal_mask(x.shape[1], device=x.device).to(x.dtype)
    grad_out = torch.randn_like(x)
    results = {}
    for name, run in implementations.items():
        x_leaf = x.detach().clone().requires_grad_(backward)
        with torch.inference_mode(not backward):
            out = run(x_leaf, mask)
        if backward:
            out.backward(grad_out)
        results[name] = {"output": out.detach(), "input gradient": x_leaf.grad}
    reference = results[REFERENCE]
    worst = {}
    for name, result in results.items():
        worst[name] = 0.0
        for what, got in result.items():
            if got is not None:
                difference = _difference(got, reference[what], dtype, name, f" ({what})")
                worst[name] = max(worst[name], difference)
    return worst


def _difference(got: Tensor, expected: Tensor, dtype, who: str, what: str = "") -> float:
    """max |got - expected|, after asserting they agree (a RuntimeError naming `who` if not)."""
    try:
        torch.testing.assert_close(got, expected, **tolerances(dtype))
    except AssertionError as error:
        raise RuntimeError(
            f"{who} disagrees with {REFERENCE}{what}: {str(error).splitlines()[0]}") from None
    return float((got - expected).abs().max())


def check_model_agreement(models: dict[str, nn.Module], idx: Tensor, *, dtype) -> dict[str, float]:
    """Assert every model's logits match the reference model's; return max |diff| per model."""
    with torch.no_grad():
        logits = {name: model(idx) for name, model in models.items()}
    return {name: _difference(got, logits[REFERENCE], dtype, f"model with {name}")
            for name, got in logits.items()}


# --- attention variants: the hand-written masks and biases against MHA and FlexAttention --------

VARIANTS = {
    "window": "sliding window of t/4 keys",
    "prefix": "prefix-LM, prefix t/2",
    "documents": "4 documents per row",
    "alibi": "causal + ALiBi",
    "grouped": "causal, h/2 key/value heads",
}
VARIANT_IMPLEMENTATIONS = {
    "hand": "hand-written (tinygpt.masks)",
    "mha": "nn.MultiheadAttention, same float mask",
    "flex": "FlexAttention, eager (no CPU backward)",
}


def _variant_spec(variant: str, batch: int, t: int):
    """(window, document_ids (b t), prefix_len (b), alibi) for a variant; None where unused."""
    window = max(1, t // 4) if variant == "window" else None
    documents = (torch.arange(t) * 4 // t).repeat(batch, 1) if variant == "documents" else None
    prefix = torch.full((batch,), t // 2) if variant == "prefix" else None
    return window, documents, prefix, variant == "alibi"


def _hand_variant_mask(variant, batch, t, n_heads, *, device, dtype) -> Tensor:
    """The additive mask `(i j)`, `(b i j)` or `(1 h i j)` from `tinygpt.masks`."""
    from tinygpt import masks

    window, documents, prefix, alibi = _variant_spec(variant, batch, t)
    pos = masks.positions(t)
    if prefix is not None:
        blocked = masks.prefix_lm(pos, pos, prefix)
    elif documents is not None:
        blocked = masks.document(pos, pos, documents)
    elif window is not None:
        blocked = masks.sliding_window(pos, pos, window)
    else:
        blocked = masks.causal(pos, pos)
    mask = masks.additive_mask(blocked, dtype)
    if alibi:
        bias = masks.alibi_bias(masks.alibi_slopes(n_heads), pos, pos).to(dtype)
        mask = masks.with_head_bias(mask, bias)
    return mask.to(device)


def _flex_variant(variant, batch, t, n_heads, *, device, dtype):
    """(block_mask, score_mod) for FlexAttention, written as predicates over indices."""
    from torch.nn.attention.flex_attention import create_block_mask

    from reference.masks import paper_slopes

    window, documents, prefix, alibi = _variant_spec(variant, batch, t)
    documents = None if documents is None else documents.to(device)
    prefix = None if prefix is None else prefix.to(device)
    slopes = torch.tensor(paper_slopes(n_heads), device=device, dtype=dtype)

    def mask_mod(b, h, q_idx, kv_idx):
        allowed = kv_idx <= q_idx
        if prefix is not None:
            allowed = allowed | (kv_idx < prefix[b])
        if window is not None:
            allowed = allowed & (q_idx - kv_idx < window)
        if documents is not None:
            allowed = allowed & (documents[b, q_idx] == documents[b, kv_idx])
        return allowed

    def score_mod(score, b, h, q_idx, kv_idx):
        return score - slopes[h] * (q_idx - kv_idx).abs()

    block_mask = create_block_mask(mask_mod, B=batch, H=None, Q_LEN=t, KV_LEN=t,
                                   device=device.type)
    return block_mask, (score_mod if alibi else None)


def variant_implementations(variant: str, batch: int, t: int, d_model: int, n_heads: int, *,
                            device, dtype, seed: int = 0) -> dict[str, Callable[[Tensor], Tensor]]:
    """name -> `f(x (b t (h d))) -> out (b t (h d))`, the same weights and the same mask in each.

    `mha` gets the mask as MHA's float `((b h) i j)` from `reference.masks` (grouped heads: each
    key/value head's rows repeated for its query heads); `flex` projects with the same weights
    and calls FlexAttention eagerly, which on CPU has no backward pass.
    """
    from torch.nn.attention.flex_attention import flex_attention

    from reference import masks as reference_masks

    # Eager on purpose (the table labels it so): torch's advice to compile it is noise here.
    warnings.filterwarnings("ignore", message="flex_attention called without torch.compile",
                            category=UserWarning)
    n_kv_heads = max(1, n_heads // 2) if variant == "grouped" else n_heads
    torch.manual_seed(seed)
    hand = MultiHeadAttention(d_model, n_heads, n_kv_heads=n_kv_heads).to(device=device,
                                                                           dtype=dtype)
    mha = _expanded_mha(hand, n_kv_heads).to(device=device, dtype=dtype)
    mask = _hand_variant_mask(variant, batch, t, n_heads, device=device, dtype=dtype)
    window, documents, prefix, alibi = _variant_spec(variant, batch, t)
    may_attend = reference_masks.allowed(batch, t, window=window, document_ids=documents,
                                         prefix_len=prefix)
    mha_mask = reference_masks.float_mask(may_attend, n_heads, dtype, alibi=alibi).to(device)
    block_mask, score_mod = _flex_variant(variant, batch, t, n_heads, device=device, dtype=dtype)
    d = d_model // n_heads

    def flex(x):
        q, k, v = hand.in_proj(x).split([d_model, n_kv_heads * d, n_kv_heads * d], dim=-1)
        q = rearrange(q, "b t (h d) -> b h t d", h=n_heads)
        k, v = (rearrange(z, "b t (g d) -> b g t d", g=n_kv_heads) for z in (k, v))
        z = flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask,
                           enable_gqa=n_kv_heads != n_heads)
        return hand.out_proj(rearrange(z, "b h t d -> b t (h d)"))

    return {
        "hand": lambda x: hand(x, attn_mask=mask)[0],
        "mha": lambda x: mha(x, x, x, attn_mask=mha_mask, need_weights=False)[0],
        "flex": flex,
    }


def _expanded_mha(hand: MultiHeadAttention, n_kv_heads: int) -> nn.MultiheadAttention:
    """nn.MultiheadAttention computing `hand`'s function: grouped key/value rows repeated."""
    d_model, n_heads = hand.out_proj.in_features, hand.n_heads
    r = n_heads // n_kv_heads
    mha = nn.MultiheadAttention(d_model, n_heads, batch_first=True).to(hand.out_proj.weight)
    weight, bias = hand.in_proj.weight.detach(), hand.in_proj.bias.detach()
    rows = [weight[:d_model]], [bias[:d_model]]
    for w, b in zip(weight[d_model:].chunk(2), bias[d_model:].chunk(2)):
        rows[0].append(rearrange(w, "(g d) e -> g 1 d e", g=n_kv_heads)
                       .expand(-1, r, -1, -1).reshape(d_model, d_model))
        rows[1].append(rearrange(b, "(g d) -> g 1 d", g=n_kv_heads).expand(-1, r, -1).reshape(-1))
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat(rows[0]))
        mha.in_proj_bias.copy_(torch.cat(rows[1]))
        mha.out_proj.load_state_dict(hand.out_proj.state_dict())
    return mha
