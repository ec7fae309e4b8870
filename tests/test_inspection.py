"""The activation cache, interventions and head statistics of tinygpt.inspection."""

import pytest
import torch

from tinygpt import ModelConfig, TinyDecoderModel, next_token_loss
from tinygpt.inspection import (
    HEAD_KINDS,
    ablate_head,
    classify_heads,
    eval_windows,
    head_importance,
    hook_names,
    hooks,
    pattern_scores,
    replace_with,
    run_with_cache,
    run_with_interventions,
    zero_heads,
)

PER_BLOCK = ["resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post"]
PER_ATTENTION = ["q", "k", "v", "scores", "masked_scores", "pattern", "z"]


def _model(norm_first=False, seed=0, **overrides):
    torch.manual_seed(seed)
    config = ModelConfig.preset("seed", norm_first=norm_first, **overrides)
    return TinyDecoderModel(config).eval()


def _ids(model, b=3, t=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (b, t), generator=g)


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_hook_names_cover_every_documented_point_in_forward_order():
    model = _model()
    names = hook_names(model)
    assert len(names) == len(set(names)) == 2 * (len(PER_BLOCK) + len(PER_ATTENTION))
    for layer in range(2):
        for name in PER_BLOCK:
            assert f"blocks.{layer}.hook_{name}" in names
        for name in PER_ATTENTION:
            assert f"blocks.{layer}.attention.hook_{name}" in names
    # The order is the one a forward pass really fires them in.
    fired = []
    record = lambda name: lambda x: fired.append(name)  # noqa: E731
    run_with_interventions(model, _ids(model), {name: record(name) for name in names})
    assert fired == names


@pytest.mark.parametrize("norm_first", [False, True])
def test_cache_leaves_logits_bit_identical_and_removes_its_hooks(norm_first):
    model = _model(norm_first)
    idx = _ids(model)
    before = model(idx)
    logits, cache = run_with_cache(model, idx)
    assert torch.equal(logits, before)
    assert set(cache) == set(hook_names(model))
    assert _hook_count(model) == 0
    assert torch.equal(model(idx), before)


def test_cache_keeps_only_the_requested_names():
    model = _model()
    wanted = ["blocks.1.attention.hook_pattern", "blocks.0.hook_resid_post"]
    _, cache = run_with_cache(model, _ids(model), wanted)
    assert sorted(cache) == sorted(wanted)
    assert not any(t.requires_grad for t in cache.values())


def test_cached_activations_have_the_documented_shapes_and_meaning():
    model = _model(norm_first=True)
    idx = _ids(model, b=2, t=9)
    _, cache = run_with_cache(model, idx)
    b, t, h, d = 2, 9, model.config.n_heads, model.config.d_head
    block, attention = "blocks.1", "blocks.1.attention"
    for name in ("q", "k", "v", "z"):
        assert cache[f"{attention}.hook_{name}"].shape == (b, h, t, d)
    for name in ("scores", "masked_scores", "pattern"):
        assert cache[f"{attention}.hook_{name}"].shape == (b, h, t, t)
    pattern = cache[f"{attention}.hook_pattern"]
    assert torch.equal(pattern, cache[f"{attention}.hook_masked_scores"].softmax(-1))
    assert torch.all(pattern.triu(1) == 0)
    torch.testing.assert_close(pattern.sum(-1), torch.ones(b, h, t))
    torch.testing.assert_close(cache[f"{attention}.hook_z"], pattern @ cache[f"{attention}.hook_v"])
    # Pre-norm: resid_mid = resid_pre + attn_out, resid_post = resid_mid + mlp_out.
    torch.testing.assert_close(
        cache[f"{block}.hook_resid_mid"],
        cache[f"{block}.hook_resid_pre"] + cache[f"{block}.hook_attn_out"])
    torch.testing.assert_close(
        cache[f"{block}.hook_resid_post"],
        cache[f"{block}.hook_resid_mid"] + cache[f"{block}.hook_mlp_out"])
    # The cached pattern is the one the attention module itself reports.
    x = model.blocks[1].norm1(cache[f"{block}.hook_resid_pre"]) * model.blocks[1].input_scale
    _, weights = model.blocks[1].attention(
        x, attn_mask=model.causal_mask[:t, :t], need_weights=True, average_attn_weights=False)
    torch.testing.assert_close(pattern, weights)


def test_hooks_are_removed_when_a_hook_raises():
    model = _model()

    def broken(x):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run_with_interventions(model, _ids(model), {"blocks.0.attention.hook_q": broken})
    assert _hook_count(model) == 0


def test_hooks_are_removed_when_the_forward_pass_raises():
    model = _model()
    bad = torch.full((1, 4), model.config.vocab_size)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        run_with_cache(model, bad)
    assert _hook_count(model) == 0


def test_hooks_are_removed_when_the_caller_raises_inside_the_context():
    model = _model()
    with pytest.raises(KeyError):
        with hooks(model, {"blocks.0.hook_resid_pre": lambda x: None}):
            assert _hook_count(model) == 1
            raise KeyError("caller")
    assert _hook_count(model) == 0


def test_unknown_name_and_wrong_replacement_shape_are_clear_errors():
    model = _model()
    idx = _ids(model)
    with pytest.raises(ValueError, match="unknown hook name 'blocks.0.hook_pattern'"):
        run_with_cache(model, idx, ["blocks.0.hook_pattern"])
    wrong_shape = r"replacement for blocks.0.hook_resid_pre has shape \(1, 2\)"
    with pytest.raises(ValueError, match=wrong_shape):
        run_with_interventions(model, idx, {"blocks.0.hook_resid_pre": lambda x: torch.zeros(1, 2)})
    assert _hook_count(model) == 0
    with pytest.raises(ValueError, match="layer 2 is outside 0..1"):
        ablate_head(model, idx, 2, 0)
    with pytest.raises(ValueError, match="head 4 is outside 0..3"):
        ablate_head(model, idx, 0, 4)


@pytest.mark.parametrize("layer,head", [(0, 0), (1, 3)])
def test_head_ablation_equals_zeroing_that_heads_out_proj_columns(layer, head):
    model = _model(norm_first=True)
    idx = _ids(model)
    ablated = ablate_head(model, idx, layer, head)
    d = model.config.d_head
    with torch.no_grad():
        model.blocks[layer].attention.out_proj.weight[:, head * d:(head + 1) * d] = 0.0
    expected = model(idx)
    torch.testing.assert_close(ablated, expected)
    assert not torch.allclose(ablated, _model(norm_first=True)(idx))


def test_replacing_an_activation_changes_the_logits_downstream_only():
    model = _model()
    idx = _ids(model)
    clean = model(idx)
    uniform = torch.ones(3, 4, 12, 12).tril() / torch.arange(1, 13).view(12, 1)
    patched = run_with_interventions(
        model, idx, {"blocks.1.attention.hook_pattern": replace_with(uniform)})
    assert not torch.allclose(patched, clean)
    _, cache = run_with_cache(model, idx, ["blocks.1.attention.hook_pattern"])
    assert not torch.allclose(cache["blocks.1.attention.hook_pattern"], uniform)
    # Zeroing no head is the identity.
    same = run_with_interventions(model, idx, {"blocks.0.attention.hook_z": zero_heads()})
    assert torch.equal(same, clean)


def test_head_importance_is_the_loss_rise_of_each_ablation():
    model = _model()
    idx = _ids(model)
    targets = _ids(model, seed=2)
    base, rise = head_importance(model, idx, targets)
    assert rise.shape == (2, 4)
    assert base == pytest.approx(next_token_loss(model(idx), targets).item())
    expected = next_token_loss(ablate_head(model, idx, 1, 2), targets).item() - base
    assert rise[1, 2].item() == pytest.approx(expected, abs=1e-6)
    assert rise.abs().max() > 0


def _stub_pattern(kind, b=2, h=1, t=8):
    if kind == "previous-token":
        pattern = torch.eye(t).roll(-1, dims=1).tril()
        pattern[0, 0] = 1.0
    elif kind == "first-token":
        pattern = torch.zeros(t, t)
        pattern[:, 0] = 1.0
    elif kind == "self":
        pattern = torch.eye(t)
    else:
        pattern = torch.ones(t, t).tril() / torch.arange(1, t + 1).view(t, 1)
    return pattern.expand(b, h, t, t)


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_pattern_scores_are_one_for_a_perfect_head_of_each_kind(kind):
    scores = pattern_scores(_stub_pattern(kind))[0].tolist()
    assert scores == [1.0 if k == kind else 0.0 for k in HEAD_KINDS]


def test_classify_heads_labels_planted_heads():
    model = _model()
    idx = _ids(model, t=10)
    planted = torch.stack([_stub_pattern(k, b=3, t=10)[:, 0] for k in (*HEAD_KINDS, "uniform")], 1)

    # An outer hook replaces the layer-0 pattern; the cache hook registered later sees the plant.
    with hooks(model, {"blocks.0.attention.hook_pattern": replace_with(planted)}):
        heads = classify_heads(model, idx)
    layer0 = [s for s in heads if s.layer == 0]
    assert [s.kind for s in layer0] == [*HEAD_KINDS, "mixed"]
    assert layer0[0].previous_token == 1.0 and layer0[1].first_token == 1.0
    assert layer0[2].self_token == 1.0
    assert len(heads) == 8


def test_eval_windows_are_shifted_by_one_and_deterministic():
    ids = list(range(100))
    x, y = eval_windows(ids, max_seq=8, n_windows=4)
    assert x.shape == y.shape == (4, 8)
    assert torch.equal(y[:, :-1], x[:, 1:])
    assert x[0, 0] == 0 and x[-1, 0] == 88
    with pytest.raises(ValueError, match="at least 9 are needed"):
        eval_windows([1, 2, 3], max_seq=8, n_windows=1)


def test_pattern_scores_need_three_tokens():
    with pytest.raises(ValueError, match="at least 3 tokens, got 2"):
        pattern_scores(torch.ones(1, 1, 2, 2))


def test_loss_ends_average_the_first_and_last_tenth():
    from tinygpt.inspection import loss_ends

    assert loss_ends([float(i) for i in range(20)]) == (0.5, 18.5, 2)
    assert loss_ends([3.0, 2.0, 1.0]) == (3.0, 1.0, 1)  # fewer than ten steps: one each
    assert loss_ends([4.0, 2.0, 2.0, 0.0], parts=2) == (3.0, 1.0, 2)
    with pytest.raises(ValueError, match="no losses"):
        loss_ends([])
