"""The attention variants (sliding window, prefix-LM, documents, ALiBi, grouped key/value heads,
RoPE) are the functions independent implementations compute.

Oracles, none sharing code with `tinygpt`:
- `nn.MultiheadAttention` given the equivalent float `attn_mask`, 3-D `((b h) i j)`, built here
  from torch's own constructions (tril, triu, block_diag); ALiBi is additive, so MHA checks it too.
  Grouped key/value heads become MHA with each key/value head's rows repeated for its query heads.
- FlexAttention with a `mask_mod` and a `score_mod` written here as index predicates. On CPU it
  runs eagerly and has no backward pass ("FlexAttention does not support backward on CPU"), so it
  checks the forward pass only, in float64 at the usual 1e-10.
- `F.scaled_dot_product_attention(..., enable_gqa=True)` for grouped heads, forward and gradients.
Tolerances are the suite's (`strategies`): fp64 forward 1e-10, gradients rtol 1e-8 / atol 1e-9;
fp32 forward 1e-5, gradients rtol 1e-4 / atol 1e-5.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from strategies import FORWARD_TOL, GRAD_TOL, VARIANT_EXAMPLES, variant_cases, with_examples
from torch import nn
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from tinygpt import masks
from tinygpt.attention import MultiHeadAttention

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


# -------------------------------------------------------------------- the masks, three ways


def hand_mask(case, *, alibi_sign: float = 1.0) -> torch.Tensor:
    """tinygpt's additive mask for the case, from `tinygpt.masks` (`alibi_sign` = -1 plants a
    bias of the wrong sign)."""
    q_pos = k_pos = masks.positions(case.t)
    window = None if case.window is None else masks.sliding_window(q_pos, k_pos, case.window)
    if case.family == "prefix":
        blocked = masks.prefix_lm(q_pos, k_pos, torch.tensor(case.prefix_len))
    elif "document" in case.family:
        blocked = masks.document(q_pos, k_pos, case.document_ids())
    else:
        blocked = masks.causal(q_pos, k_pos)
    if window is not None:
        blocked = masks.blocked_by_any(blocked, window)
    mask = masks.additive_mask(blocked, case.dtype)
    if case.alibi:
        bias = masks.alibi_bias(masks.alibi_slopes(case.n_heads), q_pos, k_pos)
        mask = masks.with_head_bias(mask, alibi_sign * bias.to(case.dtype))
    return mask


def paper_slopes(n: int) -> list[float]:
    """ALiBi's slopes in the closed form of the paper's code: a power of two n starts at
    2^(-2^-(log2 n - 3)) and multiplies by that start; other n interleave from 2n."""
    if math.log2(n).is_integer():
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**k for k in range(n)]
    closest = 2 ** math.floor(math.log2(n))
    return paper_slopes(closest) + paper_slopes(2 * closest)[0::2][: n - closest]


def torch_allowed(case) -> torch.Tensor:
    """`(b i j)` bool, True = may attend, from torch's tril / triu / block_diag."""
    t, ones = case.t, torch.ones(case.t, case.t, dtype=torch.bool)
    allowed = ones.tril().repeat(case.batch, 1, 1)
    if case.family == "prefix":
        for row, p in enumerate(case.prefix_len):
            allowed[row, :p, :p] = True
    if "document" in case.family:
        for row, ids in enumerate(case.document_ids()):
            lengths = torch.unique_consecutive(ids, return_counts=True)[1].tolist()
            blocks = [torch.ones(n, n).tril() for n in lengths]
            allowed[row] &= torch.block_diag(*blocks).bool()
    if case.window is not None:
        allowed &= ones.triu(-(case.window - 1))
    assert allowed.shape == (case.batch, t, t)
    return allowed


def torch_float_mask(case) -> torch.Tensor:
    """`(b h i j)`: 0 / -inf from `torch_allowed`, plus -m_h |i - j| with the paper's slopes."""
    mask = torch.zeros(case.batch, case.t, case.t, dtype=case.dtype)
    mask = mask.masked_fill(~torch_allowed(case), float("-inf"))[:, None]
    if case.alibi:
        distance = (torch.arange(case.t)[:, None] - torch.arange(case.t)[None, :]).abs()
        slopes = torch.tensor(paper_slopes(case.n_heads), dtype=case.dtype)
        mask = mask - slopes[None, :, None, None] * distance.to(case.dtype)
    return mask.expand(case.batch, case.n_heads, case.t, case.t)


def flex_mods(case, *, window_slack: int = 0):
    """(mask_mod, score_mod) as FlexAttention predicates over (b, h, q_idx, kv_idx)."""
    ids = case.document_ids() if case.document_starts is not None else None
    prefix = None if case.prefix_len is None else torch.tensor(case.prefix_len)
    is_pad = case.is_pad() if case.padding else None
    slopes = torch.tensor(paper_slopes(case.n_heads), dtype=case.dtype)

    def mask_mod(b, h, q_idx, kv_idx):
        allowed = kv_idx <= q_idx
        if prefix is not None:
            allowed = allowed | (kv_idx < prefix[b])
        if case.window is not None:
            allowed = allowed & (q_idx - kv_idx < case.window + window_slack)
        if ids is not None:
            allowed = allowed & (ids[b, q_idx] == ids[b, kv_idx])
        if is_pad is not None:
            allowed = allowed & ~is_pad[b, kv_idx]
        return allowed

    def score_mod(score, b, h, q_idx, kv_idx):
        return score - slopes[h] * (q_idx - kv_idx).abs()

    return mask_mod, (score_mod if case.alibi else None)


# ------------------------------------------------------------------------- the modules and runs


def hand_module(case) -> MultiHeadAttention:
    torch.manual_seed(case.seed)
    return MultiHeadAttention(case.d_model, case.n_heads, n_kv_heads=case.n_kv_heads).to(case.dtype)


def mha_twin(hand: MultiHeadAttention, case) -> nn.MultiheadAttention:
    """MHA computing the same function: each key/value head's rows repeated for its query heads."""
    mha = nn.MultiheadAttention(case.d_model, case.n_heads, batch_first=True, dtype=case.dtype)
    r = case.n_heads // case.n_kv_heads
    weight, bias = hand.in_proj.weight.detach(), hand.in_proj.bias.detach()
    q_rows = case.d_model
    parts_w, parts_b = [weight[:q_rows]], [bias[:q_rows]]
    for w, b in zip(weight[q_rows:].chunk(2), bias[q_rows:].chunk(2)):
        w = w.reshape(case.n_kv_heads, 1, case.d_head, case.d_model).expand(-1, r, -1, -1)
        parts_w.append(w.reshape(case.d_model, case.d_model))
        parts_b.append(b.reshape(case.n_kv_heads, 1, case.d_head).expand(-1, r, -1).reshape(-1))
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat(parts_w))
        mha.in_proj_bias.copy_(torch.cat(parts_b))
        mha.out_proj.weight.copy_(hand.out_proj.weight)
        mha.out_proj.bias.copy_(hand.out_proj.bias)
    return mha


def fold_mha_grads(mha: nn.MultiheadAttention, case) -> dict[str, torch.Tensor]:
    """MHA's gradients in the hand-written module's shapes: a repeated key/value row's gradient
    is the sum over the query heads that share it."""
    r = case.n_heads // case.n_kv_heads
    q_rows = case.d_model
    weight, bias = mha.in_proj_weight.grad, mha.in_proj_bias.grad
    folded_w, folded_b = [weight[:q_rows]], [bias[:q_rows]]
    for w, b in zip(weight[q_rows:].chunk(2), bias[q_rows:].chunk(2)):
        folded_w.append(w.reshape(case.n_kv_heads, r, case.d_head, -1).sum(1).reshape(-1, q_rows))
        folded_b.append(b.reshape(case.n_kv_heads, r, case.d_head).sum(1).reshape(-1))
    return {"in_proj.weight": torch.cat(folded_w), "in_proj.bias": torch.cat(folded_b),
            "out_proj.weight": mha.out_proj.weight.grad, "out_proj.bias": mha.out_proj.bias.grad}


def inputs(case):
    """x `(b t (h d))` and the cotangents of the output and of the per-head weights."""
    generator = case.generator()
    shape = (case.batch, case.t, case.d_model)
    x = torch.randn(shape, generator=generator, dtype=torch.float64).to(case.dtype)
    out_cot = torch.randn(shape, generator=generator, dtype=torch.float64).to(case.dtype)
    weights_shape = (case.batch, case.n_heads, case.t, case.t)
    weights_cot = torch.randn(weights_shape, generator=generator, dtype=torch.float64)
    return x, out_cot, weights_cot.to(case.dtype)


def run_hand(hand, case, mask):
    x, out_cot, weights_cot = inputs(case)
    x.requires_grad_()
    kpm = case.is_pad() if case.padding else None
    out, weights = hand(x, attn_mask=mask, key_padding_mask=kpm, need_weights=True,
                        average_attn_weights=False)
    ((out * out_cot).sum() + (weights * weights_cot).sum()).backward()
    grads = {name: p.grad for name, p in hand.named_parameters()}
    return out.detach(), weights.detach(), x.grad, grads


def run_mha(mha, case):
    x, out_cot, weights_cot = inputs(case)
    x.requires_grad_()
    b, h = case.batch, case.n_heads
    mask = torch_float_mask(case).reshape(b * h, case.t, case.t)  # MHA's ((b h) i j)
    kpm = None
    if case.padding:
        kpm = torch.zeros(b, case.t, dtype=case.dtype).masked_fill(case.is_pad(), float("-inf"))
    out, weights = mha(x, x, x, attn_mask=mask, key_padding_mask=kpm, need_weights=True,
                       average_attn_weights=False)
    ((out * out_cot).sum() + (weights * weights_cot).sum()).backward()
    return out.detach(), weights.detach(), x.grad, fold_mha_grads(mha, case)


def manual_attention(params, x, case, kernel):
    """The module's maths written plainly around an attention `kernel(q, k, v)`: q `(b h t d)`,
    k and v `(b g t d)`."""
    b, t, h, g, d = case.batch, case.t, case.n_heads, case.n_kv_heads, case.d_head
    qkv = F.linear(x, params["in_proj.weight"], params["in_proj.bias"])
    q, k, v = qkv.split([h * d, g * d, g * d], dim=-1)
    q = q.view(b, t, h, d).transpose(1, 2)
    k, v = (z.view(b, t, g, d).transpose(1, 2) for z in (k, v))
    z = kernel(q, k, v)
    return F.linear(z.transpose(1, 2).reshape(b, t, h * d), params["out_proj.weight"],
                    params["out_proj.bias"])


def flex_kernel(case, **mod_options):
    mask_mod, score_mod = flex_mods(case, **mod_options)
    block_mask = create_block_mask(mask_mod, B=case.batch, H=None, Q_LEN=case.t, KV_LEN=case.t,
                                   device="cpu")
    grouped = case.n_kv_heads != case.n_heads
    return lambda q, k, v: flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask,
                                          enable_gqa=grouped)


def sdpa_kernel(case):
    mask = torch_float_mask(case)
    if case.padding:
        mask = mask.masked_fill(case.is_pad()[:, None, None, :], float("-inf"))
    return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def detached_params(hand, *, grad: bool = False):
    return {n: p.detach().clone().requires_grad_(grad) for n, p in hand.named_parameters()}


def assert_grads(grads, expected, dtype):
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[name], **GRAD_TOL[dtype],
                                   msg=lambda m, name=name: f"{name}: {m}")


# ------------------------------------------------------------------------------- the oracles


@settings(max_examples=120)
@given(case=variant_cases())
@with_examples(VARIANT_EXAMPLES)
def test_every_mask_and_bias_matches_mha_with_the_equivalent_float_mask(case):
    """Output, per-head weights and the gradients of the input and every parameter equal those of
    nn.MultiheadAttention given the same mask as a float `((b h) i j)` built by torch."""
    hand = hand_module(case)
    ours = run_hand(hand, case, hand_mask(case))
    theirs = run_mha(mha_twin(hand, case), case)
    for name, mine, expected in zip(("out", "weights"), ours, theirs):
        assert torch.isfinite(mine).all(), name
        torch.testing.assert_close(mine, expected, **FORWARD_TOL[case.dtype])
    torch.testing.assert_close(ours[2], theirs[2], **GRAD_TOL[case.dtype])
    assert_grads(ours[3], theirs[3], case.dtype)


@settings(max_examples=40)  # eager FlexAttention costs about 0.5 s for each new shape
@given(case=variant_cases())
@with_examples(VARIANT_EXAMPLES)
def test_every_mask_and_bias_matches_flex_attention(case):
    """The forward pass equals FlexAttention's with an independently written mask_mod and
    score_mod (eager, CPU: forward only), grouped heads through its own enable_gqa."""
    hand = hand_module(case)
    out, *_ = run_hand(hand, case, hand_mask(case))
    x, _, _ = inputs(case)
    with torch.no_grad():
        expected = manual_attention(detached_params(hand), x, case, flex_kernel(case))
    torch.testing.assert_close(out, expected, **FORWARD_TOL[case.dtype])


@settings(max_examples=80)
@given(case=variant_cases(heads=(2, 3, 4, 8)))
@with_examples(VARIANT_EXAMPLES)
def test_grouped_heads_match_sdpa_enable_gqa(case):
    """Grouped key/value heads (and every mask with them): output and every gradient equal
    F.scaled_dot_product_attention(..., enable_gqa=True) around the same projections."""
    hand = hand_module(case)
    params = detached_params(hand, grad=True)
    x, out_cot, _ = inputs(case)
    x_hand, x_sdpa = x.clone().requires_grad_(), x.clone().requires_grad_()
    kpm = case.is_pad() if case.padding else None
    out, _ = hand(x_hand, attn_mask=hand_mask(case), key_padding_mask=kpm)
    expected = manual_attention(params, x_sdpa, case, sdpa_kernel(case))
    (out * out_cot).sum().backward()
    (expected * out_cot).sum().backward()
    torch.testing.assert_close(out, expected, **FORWARD_TOL[case.dtype])
    torch.testing.assert_close(x_hand.grad, x_sdpa.grad, **GRAD_TOL[case.dtype])
    assert_grads({n: p.grad for n, p in hand.named_parameters()},
                 {n: p.grad for n, p in params.items()}, case.dtype)
