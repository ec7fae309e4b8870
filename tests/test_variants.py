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
from hypothesis import strategies as st
from strategies import (
    FORWARD_TOL,
    GRAD_TOL,
    VARIANT_EXAMPLES,
    seeds,
    variant_cases,
    with_examples,
)
from torch import nn
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from reference.positions import rope_complex, rope_interleaved
from tinygpt import masks
from tinygpt.attention import MultiHeadAttention
from tinygpt.positions import apply_rope

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


# ------------------------------------------------------------------------------------- RoPE

positions_of = st.one_of(
    st.integers(0, 4096).map(lambda start: ("range", start)),
    st.just(("rows", 0)),
)


def rope_positions(kind, start: int, batch: int, t: int, generator) -> torch.Tensor:
    """`(t)` positions start.., or `(b t)` positions drawn per row (repeats and gaps allowed)."""
    if kind == "range":
        return torch.arange(start, start + t)
    return torch.randint(0, 4096, (batch, t), generator=generator)


@settings(max_examples=100)
@given(batch=st.integers(1, 3), heads=st.integers(1, 4), half=st.integers(1, 16),
       t=st.integers(1, 24), where=positions_of, dtype=st.sampled_from((torch.float64,
                                                                        torch.float32)),
       seed=seeds)
def test_rope_equals_the_complex_multiplication_formulation(batch, heads, half, t, where, dtype,
                                                            seed):
    """tinygpt's rotate-half RoPE equals reference.positions' complex multiplication, for ranges
    of positions up to 4,096 and per-row positions."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, heads, t, 2 * half, generator=generator, dtype=torch.float64).to(dtype)
    pos = rope_positions(*where, batch, t, generator)
    tolerance = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5,
                                                                                 atol=1e-5)
    torch.testing.assert_close(apply_rope(x, pos), rope_complex(x, pos), **tolerance)


@given(half=st.integers(1, 16), t=st.integers(1, 16), start=st.integers(0, 4096), seed=seeds)
def test_rotate_half_is_the_interleaved_rotation_of_permuted_features(half, t, start, seed):
    """The two pairing conventions differ only by where each pair's features sit."""
    x = torch.randn(2, 3, t, 2 * half, generator=torch.Generator().manual_seed(seed),
                    dtype=torch.float64)
    pos = torch.arange(start, start + t)
    interleave = torch.stack([torch.arange(half), torch.arange(half) + half], dim=-1).flatten()
    torch.testing.assert_close(rope_interleaved(x[..., interleave], pos),
                               apply_rope(x, pos)[..., interleave], rtol=1e-12, atol=1e-12)


def rope_scores(module, x, pos):
    """The scores `(b h i j)` of a RoPE attention module at token positions `pos`."""
    seen = {}
    handle = module.hook_scores.register_forward_hook(lambda m, a, out: seen.setdefault("s", out))
    try:
        module(x, positions=pos)
    finally:
        handle.remove()
    return seen["s"]


@settings(max_examples=60)
@given(heads=st.sampled_from((1, 2, 4)), half=st.integers(1, 8), t=st.integers(1, 16),
       start=st.integers(0, 2048), shift=st.integers(0, 2048), seed=seeds)
def test_rope_scores_depend_only_on_the_relative_offset(heads, half, t, start, shift, seed):
    """Shifting every position by the same amount leaves the scores q kᵀ / √d equal (fp64, 1e-10):
    what RoPE is for. Learned absolute positions have no such property."""
    torch.manual_seed(seed)
    module = MultiHeadAttention(heads * 2 * half, heads, rope=True).double()
    x = torch.randn(2, t, heads * 2 * half, dtype=torch.float64)
    pos = torch.arange(start, start + t)
    torch.testing.assert_close(rope_scores(module, x, pos), rope_scores(module, x, pos + shift),
                               rtol=1e-10, atol=1e-10)


def test_rope_scores_do_change_with_the_offset_between_tokens():
    """The property above is not vacuous: moving one key relative to the queries changes them."""
    torch.manual_seed(0)
    module = MultiHeadAttention(16, 2, rope=True).double()
    x = torch.randn(1, 6, 16, dtype=torch.float64)
    pos = torch.arange(6)
    moved = pos.clone()
    moved[2] = 9
    assert not torch.allclose(rope_scores(module, x, pos), rope_scores(module, x, moved))


@settings(max_examples=60)
@given(case=variant_cases(even_width=True))
@with_examples([c for c in VARIANT_EXAMPLES if c.d_head % 2 == 0])
def test_rope_attention_matches_complex_rope_around_sdpa(case):
    """A RoPE module (with every mask, ALiBi and grouping drawn) equals the plain projections,
    reference RoPE by complex multiplication and SDPA: output, input and parameter gradients."""
    torch.manual_seed(case.seed)
    hand = MultiHeadAttention(case.d_model, case.n_heads, n_kv_heads=case.n_kv_heads,
                              rope=True).to(case.dtype)
    params = detached_params(hand, grad=True)
    x, out_cot, _ = inputs(case)
    x_hand, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    kpm = case.is_pad() if case.padding else None
    out, _ = hand(x_hand, attn_mask=hand_mask(case), key_padding_mask=kpm)
    sdpa, pos = sdpa_kernel(case), torch.arange(case.t)
    expected = manual_attention(
        params, x_ref, case, lambda q, k, v: sdpa(rope_complex(q, pos), rope_complex(k, pos), v))
    (out * out_cot).sum().backward()
    (expected * out_cot).sum().backward()
    torch.testing.assert_close(out, expected, **FORWARD_TOL[case.dtype])
    torch.testing.assert_close(x_hand.grad, x_ref.grad, **GRAD_TOL[case.dtype])
    assert_grads({n: p.grad for n, p in hand.named_parameters()},
                 {n: p.grad for n, p in params.items()}, case.dtype)


def test_rope_hook_points_sit_between_v_and_the_scores_and_fire_in_that_order():
    torch.manual_seed(0)
    module = MultiHeadAttention(12, 3, n_kv_heads=1, rope=True)
    names = [n for n, m in module.named_modules() if n.startswith("hook_")]
    assert names == ["hook_q", "hook_k", "hook_v", "hook_rot_q", "hook_rot_k", "hook_scores",
                     "hook_masked_scores", "hook_pattern", "hook_z"]
    fired, shapes = [], {}

    def record(name):
        def hook(module, args, out):
            fired.append(name)
            shapes[name] = tuple(out.shape)
        return hook

    handles = [getattr(module, n).register_forward_hook(record(n)) for n in names]
    module(torch.randn(2, 5, 12))
    for handle in handles:
        handle.remove()
    assert fired == names
    assert shapes["hook_rot_q"] == (2, 3, 5, 4) and shapes["hook_rot_k"] == (2, 1, 5, 4)
    assert "hook_rot_q" not in dict(MultiHeadAttention(12, 3).named_modules())


def test_rope_with_a_cache_equals_the_full_pass():
    """Decoding one token at a time (keys rotated before they are cached, positions following the
    cache) gives the full pass's outputs."""
    from tinygpt.attention import KVCache

    torch.manual_seed(0)
    module = MultiHeadAttention(16, 4, n_kv_heads=2, rope=True).double()
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    full, _ = module(x, attn_mask=masks.additive_mask(masks.causal(*[masks.positions(7)] * 2),
                                                      torch.float64))
    cache = KVCache()
    steps = [module(x[:, p:p + 1], cache=cache)[0] for p in range(7)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-10, atol=1e-10)
