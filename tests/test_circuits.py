"""Circuit tools: patching, the logit lens, direct logit attribution, the induction detector and
composition scores; TransformerLens (an independent implementation) as an external oracle."""

import dataclasses
import math

import pytest
import torch
from einops import rearrange

from tinygpt.circuits import (
    composition_scores,
    direct_logit_attribution,
    induction_scores,
    logit_difference,
    logit_lens,
    patch,
    patched_logits,
    previous_token_scores,
)
from tinygpt.config import ModelConfig
from tinygpt.induction import repeated_tokens
from tinygpt.inspection import classify_heads, hook_names, run_with_cache
from tinygpt.model import TinyDecoderModel

PRE_NORM = ModelConfig(vocab_size=23, d_model=24, n_heads=4, n_layers=3, d_ff=40, max_seq=12,
                       norm_first=True, activation="gelu")


def _model(config: ModelConfig = PRE_NORM, seed: int = 0, dtype=torch.float32) -> TinyDecoderModel:
    torch.manual_seed(seed)
    model = TinyDecoderModel(config).to(dtype).eval()
    with torch.no_grad():  # non-zero biases and norms, so no term of a sum hides behind a zero
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(0.3 * torch.randn_like(param))
    return model


def _ids(config: ModelConfig, b: int = 2, t: int | None = None, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(config.vocab_size, (b, t or config.max_seq), generator=generator)


def _no_hooks_left(model: TinyDecoderModel) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# Activation patching -----------------------------------------------------------------------------

def test_patching_a_run_with_its_own_activations_changes_nothing():
    model, idx = _model(), _ids(PRE_NORM)
    logits = model(idx).detach()
    identity = lambda out: out  # noqa: E731 - the metric is the whole logits tensor
    for names in (["blocks.0.hook_resid_pre", "blocks.2.hook_resid_post"],
                  ["blocks.1.attention.hook_z"],
                  ["blocks.0.hook_attn_out", "blocks.2.hook_mlp_out"]):
        result = patch(model, idx, idx, names, identity)
        assert result.shape[-3:] == logits.shape
        assert torch.equal(result, logits.expand_as(result))  # bit-identical


def test_patching_a_whole_residual_stream_reproduces_the_clean_logits_exactly():
    model, clean, corrupted = _model(), _ids(PRE_NORM, seed=1), _ids(PRE_NORM, seed=2)
    clean_logits, corrupted_logits = model(clean).detach(), model(corrupted).detach()
    _, cache = run_with_cache(model, clean, ["blocks.1.hook_resid_pre"])
    with torch.no_grad():
        out = patched_logits(model, corrupted, "blocks.1.hook_resid_pre",
                             cache["blocks.1.hook_resid_pre"])
    assert torch.equal(out, clean_logits)
    # One position at a time on the last residual stream: that position's logits become clean,
    # and only that position's (it is past the last attention, so nothing else reads it).
    per_position = patch(model, clean, corrupted, ["blocks.2.hook_resid_post"], lambda out: out)[0]
    for p in range(PRE_NORM.max_seq):
        assert torch.equal(per_position[p][:, p], clean_logits[:, p])
        others = [q for q in range(PRE_NORM.max_seq) if q != p]
        assert torch.equal(per_position[p][:, others], corrupted_logits[:, others])


def test_patching_is_undone_afterwards_even_when_the_metric_fails():
    model, clean, corrupted = _model(), _ids(PRE_NORM, seed=1), _ids(PRE_NORM, seed=2)
    before = model(corrupted).detach()
    result = patch(model, clean, corrupted, ["blocks.0.attention.hook_z"],
                   logit_difference(target=3, foil=5))
    assert result.shape == (1, PRE_NORM.n_heads)
    assert _no_hooks_left(model)
    assert torch.equal(model(corrupted), before)

    def broken(logits):
        raise RuntimeError("metric failed")

    with pytest.raises(RuntimeError, match="metric failed"):
        patch(model, clean, corrupted, ["blocks.1.hook_resid_mid"], broken)
    assert _no_hooks_left(model)
    assert torch.equal(model(corrupted), before)


def test_patch_refuses_mixed_grids_and_mismatched_prompts():
    model, idx = _model(), _ids(PRE_NORM)
    with pytest.raises(ValueError, match="one kind of activation at a time"):
        patch(model, idx, idx, ["blocks.0.attention.hook_z", "blocks.0.hook_resid_pre"], torch.sum)
    with pytest.raises(ValueError, match="must have the same shape"):
        patch(model, idx, idx[:, :5], ["blocks.0.hook_resid_pre"], torch.sum)


# The logit lens and direct logit attribution ----------------------------------------------------

@pytest.mark.parametrize("norm_first", [True, False])
def test_logit_lens_at_the_last_layer_is_the_models_own_logits(norm_first):
    config = dataclasses.replace(PRE_NORM, norm_first=norm_first)
    model, idx = _model(config), _ids(config)
    lens = logit_lens(model, idx)
    assert lens.shape == (config.n_layers, *idx.shape, config.vocab_size)
    assert torch.equal(lens[-1], model(idx))


def test_logit_lens_after_block_zero_is_a_one_block_model_with_the_same_head():
    model, idx = _model(), _ids(PRE_NORM)
    short = TinyDecoderModel(dataclasses.replace(PRE_NORM, n_layers=1)).eval()
    state = {k: v for k, v in model.state_dict().items()
             if not k.startswith(("blocks.1", "blocks.2"))}
    short.load_state_dict(state)
    torch.testing.assert_close(logit_lens(model, idx)[0], short(idx), rtol=0, atol=1e-6)


@pytest.mark.parametrize("attn_only", [False, True])
@pytest.mark.parametrize("foil", [None, 7])
def test_direct_logit_attribution_sums_to_the_logit_difference(attn_only, foil):
    config = dataclasses.replace(PRE_NORM, attn_only=attn_only)
    model, idx = _model(config, dtype=torch.float64), _ids(config)
    result = direct_logit_attribution(model, idx, target=3, foil=foil, position=-2)
    logits = model(idx)[:, -2]
    expected = logits[:, 3] - (logits[:, foil] if foil is not None else 0.0)
    n_heads, n_layers = config.n_heads, config.n_layers
    per_layer = n_heads + 1 + (0 if attn_only else 1)
    assert len(result.labels) == result.contributions.shape[0] == 1 + n_layers * per_layer + 1
    assert result.contributions.shape[1] == idx.shape[0]
    torch.testing.assert_close(result.contributions.sum(dim=0), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(result.logit_diff, expected, rtol=0, atol=1e-12)


def test_direct_logit_attribution_of_a_head_is_its_output_decoded_with_the_frozen_scale():
    """By hand: the head's z times its columns of out_proj, centred, divided by the clean run's
    final LayerNorm scale, times the norm's weight, dotted with the unembedding difference."""
    config = dataclasses.replace(PRE_NORM, attn_only=True)
    model, idx = _model(config, dtype=torch.float64), _ids(config)
    result = direct_logit_attribution(model, idx, target=4, foil=9)
    last = f"blocks.{config.n_layers - 1}.hook_resid_post"
    z_names = [f"blocks.{n}.attention.hook_z" for n in range(config.n_layers)]
    _, cache = run_with_cache(model, idx, [last, *z_names])
    resid = cache[last][:, -1]
    scale = torch.sqrt(resid.var(-1, unbiased=False, keepdim=True) + model.final_norm.eps)
    direction = model.lm_head.weight[4] - model.lm_head.weight[9]
    d = config.d_head
    for layer, head in ((0, 1), (2, 3)):
        z = cache[z_names[layer]][:, head, -1]  # b d
        out = z @ model.blocks[layer].attention.out_proj.weight[:, head * d:(head + 1) * d].T
        out = out - out.mean(-1, keepdim=True)
        expected = (out / scale * model.final_norm.weight) @ direction
        got = result.contributions[result.labels.index(f"L{layer}H{head}")]
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


def test_direct_logit_attribution_refuses_post_norm_models_in_one_sentence():
    config = dataclasses.replace(PRE_NORM, norm_first=False)
    with pytest.raises(ValueError) as error:
        direct_logit_attribution(_model(config), _ids(config), target=1)
    message = str(error.value)
    assert "pre-norm" in message and "\n" not in message
    assert message.count(". ") == 0 and message.endswith(".")


# The induction detector on a hand-built induction circuit ----------------------------------------

V, T, N_HEADS = 12, 16, 4  # vocabulary, max_seq, heads; d_head = 20 holds 16 positions
TOKEN, POSITION, PREVIOUS = 0, V, V + T  # feature offsets; feature f is +1 at f and -1 at f + 40
HALF = V + T + V  # 40: every feature has a negative twin, so the stream's mean is always 0


def _feature(f: int) -> torch.Tensor:
    x = torch.zeros(2 * HALF)
    x[f], x[f + HALF] = 1.0, -1.0
    return x


def induction_circuit(gain: float = 3.0) -> TinyDecoderModel:
    """Layer 0 head 0: a previous-token head (query: position i; key: position j + 1) that copies
    the token into the PREVIOUS features. Layer 1 head 0: an induction head (query: the current
    token; key: the PREVIOUS features, i.e. the token before j), with position 0 pushed away.
    Every other head attends to itself and writes nothing. Zero-mean features make each LayerNorm
    a positive rescaling, which the large gain makes irrelevant to the argmax of the softmax."""
    config = ModelConfig(vocab_size=V, d_model=2 * HALF, n_heads=N_HEADS, n_layers=2, max_seq=T,
                         norm_first=True, attn_only=True)
    torch.manual_seed(0)
    model = TinyDecoderModel(config).eval()
    d, m = config.d_head, config.d_model
    for param in model.parameters():
        param.data.zero_()
    for norm in (model.blocks[0].norm1, model.blocks[1].norm1, model.final_norm):
        norm.weight.data.fill_(1.0)
    model.embedding.weight.data = torch.stack([_feature(TOKEN + a) for a in range(V)])
    model.positional.data = torch.stack([_feature(POSITION + p) for p in range(T)])
    w0, w1 = (model.blocks[n].attention.in_proj.weight.data for n in range(2))
    q0, k0, v0 = (w0[i * m:(i + 1) * m] for i in range(3))
    q1, k1 = (w1[i * m:(i + 1) * m] for i in range(2))
    for p in range(T):
        q0[p, POSITION + p] = gain  # head 0: query = position i
        if p >= 1:
            k0[p, POSITION + p - 1] = gain  # key of j = position j + 1
        for head in range(1, N_HEADS):  # self heads
            q0[head * d + p, POSITION + p] = k0[head * d + p, POSITION + p] = gain
            q1[head * d + p, POSITION + p] = k1[head * d + p, POSITION + p] = gain
        q1[V, POSITION + p] = gain  # a constant query feature...
    k1[V, POSITION] = -gain  # ...that pushes every query away from key 0
    w_o = model.blocks[0].attention.out_proj.weight.data
    for a in range(V):
        v0[a, TOKEN + a] = 0.25
        w_o[PREVIOUS + a, a], w_o[HALF + PREVIOUS + a, a] = 1.0, -1.0
        q1[a, TOKEN + a] = gain  # head 0 of layer 1: query = current token
        k1[a, PREVIOUS + a] = gain  # key = the token before j
    return model


def test_the_hand_built_induction_head_scores_one_and_the_others_zero():
    model = induction_circuit()
    idx = repeated_tokens(V, batch=6, t=T, generator=torch.Generator().manual_seed(0))
    induction = induction_scores(model, idx)
    previous = previous_token_scores(model, idx)
    assert induction[1, 0] > 0.99
    others = induction.clone()
    others[1, 0] = 0.0
    assert others.abs().max() < 0.01  # the previous-token head L0H0 included
    assert previous[0, 0] > 0.99 and previous[1, 0] < 0.2
    kinds = {(s.layer, s.head): s.kind for s in classify_heads(model, idx)}
    assert kinds[(0, 0)] == "previous-token" and kinds[(1, 0)] == "induction"
    assert kinds[(0, 1)] == kinds[(1, 1)] == "self"


def test_repeated_tokens_repeat_with_period_half_the_length():
    idx = repeated_tokens(50, batch=3, t=11, generator=torch.Generator().manual_seed(0))
    assert idx.shape == (3, 11) and torch.equal(idx[:, 1:6], idx[:, 6:])
    assert all(len(set(row[1:6].tolist())) == 5 for row in idx)  # distinct within a copy
    with pytest.raises(ValueError, match="at least 4 tokens"):
        repeated_tokens(50, batch=1, t=3)


# Composition scores ------------------------------------------------------------------------------

def _frobenius(x: torch.Tensor) -> float:
    return math.sqrt(float((x * x).sum()))


def _by_hand(model: TinyDecoderModel, layer: int, head: int):
    """W_QK (m m) and W_OV (m m) of one head, sliced from the fused weights with plain indexing."""
    m, d = model.config.d_model, model.config.d_head
    w = model.blocks[layer].attention.in_proj.weight.detach().double()
    rows = slice(head * d, (head + 1) * d)
    w_q, w_k, w_v = w[:m][rows], w[m:2 * m][rows], w[2 * m:][rows]
    w_o = model.blocks[layer].attention.out_proj.weight.detach().double()[:, rows]
    return w_q.T @ w_k, w_o @ w_v


def test_composition_scores_equal_the_formula_computed_by_hand():
    model = _model()
    scores = composition_scores(model)
    assert {k: v.shape for k, v in scores.items()} == {k: (2, 4, 4) for k in "qkv"}
    for n in range(2):
        for e in range(4):
            _, ov_e = _by_hand(model, n, e)
            for later in range(4):
                qk_l, ov_l = _by_hand(model, n + 1, later)
                norm = _frobenius(ov_e)
                expected = {"q": _frobenius(qk_l.T @ ov_e) / (_frobenius(qk_l) * norm),
                            "k": _frobenius(qk_l @ ov_e) / (_frobenius(qk_l) * norm),
                            "v": _frobenius(ov_l @ ov_e) / (_frobenius(ov_l) * norm)}
                for kind, value in expected.items():
                    assert scores[kind][n, e, later].item() == pytest.approx(value, rel=1e-4)


def test_composition_scores_ignore_the_scale_of_either_heads_weights():
    model = _model()
    before = composition_scores(model)
    m, d = model.config.d_model, model.config.d_head
    with torch.no_grad():
        model.blocks[0].attention.in_proj.weight[2 * m:2 * m + d] *= 7.0  # W_V of L0H0
        model.blocks[0].attention.out_proj.weight[:, d:2 * d] *= 0.1  # W_O of L0H1
        model.blocks[1].attention.in_proj.weight[2 * d:3 * d] *= 3.0  # W_Q of L1H2
        model.blocks[1].attention.in_proj.weight[m + 3 * d:m + 4 * d] *= 0.5  # W_K of L1H3
    after = composition_scores(model)
    for kind in "qkv":
        torch.testing.assert_close(after[kind], before[kind], rtol=1e-5, atol=0)


def test_the_hand_built_induction_head_k_composes_with_the_previous_token_head():
    model = induction_circuit()
    m, d = model.config.d_model, model.config.d_head
    for layer in range(2):  # the silent heads copy the token into the token features, so no
        attention = model.blocks[layer].attention  # W_OV is zero and every score is defined
        for head in range(N_HEADS):
            attention.in_proj.weight.data[2 * m + head * d:2 * m + head * d + V, :V] += torch.eye(V)
            attention.out_proj.weight.data[:V, head * d:head * d + V] += torch.eye(V)
    k = composition_scores(model)["k"][0]  # e l
    runner_up = k.flatten().sort().values[-2]
    assert k[0, 0] == k.max() and k[0, 0] > 10 * runner_up


# TransformerLens as an oracle -------------------------------------------------------------------
# Its HookedTransformer (kept in 3.x, deprecated in favour of wrapping Hugging Face models) is an
# independent GPT-2-style implementation with the same hook vocabulary.
HOOKED_IS_DEPRECATED = pytest.mark.filterwarnings("ignore:HookedTransformer is deprecated")

def _hooked_transformer(model: TinyDecoderModel):
    """The same weights in TransformerLens's HookedTransformer (fp64)."""
    import transformer_lens as tl  # the `oracle` extra, pinned in dev: absent is a failure
    c = model.config
    cfg = tl.HookedTransformerConfig(
        n_layers=c.n_layers, d_model=c.d_model, n_ctx=c.max_seq, d_head=c.d_head,
        n_heads=c.n_heads, d_vocab=c.vocab_size, d_mlp=None if c.attn_only else c.d_ff,
        act_fn="relu", attn_only=c.attn_only, normalization_type="LN", eps=c.layer_norm_eps,
        positional_embedding_type="standard", dtype=torch.float64, device="cpu")
    hooked = tl.HookedTransformer(cfg)
    state = {"embed.W_E": model.embedding.weight, "pos_embed.W_pos": model.positional,
             "ln_final.w": model.final_norm.weight, "ln_final.b": model.final_norm.bias,
             "unembed.W_U": model.lm_head.weight.T, "unembed.b_U": model.lm_head.bias}
    for n, block in enumerate(model.blocks):
        attention, prefix = block.attention, f"blocks.{n}."
        weights = rearrange(attention.in_proj.weight, "(three h d) m -> three h m d", three=3,
                            h=c.n_heads)
        biases = rearrange(attention.in_proj.bias, "(three h d) -> three h d", three=3, h=c.n_heads)
        for i, part in enumerate("QKV"):
            state[f"{prefix}attn.W_{part}"], state[f"{prefix}attn.b_{part}"] = weights[i], biases[i]
        state[f"{prefix}attn.W_O"] = rearrange(attention.out_proj.weight, "m (h d) -> h d m",
                                               h=c.n_heads)
        state[f"{prefix}attn.b_O"] = attention.out_proj.bias
        state[f"{prefix}ln1.w"], state[f"{prefix}ln1.b"] = block.norm1.weight, block.norm1.bias
        if not c.attn_only:
            state[f"{prefix}ln2.w"], state[f"{prefix}ln2.b"] = block.norm2.weight, block.norm2.bias
            fc_in, fc_out = block.mlp.fc_in, block.mlp.fc_out
            state[f"{prefix}mlp.W_in"], state[f"{prefix}mlp.b_in"] = fc_in.weight.T, fc_in.bias
            state[f"{prefix}mlp.W_out"], state[f"{prefix}mlp.b_out"] = fc_out.weight.T, fc_out.bias
    hooked.load_state_dict({k: v.detach().double() for k, v in state.items()}, strict=False)
    return hooked


# TinyGPT hook -> (TransformerLens hook, how to bring TL's tensor to our layout)
_SAME = {
    "hook_resid_pre": ("hook_resid_pre", None), "hook_attn_out": ("hook_attn_out", None),
    "hook_resid_mid": ("hook_resid_mid", None), "hook_mlp_out": ("hook_mlp_out", None),
    "hook_resid_post": ("hook_resid_post", None),
    "attention.hook_q": ("attn.hook_q", "b t h d -> b h t d"),
    "attention.hook_k": ("attn.hook_k", "b t h d -> b h t d"),
    "attention.hook_v": ("attn.hook_v", "b t h d -> b h t d"),
    "attention.hook_masked_scores": ("attn.hook_attn_scores", None),
    "attention.hook_pattern": ("attn.hook_pattern", None),
    "attention.hook_z": ("attn.hook_z", "b t h d -> b h t d"),
}


@HOOKED_IS_DEPRECATED
@pytest.mark.parametrize("attn_only", [False, True])
def test_transformer_lens_runs_the_same_model_to_the_same_logits_and_activations(attn_only):
    config = dataclasses.replace(PRE_NORM, attn_only=attn_only, activation="relu")
    model, idx = _model(config, dtype=torch.float64), _ids(config)
    hooked = _hooked_transformer(model)
    tl_logits, tl_cache = hooked.run_with_cache(idx)
    logits, cache = run_with_cache(model, idx)
    torch.testing.assert_close(logits, tl_logits, rtol=0, atol=1e-10)
    compared = 0
    for name in hook_names(model):
        if not name.startswith("blocks."):
            continue
        layer, local = name.split(".", 2)[1], name.split(".", 2)[2]
        if local not in _SAME or (attn_only and local in ("hook_mlp_out", "hook_resid_mid")):
            continue  # TransformerLens has no MLP hooks in an attention-only model
        tl_name, pattern = _SAME[local]
        theirs = tl_cache[f"blocks.{layer}.{tl_name}"]
        theirs = rearrange(theirs, pattern) if pattern else theirs
        ours = cache[name]
        finite = torch.isfinite(theirs)  # masked scores are -inf in both
        assert torch.equal(finite, torch.isfinite(ours)), name
        torch.testing.assert_close(ours[finite], theirs[finite], rtol=0, atol=1e-10, msg=name)
        compared += 1
    assert compared == config.n_layers * (len(_SAME) - (2 if attn_only else 0))


@HOOKED_IS_DEPRECATED
def test_transformer_lens_head_detector_agrees_on_induction_and_previous_token_scores():
    from transformer_lens import head_detector as detector
    model = induction_circuit().double()
    hooked = _hooked_transformer(model)
    idx = repeated_tokens(V, batch=1, t=T, generator=torch.Generator().manual_seed(3))
    _, tl_cache = hooked.run_with_cache(idx, remove_batch_dim=True)
    ours = {"induction_head": induction_scores(model, idx),
            "previous_token_head": previous_token_scores(model, idx)}
    # TransformerLens's "mul" score divides by every query (t of them); ours averages over the
    # queries the pattern is defined on: the n = t/2 of the second copy, or the t - 1 from 1 on.
    per_query = {"induction_head": T / (T // 2), "previous_token_head": T / (T - 1)}
    for kind, scores in ours.items():
        pattern = getattr(detector, f"get_{kind}_detection_pattern")(idx)
        for layer in range(2):
            for head in range(N_HEADS):
                theirs = detector.compute_head_attention_similarity_score(
                    tl_cache["pattern", layer][head], pattern, exclude_bos=False,
                    exclude_current_token=False, error_measure="mul")
                assert scores[layer, head].item() == pytest.approx(theirs * per_query[kind],
                                                                   abs=1e-6)
    assert ours["induction_head"][1, 0] > 0.99 and ours["previous_token_head"][0, 0] > 0.99
