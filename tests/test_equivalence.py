"""The hand-written attention and model are the same function as their nn.MultiheadAttention twins.

Weights are always copied through `reference.copy_weights` (the same seed does not give the same
weights in the two builds). The tolerances live in `strategies`, with their reasons.
"""

from __future__ import annotations

from dataclasses import replace
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import (
    ATTENTION_EXAMPLES,
    FORWARD_TOL,
    GRAD_TOL,
    MODEL_EXAMPLES,
    assert_golden,
    attention_cases,
    model_cases,
    model_pair,
    with_examples,
)
from torch import nn

from reference import copy_weights, reference_key
from tinygpt import MultiHeadAttention, additive_mask, causal_mask, next_token_loss, parameter_table

MASK_KINDS = ("none", "causal", "padding", "both")


# ----------------------------------------------------------------------------- attention level


def attention_pair(case, *, source: str = "hand"):
    torch.manual_seed(case.seed)
    hand = MultiHeadAttention(case.d_model, case.n_heads).to(case.dtype)
    reference = nn.MultiheadAttention(
        case.d_model, case.n_heads, batch_first=True, dtype=case.dtype
    )
    if source == "hand":
        copy_weights(hand, reference)
    else:
        copy_weights(reference, hand)
    return hand, reference


def attention_masks(case, kind: str, boolean: bool):
    """(hand's masks, reference's masks) as keyword dicts. The reference's causal mask comes from
    torch's own helper, the hand-written model's from tinygpt; key 0 is never padding, so no query
    row is ever fully masked."""
    hand, reference = {}, {}
    if kind in ("causal", "both"):
        torch_mask = nn.Transformer.generate_square_subsequent_mask(case.t, dtype=case.dtype)
        if boolean:
            hand["attn_mask"] = reference["attn_mask"] = torch.isinf(torch_mask)
        else:
            hand["attn_mask"], reference["attn_mask"] = (
                causal_mask(case.t).to(case.dtype),
                torch_mask,
            )
    if kind in ("padding", "both"):
        is_pad = torch.rand(case.batch, case.t, generator=case.generator()) < 0.4
        is_pad[:, 0] = False
        if boolean:
            hand["key_padding_mask"] = reference["key_padding_mask"] = is_pad
        else:
            hand["key_padding_mask"] = additive_mask(is_pad, case.dtype)
            zeros = torch.zeros(case.batch, case.t, dtype=case.dtype)
            reference["key_padding_mask"] = zeros.masked_fill(is_pad, float("-inf"))
    return hand, reference


def attention_input(case):
    generator = case.generator()
    x = torch.randn(case.batch, case.t, case.d_model, generator=generator, dtype=torch.float64)
    return x.to(case.dtype)


def run_attention(module, x, masks, need_weights, average, cotangents):
    """out, weights and the gradients of a random projection of both, wrt x and every parameter."""
    x = x.clone().requires_grad_()
    if isinstance(module, nn.MultiheadAttention):
        out, weights = module(
            x, x, x, need_weights=need_weights, average_attn_weights=average, **masks
        )
    else:
        out, weights = module(x, need_weights=need_weights, average_attn_weights=average, **masks)
    loss = (out * cotangents[0]).sum()
    if weights is not None:
        loss = loss + (weights * cotangents[1][: weights.numel()].view_as(weights)).sum()
    loss.backward()
    return out.detach(), None if weights is None else weights.detach(), x.grad


def attention_cotangents(case):
    generator = torch.Generator().manual_seed(case.seed + 1)
    out = torch.randn(case.batch, case.t, case.d_model, generator=generator, dtype=torch.float64)
    weights = torch.randn(
        case.batch * case.n_heads * case.t * case.t, generator=generator, dtype=torch.float64
    )
    return out.to(case.dtype), weights.to(case.dtype)


def assert_attention_equal(hand, reference, hand_result, reference_result, dtype):
    (out, weights, x_grad), (ref_out, ref_weights, ref_x_grad) = hand_result, reference_result
    assert torch.isfinite(out).all() and torch.isfinite(x_grad).all()
    torch.testing.assert_close(out, ref_out, **FORWARD_TOL[dtype])
    if ref_weights is None:
        assert weights is None
    else:
        torch.testing.assert_close(weights, ref_weights, **FORWARD_TOL[dtype])
    torch.testing.assert_close(x_grad, ref_x_grad, **GRAD_TOL[dtype])
    reference_params = dict(reference.named_parameters())
    for name, param in hand.named_parameters():
        torch.testing.assert_close(
            param.grad,
            reference_params[reference_key(name)].grad,
            **GRAD_TOL[dtype],
            msg=lambda m, name=name: f"{name}: {m}",
        )


@settings(max_examples=200)
@given(
    case=attention_cases(),
    kind=st.sampled_from(MASK_KINDS),
    boolean=st.booleans(),
    need_weights=st.booleans(),
    average=st.booleans(),
    source=st.sampled_from(("hand", "ref")),
)
@with_examples(
    ATTENTION_EXAMPLES, kind="both", boolean=False, need_weights=True, average=False, source="hand"
)
@with_examples(
    ATTENTION_EXAMPLES[:2],
    kind="causal",
    boolean=True,
    need_weights=False,
    average=True,
    source="ref",
)
def test_attention_matches_mha_in_train_mode(case, kind, boolean, need_weights, average, source):
    """Outputs, averaged or per-head weights, and gradients of the input and of every parameter,
    in training mode (dropout 0: MHA's slow path), with no mask, causal, padding and both."""
    hand, reference = attention_pair(case, source=source)
    hand_masks, reference_masks = attention_masks(case, kind, boolean)
    x, cotangents = attention_input(case), attention_cotangents(case)
    assert_attention_equal(
        hand,
        reference,
        run_attention(hand, x, hand_masks, need_weights, average, cotangents),
        run_attention(reference, x, reference_masks, need_weights, average, cotangents),
        case.dtype,
    )


def test_attention_per_head_weights_average_to_mha_weights():
    """The per-head weights `(b h i j)` are MHA's per-head weights and average to its `(b i j)`."""
    case = ATTENTION_EXAMPLES[1]
    hand, reference = attention_pair(case)
    hand_masks, reference_masks = attention_masks(case, "both", boolean=False)
    x = attention_input(case)
    _, per_head = hand(x, need_weights=True, average_attn_weights=False, **hand_masks)
    _, averaged = reference(x, x, x, need_weights=True, **reference_masks)
    assert per_head.shape == (case.batch, case.n_heads, case.t, case.t)
    torch.testing.assert_close(per_head.mean(dim=1), averaged, **FORWARD_TOL[case.dtype])


def fast_path_spy():
    return mock.patch.object(
        torch, "_native_multi_head_attention", wraps=torch._native_multi_head_attention
    )


@settings(max_examples=100)
@given(
    case=attention_cases(heads=(2, 4, 8)),
    kind=st.sampled_from(MASK_KINDS),
    need_weights=st.booleans(),
    average=st.booleans(),
)
@with_examples(
    ATTENTION_EXAMPLES,
    keep=lambda case: case.n_heads % 2 == 0,
    kind="both",
    need_weights=True,
    average=False,
)
def test_attention_matches_mha_fast_path(case, kind, need_weights, average):
    """Eval mode under inference_mode with boolean masks: MHA's native fast path, proven by a
    spy."""
    hand, reference = attention_pair(case)
    hand.eval(), reference.eval()
    hand_masks, reference_masks = attention_masks(case, kind, boolean=True)
    x = attention_input(case)
    with torch.inference_mode(), fast_path_spy() as spy:
        ref_out, ref_weights = reference(
            x, x, x, need_weights=need_weights, average_attn_weights=average, **reference_masks
        )
        out, weights = hand(
            x, need_weights=need_weights, average_attn_weights=average, **hand_masks
        )
    assert spy.call_count == 1, "nn.MultiheadAttention did not take its fast path"
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref_out, **FORWARD_TOL[case.dtype])
    if need_weights:
        torch.testing.assert_close(weights, ref_weights, **FORWARD_TOL[case.dtype])


@settings(max_examples=100)
@given(case=attention_cases(heads=(2, 4, 8)), kind=st.sampled_from(MASK_KINDS))
@with_examples(ATTENTION_EXAMPLES, keep=lambda case: case.n_heads % 2 == 0, kind="both")
def test_attention_matches_mha_with_fast_path_disabled(case, kind):
    """The same eval + inference_mode call with the fast path switched off: MHA's slow path."""
    hand, reference = attention_pair(case)
    hand.eval(), reference.eval()
    hand_masks, reference_masks = attention_masks(case, kind, boolean=True)
    x = attention_input(case)
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.inference_mode(), fast_path_spy() as spy:
            ref_out, _ = reference(x, x, x, need_weights=False, **reference_masks)
            out, _ = hand(x, **hand_masks)
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)
    assert spy.call_count == 0
    torch.testing.assert_close(out, ref_out, **FORWARD_TOL[case.dtype])


@settings(max_examples=100)
@given(
    case=attention_cases(dtypes=(torch.float32,)),
    scale=st.sampled_from((0.3, 1.0)),
    kind=st.sampled_from(MASK_KINDS),
)
@with_examples(
    ATTENTION_EXAMPLES, keep=lambda case: case.dtype == torch.float32, scale=1.0, kind="both"
)
def test_attention_with_large_weights_meets_pytorch_fp32_rule(case, scale, kind):
    """Weights far from their initial spread, as after training (noise N(0, 0.3²) or N(0, 1) added
    to every parameter): fp32 error against a float64 run of MHA is at most max(1e-5, 5 x MHA's
    own fp32 error), for the output, the per-head weights and all gradients."""
    case64 = replace(case, dtype=torch.float64)
    _, reference64 = attention_pair(case64)
    generator = torch.Generator().manual_seed(case.seed + 2)
    with torch.no_grad():
        for param in reference64.parameters():
            param.add_(scale * torch.randn(param.shape, generator=generator, dtype=torch.float64))
    reference32 = nn.MultiheadAttention(case.d_model, case.n_heads, batch_first=True)
    reference32.load_state_dict(reference64.state_dict())
    hand32 = MultiHeadAttention(case.d_model, case.n_heads)
    copy_weights(reference32, hand32)
    _, masks64 = attention_masks(case64, kind, boolean=False)
    hand_masks, masks32 = attention_masks(case, kind, boolean=False)
    x64 = attention_input(case64)
    cotangents64 = attention_cotangents(case64)
    cotangents32 = tuple(c.float() for c in cotangents64)
    golden = run_attention(reference64, x64, masks64, True, False, cotangents64)
    own = run_attention(reference32, x64.float(), masks32, True, False, cotangents32)
    ours = run_attention(hand32, x64.float(), hand_masks, True, False, cotangents32)
    for name, mine, theirs, gold in zip(("out", "weights", "x.grad"), ours, own, golden):
        assert torch.isfinite(mine).all()
        assert_golden(name, mine, theirs, gold)
    params64, params32 = dict(reference64.named_parameters()), dict(reference32.named_parameters())
    for name, param in hand32.named_parameters():
        key = reference_key(name)
        assert_golden(name, param.grad, params32[key].grad, params64[key].grad)


def test_fully_masked_row_matches_sdpa_rule_of_mha():
    """A query whose keys are all padding: zero weights and output = out_proj.bias, as MHA's
    need_weights=False (SDPA) path gives, with finite gradients (MHA's weights path gives NaN)."""
    case = ATTENTION_EXAMPLES[0]
    hand, reference = attention_pair(case)
    is_pad = torch.zeros(case.batch, case.t, dtype=torch.bool)
    is_pad[0, :] = True  # every key of batch row 0 is padding
    x = attention_input(case)
    cotangents = attention_cotangents(case)
    masks = {"key_padding_mask": is_pad}
    ours = run_attention(hand, x, masks, False, True, cotangents)
    theirs = run_attention(reference, x, masks, False, True, cotangents)
    assert_attention_equal(hand, reference, ours, theirs, case.dtype)
    assert torch.isfinite(theirs[0]).all()
    torch.testing.assert_close(
        ours[0][0], hand.out_proj.bias.detach().expand(case.t, -1), **FORWARD_TOL[case.dtype]
    )


# --------------------------------------------------------------------------------- model level


def model_loss(model, idx, targets):
    logits = model(idx)
    loss = next_token_loss(logits, targets)
    loss.backward()
    return logits.detach()


@settings(max_examples=150)
@given(case=model_cases(), source=st.sampled_from(("hand", "ref")))
@with_examples(MODEL_EXAMPLES, source="hand")
@with_examples(MODEL_EXAMPLES[:3], source="ref")
def test_model_matches_reference(case, source):
    """Logits and the gradient of the loss wrt every parameter, weights copied either way, both
    norm placements and the seed quirk on and off (all drawn), fp64 and fp32."""
    hand, reference = model_pair(case.config, case.dtype, case.seed, source=source)
    idx = case.tokens()
    targets = torch.roll(idx, -1, dims=1)
    logits, ref_logits = model_loss(hand, idx, targets), model_loss(reference, idx, targets)
    assert torch.isfinite(logits).all() and torch.isfinite(ref_logits).all()
    torch.testing.assert_close(logits, ref_logits, **FORWARD_TOL[case.dtype])
    reference_params = dict(reference.named_parameters())
    for name, param in hand.named_parameters():
        assert torch.isfinite(param.grad).all(), name
        torch.testing.assert_close(
            param.grad,
            reference_params[reference_key(name)].grad,
            **GRAD_TOL[case.dtype],
            msg=lambda m, name=name: f"{name}: {m}",
        )


@settings(max_examples=75)
@given(case=model_cases(dtypes=(torch.float32,), min_d_model=2), scale=st.sampled_from((0.3, 1.0)))
@with_examples(MODEL_EXAMPLES, keep=lambda case: case.dtype == torch.float32, scale=1.0)
def test_model_with_large_weights_meets_pytorch_fp32_rule(case, scale):
    """Trained-looking weights in fp32 (N(0, 0.3²) or N(0, 1) added): logits and every gradient
    within PyTorch's golden rule."""
    hand64, reference64 = model_pair(case.config, torch.float64, case.seed)
    generator = torch.Generator().manual_seed(case.seed + 2)
    with torch.no_grad():
        for param in reference64.parameters():
            param.add_(scale * torch.randn(param.shape, generator=generator, dtype=torch.float64))
    _, reference32 = model_pair(case.config, torch.float32, case.seed)
    reference32.load_state_dict(reference64.state_dict())
    hand32 = hand64.float()
    copy_weights(reference32, hand32)
    idx = case.tokens()
    targets = torch.roll(idx, -1, dims=1)
    golden = model_loss(reference64, idx, targets)
    assert_golden(
        "logits", model_loss(hand32, idx, targets), model_loss(reference32, idx, targets), golden
    )
    params64, params32 = dict(reference64.named_parameters()), dict(reference32.named_parameters())
    for name, param in hand32.named_parameters():
        key = reference_key(name)
        assert_golden(name, param.grad, params32[key].grad, params64[key].grad)


@settings(max_examples=100)
@given(case=model_cases(heads=(2, 4, 8)))
@with_examples(MODEL_EXAMPLES, keep=lambda case: case.config.n_heads % 2 == 0)
def test_model_matches_reference_on_mha_fast_path(case):
    """The reference with the boolean twin of its mask, in eval + inference_mode: every block's
    MHA takes the native fast path (counted by a spy), and the logits still agree."""
    hand, reference = model_pair(case.config, case.dtype, case.seed, bool_mask=True)
    hand.eval(), reference.eval()
    idx = case.tokens()
    with torch.inference_mode(), fast_path_spy() as spy:
        ref_logits, logits = reference(idx), hand(idx)
    assert spy.call_count == case.config.n_layers
    assert torch.isfinite(logits).all() and torch.isfinite(ref_logits).all()
    torch.testing.assert_close(logits, ref_logits, **FORWARD_TOL[case.dtype])


def test_bool_and_float_reference_masks_agree_bitwise():
    """The reference's boolean twin is the same mask: identical logits in training mode."""
    case = MODEL_EXAMPLES[0]
    _, float_reference = model_pair(case.config, case.dtype, case.seed)
    _, bool_reference = model_pair(case.config, case.dtype, case.seed, bool_mask=True)
    bool_reference.load_state_dict(float_reference.state_dict())
    idx = case.tokens()
    assert torch.equal(float_reference(idx), bool_reference(idx))


# ---------------------------------------------------------------------- parameters and copying


@given(case=model_cases())
@with_examples(MODEL_EXAMPLES)
def test_same_parameters_one_for_one(case):
    """Every hand-written parameter has a reference twin of the same shape, and back; the
    per-module counts are equal."""
    hand, reference = model_pair(case.config, torch.float32, case.seed)
    hand_shapes = {reference_key(n): p.shape for n, p in hand.named_parameters()}
    assert hand_shapes == {n: p.shape for n, p in reference.named_parameters()}
    assert parameter_table(hand) == parameter_table(reference)


SEED_TABLE = (
    [("positional", 1024), ("embedding", 1280)]
    + [
        row
        for n in range(2)
        for row in (
            (f"blocks.{n}.attention", 4224),
            (f"blocks.{n}.norm1", 64),
            (f"blocks.{n}.mlp", 4192),
            (f"blocks.{n}.norm2", 64),
        )
    ]
    + [("lm_head", 1320)]
)


@pytest.mark.parametrize("build", ("hand", "reference"))
def test_seed_parameter_table(build):
    """The seed preset has the seed's table, 20,712 in all, in both builds."""
    hand, reference = model_pair(MODEL_EXAMPLES[0].config, torch.float32, 0)
    model = hand if build == "hand" else reference
    assert parameter_table(model) == SEED_TABLE
    assert sum(p.numel() for p in model.parameters()) == 20_712


@pytest.mark.parametrize("source", ("hand", "ref"))
def test_copy_weights_leaves_no_parameter_behind(source):
    """After a copy every destination parameter equals its source twin, and none kept its own
    initial value (they all started different: same seed, different builds)."""
    from reference import ReferenceDecoderModel
    from tinygpt import TinyDecoderModel

    config = MODEL_EXAMPLES[2].config
    torch.manual_seed(0)
    hand = TinyDecoderModel(config)
    torch.manual_seed(1)
    reference = ReferenceDecoderModel(config)
    src, dst = (hand, reference) if source == "hand" else (reference, hand)
    before = {n: p.detach().clone() for n, p in dst.named_parameters()}
    copy_weights(src, dst)
    hand_params, reference_params = (
        dict(hand.named_parameters()),
        dict(reference.named_parameters()),
    )
    for name, param in hand_params.items():
        assert torch.equal(param, reference_params[reference_key(name)]), name
    for name, param in dst.named_parameters():
        if before[name].std() > 0:  # LayerNorms and biases start equal (1 and 0) in both builds
            assert not torch.equal(param, before[name]), f"{name} was not copied"


def test_state_dict_round_trip_is_bitwise():
    """hand -> reference -> fresh hand: every tensor and the logits are bit for bit the same."""
    from tinygpt import TinyDecoderModel

    case = MODEL_EXAMPLES[2]
    hand, reference = model_pair(case.config, case.dtype, case.seed)
    torch.manual_seed(case.seed + 1)
    again = TinyDecoderModel(case.config).to(case.dtype)
    copy_weights(reference, again)
    original, restored = hand.state_dict(), again.state_dict()
    assert original.keys() == restored.keys()
    for key in original:
        assert torch.equal(original[key], restored[key]), key
    idx = case.tokens()
    assert torch.equal(hand(idx), again(idx))


def test_copy_weights_refuses_a_config_mismatch():
    config = MODEL_EXAMPLES[2].config
    hand, _ = model_pair(config, torch.float32, 0)
    _, other = model_pair(replace(config, vocab_size=config.vocab_size + 1), torch.float32, 0)
    with pytest.raises(ValueError, match="cannot copy weights between"):
        copy_weights(hand, other)
    with pytest.raises(ValueError, match="cannot copy weights between"):
        copy_weights(MultiHeadAttention(8, 2), nn.MultiheadAttention(8, 4, batch_first=True))


def test_copy_weights_refuses_non_pairs():
    config = MODEL_EXAMPLES[2].config
    hand, reference = model_pair(config, torch.float32, 0)
    other_hand, other_reference = model_pair(config, torch.float32, 1)
    attention = MultiHeadAttention(config.d_model, config.n_heads)
    for src, dst in (
        (hand, other_hand),
        (reference, other_reference),
        (MultiHeadAttention(8, 2), MultiHeadAttention(8, 2)),
        (attention, nn.Linear(config.d_model, config.d_model)),
        (hand, reference.blocks[0].attention),
        (reference, attention),
    ):
        with pytest.raises(TypeError, match="hand-written module and its reference twin"):
            copy_weights(src, dst)
