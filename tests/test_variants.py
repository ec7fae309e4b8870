"""The attention variants (sliding window, prefix-LM, documents, ALiBi, grouped key/value heads,
RoPE) are the functions independent implementations compute.

Oracles, none sharing code with `tinygpt`:
- `nn.MultiheadAttention` given the equivalent float `attn_mask`, 3-D `((b h) i j)`, built by
  `reference.masks` from torch's own constructions (tril, triu, block_diag) and the ALiBi paper's
  closed-form slopes; ALiBi is additive, so MHA checks it too.
  Grouped key/value heads become MHA with each key/value head's rows repeated for its query heads.
- FlexAttention with a `mask_mod` and a `score_mod` written here as index predicates. On CPU it
  runs eagerly and has no backward pass ("FlexAttention does not support backward on CPU"), so it
  checks the forward pass only, in float64 at the usual 1e-10.
- `F.scaled_dot_product_attention(..., enable_gqa=True)` for grouped heads, forward and gradients.
Tolerances are the suite's (`strategies`): fp64 forward 1e-10, gradients rtol 1e-8 / atol 1e-9;
fp32 forward 1e-5, gradients rtol 1e-4 / atol 1e-5.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import (
    FORWARD_TOL,
    GRAD_TOL,
    VARIANT_EXAMPLES,
    VARIANT_MODEL_EXAMPLES,
    seeds,
    variant_cases,
    variant_model_cases,
    with_examples,
)
from torch import nn
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from reference import masks as reference_masks
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


def torch_float_mask(case) -> torch.Tensor:
    """`(b h i j)` from `reference.masks`: torch's constructions, the paper's slopes."""
    prefix = None if case.prefix_len is None else torch.tensor(case.prefix_len)
    ids = case.document_ids() if case.document_starts is not None else None
    may_attend = reference_masks.allowed(case.batch, case.t, window=case.window,
                                         document_ids=ids, prefix_len=prefix)
    mask = reference_masks.float_mask(may_attend, case.n_heads, case.dtype, alibi=case.alibi)
    return mask.reshape(case.batch, case.n_heads, case.t, case.t)


def flex_mods(case, *, window_slack: int = 0):
    """(mask_mod, score_mod) as FlexAttention predicates over (b, h, q_idx, kv_idx)."""
    ids = case.document_ids() if case.document_starts is not None else None
    prefix = None if case.prefix_len is None else torch.tensor(case.prefix_len)
    is_pad = case.is_pad() if case.padding else None
    slopes = torch.tensor(reference_masks.paper_slopes(case.n_heads), dtype=case.dtype)

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


@settings(max_examples=15)  # eager FlexAttention costs about 1 s for each new shape
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


# ------------------------------------------------------------------------------ model level


def variant_pair(case):
    """(tinygpt model, reference model on nn.MultiheadAttention) with equal weights."""
    from reference import ReferenceDecoderModel, copy_weights
    from tinygpt import TinyDecoderModel

    torch.manual_seed(case.seed)
    hand = TinyDecoderModel(case.config).to(case.dtype)
    reference = ReferenceDecoderModel(case.config).to(case.dtype)
    copy_weights(hand, reference)
    return hand, reference


@settings(max_examples=80)
@given(case=variant_model_cases(positions=("learned", "alibi", "none"), grouped=False))
@with_examples([c for c in VARIANT_MODEL_EXAMPLES if c.config.position != "rope"
                and c.config.n_kv_heads is None])
def test_variant_models_match_the_mha_reference(case):
    """Whole models with windows, documents (learned positions restarting in each), prefixes,
    ALiBi or no positions: logits and the loss gradient of every parameter equal the reference
    model's, whose MHA gets the float `((b h) i j)` mask of `reference.masks`."""
    from reference import reference_key
    from tinygpt import next_token_loss

    hand, reference = variant_pair(case)
    idx, kwargs = case.tokens(), case.forward_kwargs()
    targets = torch.roll(idx, -1, dims=1)
    logits, ref_logits = hand(idx, **kwargs), reference(idx, **kwargs)
    next_token_loss(logits, targets).backward()
    next_token_loss(ref_logits, targets).backward()
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits, ref_logits, **FORWARD_TOL[case.dtype])
    reference_params = dict(reference.named_parameters())
    for name, param in hand.named_parameters():
        torch.testing.assert_close(param.grad, reference_params[reference_key(name)].grad,
                                   **GRAD_TOL[case.dtype], msg=lambda m, name=name: f"{name}: {m}")


def test_reference_refuses_what_mha_cannot_express():
    from reference import ReferenceDecoderModel
    from tinygpt import ModelConfig

    for config in (ModelConfig(position="rope"), ModelConfig(n_kv_heads=2)):
        with pytest.raises(ValueError, match="no RoPE and no grouped"):
            ReferenceDecoderModel(config)


def alibi_profile_error(sign: float) -> float:
    """Largest |masked score - (-m_h (i - j))| over visible keys, in a one-layer ALiBi model with
    q and k projected to zero (every score 0), so `hook_masked_scores` holds the bias alone;
    `sign` -1 plants a bias of the wrong sign. Blocked keys must read -inf."""
    from tinygpt import ModelConfig, TinyDecoderModel
    from tinygpt.inspection import run_with_cache

    config = ModelConfig(vocab_size=11, d_model=18, n_heads=6, n_layers=1, d_ff=8, max_seq=9,
                         position="alibi")
    torch.manual_seed(0)
    model = TinyDecoderModel(config).double()
    model.alibi_slopes.mul_(sign)
    with torch.no_grad():
        model.blocks[0].attention.in_proj.weight[: 2 * config.d_model] = 0.0
    idx = torch.randint(config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    _, cache = run_with_cache(model, idx, ["blocks.0.attention.hook_masked_scores"])
    masked = cache["blocks.0.attention.hook_masked_scores"]  # b h i j
    i, j = torch.arange(9)[:, None], torch.arange(9)[None, :]
    assert torch.isneginf(masked[..., j > i]).all()
    slopes = torch.tensor(reference_masks.paper_slopes(6), dtype=torch.float64)
    expected = -slopes[:, None, None] * (i - j)
    return (masked - expected)[..., j <= i].abs().max().item()


def test_alibi_shows_in_the_masked_scores_as_minus_slope_times_distance():
    """`hook_masked_scores` shows ALiBi's bias: -m_h (i - j) with the paper's slopes for every
    visible key. The same check reports a planted bias of the wrong sign."""
    assert alibi_profile_error(1.0) < 1e-12
    assert alibi_profile_error(-1.0) > 1e-3


def attention_parameters(d_model: int, n_heads: int, n_kv_heads: int) -> int:
    """in_proj: (h + 2 g) d rows of d_model weights and a bias each; out_proj: (h d)² + (h d)."""
    d = d_model // n_heads
    rows = (n_heads + 2 * n_kv_heads) * d
    return rows * d_model + rows + d_model * d_model + d_model


@given(heads=st.sampled_from((1, 2, 3, 4, 6, 8)), d_head=st.integers(1, 12), data=st.data())
def test_grouped_attention_parameter_count_follows_the_formula(heads, d_head, data):
    from tinygpt import ModelConfig, TinyDecoderModel, parameter_table

    n_kv_heads = data.draw(st.sampled_from([g for g in range(1, heads + 1) if heads % g == 0]))
    module = MultiHeadAttention(heads * d_head, heads, n_kv_heads=n_kv_heads)
    expected = attention_parameters(heads * d_head, heads, n_kv_heads)
    assert sum(p.numel() for p in module.parameters()) == expected
    config = ModelConfig(d_model=heads * d_head, n_heads=heads, n_kv_heads=n_kv_heads)
    rows = dict(parameter_table(TinyDecoderModel(config)))
    assert rows["blocks.0.attention"] == rows["blocks.1.attention"] == expected


def test_all_key_value_heads_is_todays_layout_and_the_seed_count():
    """n_kv_heads == n_heads keeps MHA's packed (3 (h d), (h d)) in_proj and the seed's 20,712;
    multi-query shrinks each attention by 2 (h - 1) d (d_model + 1)."""
    from tinygpt import ModelConfig, TinyDecoderModel, parameter_table

    seed = ModelConfig.preset("seed")
    for config in (seed, ModelConfig.preset("seed", n_kv_heads=4)):
        model = TinyDecoderModel(config)
        assert model.blocks[0].attention.in_proj.weight.shape == (96, 32)
        assert sum(p.numel() for p in model.parameters()) == 20_712
        assert dict(parameter_table(model))["blocks.0.attention"] == 4224
    multi_query = TinyDecoderModel(ModelConfig.preset("seed", n_kv_heads=1))
    assert sum(p.numel() for p in multi_query.parameters()) == 20_712 - 2 * (2 * 3 * 8 * 33)


def test_relative_positions_drop_the_position_table():
    from tinygpt import ModelConfig, TinyDecoderModel, parameter_table

    for position in ("alibi", "rope", "none"):
        model = TinyDecoderModel(ModelConfig.preset("seed", position=position))
        assert model.positional is None and "positional" not in dict(parameter_table(model))
        assert sum(p.numel() for p in model.parameters()) == 20_712 - 32 * 32


VARIANT_CONFIG_ERRORS = [
    ({"window": 0}, "window must be a positive integer, got 0."),
    ({"window": 2.5}, "window must be a positive integer, got 2.5."),
    ({"n_kv_heads": 3}, "n_heads (4) must be divisible by n_kv_heads (3)."),
    ({"n_kv_heads": 0}, "n_kv_heads must be a positive integer, got 0."),
    ({"position": "rope", "d_model": 12}, "rope positions need an even d_head, got 3."),
    ({"position": "absolute"},
     "position must be one of learned, alibi, rope, none, got 'absolute'."),
]


@pytest.mark.parametrize("fields, message", VARIANT_CONFIG_ERRORS,
                         ids=[str(f) for f, _ in VARIANT_CONFIG_ERRORS])
def test_variant_config_errors_are_one_sentence(fields, message):
    from tinygpt import ModelConfig

    with pytest.raises(ValueError) as error:
        ModelConfig.preset("seed", **fields)
    assert str(error.value) == message


def test_checkpoints_carry_the_variant_and_old_configs_still_load(tmp_path):
    """A variant model saves and loads with its fields; a config.json written before the fields
    existed loads as the learned, full-window, all-heads model it was."""
    import hashlib
    import json

    from tinygpt import ModelConfig, TinyDecoderModel
    from tinygpt.checkpoint import load_checkpoint, save_checkpoint
    from tinygpt.tokenizer import CharTokenizer

    tokenizer = CharTokenizer.from_text("abcdefg \n")
    config = ModelConfig.preset("seed", vocab_size=tokenizer.vocab_size, position="rope",
                                window=3, n_kv_heads=2)
    torch.manual_seed(0)
    model = TinyDecoderModel(config)
    path = save_checkpoint(tmp_path / "variant", model=model, tokenizer=tokenizer, step=1)
    loaded = load_checkpoint(path)
    assert loaded.config == config
    idx = torch.randint(tokenizer.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    assert torch.equal(loaded.model(idx), model.eval()(idx))
    old = ModelConfig.preset("seed", vocab_size=tokenizer.vocab_size)
    path = save_checkpoint(tmp_path / "old", model=TinyDecoderModel(old), tokenizer=tokenizer,
                           step=1)
    fields = json.loads((path / "config.json").read_text())
    for key in ("position", "window", "n_kv_heads"):
        del fields[key]
    (path / "config.json").write_text(json.dumps(fields))
    manifest = json.loads((path / "manifest.json").read_text())  # as the old writer would have
    manifest["config.json"] = hashlib.sha256((path / "config.json").read_bytes()).hexdigest()
    (path / "manifest.json").write_text(json.dumps(manifest))
    loaded = load_checkpoint(path)
    assert loaded.config == old and loaded.model.positional is not None


# ------------------------------------------------------------------------------ generation

GENERATION_VARIANTS = {
    "rope-grouped": dict(position="rope", n_kv_heads=2),
    "alibi-window": dict(position="alibi", window=3),
    "none-multi-query": dict(position="none", n_kv_heads=1),
    "learned-window": dict(window=4),
}


@pytest.mark.parametrize("variant", GENERATION_VARIANTS)
@pytest.mark.parametrize("policy", ("exact", "fast"))
def test_variant_generation_with_a_cache_equals_recomputation(variant, policy):
    """Ragged prompts (left padding: each row's own positions), past several context slides:
    the growing cache (and, for ALiBi with a window, the fixed-buffer step under torch.compile's
    eager backend) gives the uncached path's logits (fp64, 1e-10) and tokens."""
    from tinygpt import ModelConfig, TinyDecoderModel
    from tinygpt.generate import generate_steps

    config = ModelConfig.preset("seed", vocab_size=12, max_seq=6, **GENERATION_VARIANTS[variant])
    torch.manual_seed(0)
    model = TinyDecoderModel(config).double().eval()
    prompts = [torch.randint(12, (n,), generator=torch.Generator().manual_seed(n))
               for n in (1, 8, 4)]

    def steps(**options):
        generator = torch.Generator().manual_seed(0)
        return list(generate_steps(model, prompts, 14, generator=generator, policy=policy,
                                   **options))

    recomputed = steps(use_cache=False)
    # The fixed-buffer step builds its window and ALiBi masks from a tensor index; one variant
    # covers it (tracing costs seconds).
    compiled = [dict(compile="eager")] if variant == "alibi-window" and policy == "fast" else []
    for options in [dict(), *compiled]:
        for k, (a, b) in enumerate(zip(steps(**options), recomputed, strict=True)):
            assert torch.equal(a.tokens, b.tokens), f"{options}: token {k} differs"
            torch.testing.assert_close(a.logits, b.logits, rtol=1e-10, atol=1e-10)


def test_cli_model_options_include_the_variant_fields(capsys):
    """`--position`, `--window` and `--n-kv-heads` come from ModelConfig's fields, typed by its
    annotations (an int for `window: int | None`); a bad value is one line and exit code 2."""
    from tinygpt.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = capsys.readouterr().out
    for flag in ("--position POSITION", "--window WINDOW", "--n-kv-heads N_KV_HEADS"):
        assert flag in help_text
    assert main(["summary", "--config", "seed", "--position", "rope", "--window", "8",
                 "--n-kv-heads", "1"]) == 0
    out = capsys.readouterr().out
    assert "window=8" in out and f"{20_712 - 32 * 32 - 2 * 2 * 3 * 8 * 33:,}" in out
    assert main(["summary", "--config", "seed", "--n-kv-heads", "3"]) == 2
    err = capsys.readouterr().err
    assert err == "tinygpt: error: n_heads (4) must be divisible by n_kv_heads (3).\n"


# -------------------------------------------------------------------- packed documents in training


def test_separator_document_ids_end_each_document_with_its_separator():
    from tinygpt.data import separator_document_ids

    x = torch.tensor([[5, 9, 5, 5, 9, 9, 1], [9, 1, 2, 3, 4, 5, 6]])
    assert separator_document_ids(x, 9).tolist() == [[0, 0, 1, 1, 1, 2, 3],
                                                      [0, 1, 1, 1, 1, 1, 1]]


def test_training_with_packed_documents_masks_every_batch(tmp_path, capsys):
    """`tinygpt train --pack-documents SEP`: every training and validation forward gets the
    separator's document ids (no token attends across a boundary); a separator that is not one
    token of the vocabulary is one error line, exit code 2."""
    from unittest import mock

    from tinygpt import TinyDecoderModel
    from tinygpt.checkpoint import load_checkpoint
    from tinygpt.cli import main
    from tinygpt.data import separator_document_ids

    corpus = tmp_path / "docs.txt"
    corpus.write_text("".join(f"document {n} is short.|" for n in range(200)))
    args = ["train", "--corpus", str(corpus), "--data-dir", str(tmp_path / "cache"),
            "--runs-dir", str(tmp_path / "runs"), "--name", "r", "--config", "seed",
            "--max-seq", "16", "--position", "rope", "--batch-size", "4", "--steps", "2",
            "--eval-every", "2", "--eval-batches", "1"]
    calls = []
    forward = TinyDecoderModel.forward

    def spy(self, idx, **kwargs):
        calls.append((idx, kwargs.get("document_ids")))
        return forward(self, idx, **kwargs)

    with mock.patch.object(TinyDecoderModel, "forward", spy):
        assert main([*args, "--pack-documents", "|"]) == 0
    (separator,) = load_checkpoint(tmp_path / "runs" / "r").tokenizer.encode("|")
    assert len(calls) >= 3  # two steps and an evaluation
    for idx, document_ids in calls:
        assert torch.equal(document_ids, separator_document_ids(idx, separator))
    assert any(document_ids.max() > 0 for _, document_ids in calls)
    capsys.readouterr()
    assert main([*args, "--name", "s", "--pack-documents", "#"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "tinygpt: error: --pack-documents separator '#' is not in the tokenizer's vocabulary.")


@pytest.mark.parametrize("lengths", [(1, 5, 3), (4, 4)], ids=["ragged", "unpadded"])
@pytest.mark.parametrize("variant", ["rope-grouped", "alibi-window", "none-multi-query"])
def test_rolling_cache_equals_a_sliding_window_over_the_whole_history(variant, lengths):
    """policy="rolling": past max_seq the cache drops its oldest key and value, never
    re-prefilling; each step's logits equal (fp64, 1e-10) those of the same weights run over the
    row's whole history with a window of min(window, max_seq) keys in every layer. Ragged rows
    (left padding) and rows of one length (no padding mask) alike."""
    from dataclasses import replace

    from tinygpt import ModelConfig, TinyDecoderModel
    from tinygpt.generate import generate_steps

    config = ModelConfig.preset("seed", vocab_size=12, max_seq=6, **GENERATION_VARIANTS[variant])
    torch.manual_seed(0)
    model = TinyDecoderModel(config).double().eval()
    window = min(config.window or config.max_seq, config.max_seq)
    whole = TinyDecoderModel(replace(config, max_seq=64, window=window)).double().eval()
    whole.load_state_dict(model.state_dict())
    prompts = [torch.randint(12, (n,), generator=torch.Generator().manual_seed(n + row))
               for row, n in enumerate(lengths)]
    steps = list(generate_steps(model, prompts, 15, policy="rolling",
                                generator=torch.Generator().manual_seed(0)))
    histories = [p.tolist() for p in prompts]
    for k, step in enumerate(steps):
        for row, history in enumerate(histories):
            expected = whole(torch.tensor([history]))[0, -1]
            torch.testing.assert_close(step.logits[row], expected, rtol=1e-10, atol=1e-10,
                                       msg=lambda m, k=k, row=row: f"step {k}, row {row}: {m}")
            history.append(int(step.tokens[row]))
    assert len(histories[0]) > 2 * config.max_seq  # the cache rolled many times


def test_rolling_refuses_learned_positions_and_caches_it_cannot_roll():
    from tinygpt import ModelConfig, TinyDecoderModel
    from tinygpt.generate import generate

    prompt = torch.zeros(1, 2, dtype=torch.long)
    learned = TinyDecoderModel(ModelConfig.preset("seed", max_seq=6))
    with pytest.raises(ValueError, match="rolling policy needs relative positions"):
        generate(learned, prompt, 3, policy="rolling")
    rope = TinyDecoderModel(ModelConfig.preset("seed", max_seq=6, position="rope"))
    for options in (dict(use_cache=False), dict(compile="eager")):
        with pytest.raises(ValueError, match="rolling policy needs the eager cache"):
            generate(rope, prompt, 3, policy="rolling", **options)


def test_variant_models_compile_whole():
    """A variant forward (RoPE, grouped heads, a window and documents: the general mask path,
    positions restarting per document) traces into one graph: fullgraph=True raises on any
    graph break. (One trace: each costs seconds.)"""
    from tinygpt import ModelConfig, TinyDecoderModel

    idx = torch.randint(40, (2, 12), generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[0] * 5 + [1] * 7, [0] * 2 + [1] * 10])
    torch.manual_seed(0)
    model = TinyDecoderModel(ModelConfig.preset("seed", position="rope", n_kv_heads=2, window=5))
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(idx, document_ids=ids), model(idx, document_ids=ids))


@given(case=variant_model_cases())
def test_variant_configs_round_trip_through_json(case):
    import json

    from tinygpt import ModelConfig

    values = json.loads(json.dumps(case.config.to_dict()))
    assert ModelConfig.from_dict(values) == case.config


@pytest.mark.parametrize("fields", [dict(position="alibi", window=3),
                                    dict(position="rope", n_kv_heads=2),
                                    dict(position="none", n_kv_heads=1, window=5)],
                         ids=["alibi-window", "rope-grouped", "none-multi-query-window"])
def test_tiled_core_takes_every_variant_mask(fields):
    """attention_impl="tiled" gets the variant's mask as a TileMask (window, documents, ALiBi as a
    per-tile bias over positions) or, for a prefix, as a dense bias: the same logits as the
    dense core (fp64, 1e-10), with and without documents and prefixes."""
    from dataclasses import replace

    from tinygpt import ModelConfig, TinyDecoderModel

    config = ModelConfig.preset("seed", max_seq=24, **fields)
    torch.manual_seed(0)
    dense = TinyDecoderModel(config).double()
    tiled = TinyDecoderModel(replace(config, attention_impl="tiled")).double()
    tiled.load_state_dict(dense.state_dict())
    idx = torch.randint(40, (2, 24), generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[0] * 7 + [1] * 10 + [2] * 7, [0] * 1 + [1] * 23])
    keywords = [{}, {"document_ids": ids}]
    if "window" not in fields:
        keywords.append({"prefix_len": torch.tensor([5, 24])})
    for kwargs in keywords:
        torch.testing.assert_close(tiled(idx, **kwargs), dense(idx, **kwargs), rtol=1e-10,
                                   atol=1e-10, msg=lambda m, kwargs=kwargs: f"{kwargs}: {m}")


@pytest.mark.parametrize("labels", [(0, 1, 2, 3), (3, 2, 1, 0)], ids=["ascending", "descending"])
@pytest.mark.parametrize("position", ["learned", "alibi", "rope", "none"])
def test_a_packed_row_gives_each_document_the_logits_it_has_alone(position, labels):
    """Packing documents into one row with `document_ids` changes nothing for any of them: each
    document's logits equal those of the document run alone (positions restart at each one),
    in fp64 to 1e-10, with a one-token document among them, whichever way the labels run."""
    from tinygpt import ModelConfig, TinyDecoderModel

    torch.manual_seed(0)
    model = TinyDecoderModel(ModelConfig(vocab_size=17, d_model=16, n_heads=2, n_layers=2,
                                         d_ff=24, max_seq=16, norm_first=True,
                                         position=position)).double().eval()
    lengths = (5, 1, 4, 6)
    documents = [torch.randint(17, (1, n)) for n in lengths]
    packed = torch.cat(documents, dim=1)  # 1 t
    ids = torch.cat([torch.full((1, n), k) for k, n in zip(labels, lengths)], dim=1)
    logits = model(packed, document_ids=ids)
    start = 0
    for document in documents:
        n = document.shape[1]
        torch.testing.assert_close(logits[:, start:start + n], model(document),
                                   rtol=1e-10, atol=1e-10)
        start += n
