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
                average_attn_weights=True, cache: KVCache | None = None):
        """x `(b t (h d))`, attn_mask `(i j)` additive float -> out `(b t (h d))`, None."""
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
    """assert_close tolerances: fp32 as TRAPS.md measured for default-init weights; bf16 looser."""
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
            if got is None:
                continue
            try:
                torch.testing.assert_close(got, reference[what], **tolerances(dtype))
            except AssertionError as error:
                raise RuntimeError(
                    f"{name} disagrees with {REFERENCE} ({what}): {str(error).splitlines()[0]}"
                ) from None
            worst[name] = max(worst[name], float((got - reference[what]).abs().max()))
    return worst


def check_model_agreement(models: dict[str, nn.Module], idx: Tensor, *, dtype) -> dict[str, float]:
    """Assert every model's logits match the reference model's; return max |diff| per model."""
    with torch.no_grad():
        logits = {name: model(idx) for name, model in models.items()}
    worst = {}
    for name, got in logits.items():
        try:
            torch.testing.assert_close(got, logits[REFERENCE], **tolerances(dtype))
        except AssertionError as error:
            raise RuntimeError(
                f"model with {name} disagrees with {REFERENCE}: {str(error).splitlines()[0]}"
            ) from None
        worst[name] = float((got - logits[REFERENCE]).abs().max())
    return worst
