"""The KV cache is the same function as recomputation: step by step, across slides, ragged rows."""

from __future__ import annotations

import pytest
import torch
from gen_strategies import (
    TOLERANCE,
    build_model,
    dtypes,
    policies,
    random_prompt,
    seeds,
    small_configs,
)
from hypothesis import example, given, settings
from hypothesis import strategies as st

from reference import ReferenceDecoderModel, copy_weights
from tinygpt import ModelConfig, MultiHeadAttention, TinyDecoderModel, causal_mask
from tinygpt.attention import HookPoint, KVCache
from tinygpt.generate import generate, generate_steps
from tinygpt.model import check_positions

SEED_CONFIG = ModelConfig.preset("seed")


def steps(model, prompt, n, *, use_cache, policy, seed, **sampling):
    generator = torch.Generator().manual_seed(seed)
    return list(generate_steps(model, prompt, n, use_cache=use_cache, policy=policy,
                               generator=generator, **sampling))


@given(config=small_configs(), dtype=dtypes, policy=policies, seed=seeds,
       prompt_length=st.integers(1, 25))
@example(config=SEED_CONFIG, dtype=torch.float32, policy="exact", seed=0, prompt_length=1)
@example(config=SEED_CONFIG, dtype=torch.float64, policy="fast", seed=1, prompt_length=40)
@settings(max_examples=30)
def test_cached_generation_equals_recomputation(config, dtype, policy, seed, prompt_length):
    """Same logits at every step and same sampled tokens, over 3 x max_seq new
    tokens, so the window slides (and the cache is rebuilt) several times."""
    # fp32 keeps the default init: larger weights push its rounding past 1e-5.
    model = build_model(config, seed, dtype, spread=2.0 if dtype == torch.float64 else 1.0)
    prompt = random_prompt(prompt_length, config.vocab_size, seed)[None]
    n = 3 * config.max_seq + 2
    cached = steps(model, prompt, n, use_cache=True, policy=policy, seed=seed)
    recomputed = steps(model, prompt, n, use_cache=False, policy=policy, seed=seed)
    for k, (a, b) in enumerate(zip(cached, recomputed)):
        assert torch.equal(a.tokens, b.tokens), f"token {k} differs"
        torch.testing.assert_close(a.logits, b.logits, **TOLERANCE[dtype], msg=f"step {k}")
        assert torch.isfinite(a.logits).all()


def plain_context_start(length: int, start: int, max_seq: int, keep: int) -> int:
    """The slide rule written out once more, independently of `tinygpt.generate`."""
    if length - start > max_seq:
        start = length - keep
    return start


@pytest.mark.parametrize("policy, max_seq, keep", [("exact", 6, 6), ("fast", 6, 3), ("fast", 7, 3)])
def test_policies_follow_their_definitions(policy, max_seq, keep):
    """Exact: the model sees the last max_seq tokens. Fast: the context grows to max_seq, then is
    cut to its newest max_seq // 2. Checked against a plain forward of that context every step."""
    config = ModelConfig.preset("seed", vocab_size=9, max_seq=max_seq)
    model = build_model(config, seed=3, spread=2.0)
    prompt = random_prompt(4, 9, seed=3)[None]
    got = steps(model, prompt, 4 * max_seq, use_cache=True, policy=policy, seed=5)
    idx, start = prompt, 0
    starts = []
    for step in got:
        start = plain_context_start(idx.shape[1], start, max_seq, keep)
        starts.append(start)
        with torch.inference_mode():
            expected = model(idx[:, start:])[:, -1]
        torch.testing.assert_close(step.logits, expected, rtol=1e-10, atol=1e-10)
        idx = torch.cat([idx, step.tokens[:, None]], dim=1)
    assert len(set(starts)) > 2  # the context did slide, more than once


class PositionCounter:
    """Counts the positions the model embeds: the work a step does."""

    def __init__(self, model):
        self.counts = []
        model.embedding.register_forward_hook(lambda m, args, out: self.counts.append(out.shape[1]))


def test_cache_costs_one_position_per_step_until_the_window_slides():
    """Equality alone would not catch a cache that silently re-runs the window."""
    config = ModelConfig.preset("seed", max_seq=8)
    for policy, expected in [
        ("exact", [3, 1, 1, 1, 1, 1, 8, 8, 8, 8]),  # full window at 8 tokens, then re-prefill
        ("fast", [3, 1, 1, 1, 1, 1, 4, 1, 1, 1, 1, 4]),  # cut to 4 tokens, then 4 cheap steps
    ]:
        model = build_model(config, seed=0)
        counter = PositionCounter(model)
        generate(model, torch.tensor([[1, 2, 3]]), len(expected), policy=policy)
        assert counter.counts == expected, policy
        model = build_model(config, seed=0)
        counter = PositionCounter(model)
        generate(model, torch.tensor([[1, 2, 3]]), 6, policy=policy, use_cache=False)
        assert counter.counts == [3, 4, 5, 6, 7, 8]


@given(config=small_configs(max_seq=st.integers(2, 12)), seed=seeds, data=st.data())
@settings(max_examples=30)
def test_chunked_prefill_matches_full_forward_and_reference(config, seed, data):
    """Feeding a sequence through the cache in chunks gives the full forward's logits at every
    position, and those equal the nn.MultiheadAttention oracle's (fp64)."""
    model = build_model(config, seed, spread=2.0)
    idx = random_prompt(config.max_seq, config.vocab_size, seed)[None]
    cache, pieces, past = model.new_cache(), [], 0
    with torch.inference_mode():
        while past < config.max_seq:
            size = data.draw(st.integers(1, config.max_seq - past), label="chunk")
            pieces.append(model(idx[:, past:past + size], cache=cache))
            past += size
        full = model(idx)
        reference = ReferenceDecoderModel(config).double().eval()
        copy_weights(model, reference)
        oracle = reference(idx)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(full, oracle, rtol=1e-10, atol=1e-10)
    assert cache[0].length == config.max_seq


@given(seed=seeds, split=st.integers(1, 6), n_heads=st.sampled_from([1, 2, 3]))
def test_attention_with_cache_equals_full_causal_attention(seed, split, n_heads):
    """The attention alone: the last queries over cached + new keys, with the offset causal mask."""
    torch.manual_seed(seed)
    attention = MultiHeadAttention(4 * n_heads, n_heads).double().eval()
    x = torch.randn(2, 7, 4 * n_heads, dtype=torch.float64)
    full, _ = attention(x, attn_mask=causal_mask(7))
    cache = KVCache()
    first, _ = attention(x[:, :split], attn_mask=causal_mask(split), cache=cache)
    rest, _ = attention(x[:, split:], attn_mask=causal_mask(7 - split, 7), cache=cache)
    torch.testing.assert_close(torch.cat([first, rest], dim=1), full, rtol=1e-12, atol=1e-12)
    assert cache.length == 7


def test_forward_without_keywords_is_unchanged():
    model = build_model(SEED_CONFIG, seed=0, dtype=torch.float32)
    idx = random_prompt(32, 40, seed=0)[None]
    with torch.inference_mode():
        assert torch.equal(model(idx), model(idx, cache=None, positions=None,
                                             key_padding_mask=None))
        explicit = model(idx, positions=torch.arange(32)[None])
    assert torch.equal(model(idx).detach(), explicit)


def test_sliced_mask_is_the_offset_causal_mask():
    """The model slices rows past..past+t of its mask buffer: that is causal_mask(t, past + t)."""
    model = TinyDecoderModel(ModelConfig.preset("seed", max_seq=9))
    for past in range(9):
        for t in range(1, 10 - past):
            assert torch.equal(model.causal_mask[past:past + t, :past + t],
                               causal_mask(t, past + t))


def test_hooks_fire_in_cached_mode():
    model = build_model(ModelConfig.preset("seed", n_layers=2), seed=0)
    shapes = {}
    for name, module in model.named_modules():
        if isinstance(module, HookPoint):
            module.register_forward_hook(
                lambda m, args, out, name=name: shapes.setdefault(name, []).append(out.shape))
    cache = model.new_cache()
    with torch.inference_mode():
        model(torch.tensor([[1, 2, 3]]), cache=cache)
        model(torch.tensor([[4]]), cache=cache)
    hooks = [n for n, m in model.named_modules() if isinstance(m, HookPoint)]
    assert len(hooks) == 2 * (7 + 5) and set(shapes) == set(hooks)
    assert shapes["blocks.1.attention.hook_pattern"] == [(1, 4, 3, 3), (1, 4, 1, 4)]
    assert shapes["blocks.0.attention.hook_k"] == [(1, 4, 3, 8), (1, 4, 1, 8)]
    assert shapes["blocks.0.hook_resid_post"] == [(1, 3, 32), (1, 1, 32)]


@given(config=small_configs(), seed=seeds, policy=policies,
       lengths=st.lists(st.integers(1, 14), min_size=2, max_size=4))
@example(config=SEED_CONFIG, seed=0, policy="exact", lengths=[1, 40, 7])
@settings(max_examples=20)
def test_ragged_batch_equals_one_prompt_at_a_time(config, seed, policy, lengths):
    """Left padding, a key-padding mask and per-row positions and contexts."""
    model = build_model(config, seed, spread=2.0)
    prompts = [random_prompt(n, config.vocab_size, seed + k) for k, n in enumerate(lengths)]
    n = 2 * config.max_seq + 1
    alone = [list(generate_steps(model, p[None], n, do_sample=False, policy=policy))
             for p in prompts]
    for use_cache in (True, False):
        batch = list(generate_steps(model, prompts, n, do_sample=False, use_cache=use_cache,
                                    policy=policy))
        for r in range(len(prompts)):
            for k, (a, b) in enumerate(zip(batch, alone[r])):
                assert a.tokens[r] == b.tokens[0], f"row {r} token {k}"
                torch.testing.assert_close(a.logits[r], b.logits[0], rtol=1e-10, atol=1e-10)
    rows = generate(model, prompts, n, do_sample=False, policy=policy)
    assert [len(row) for row in rows] == [k + n for k in lengths]


def test_forward_rejects_bad_decoding_arguments():
    model = build_model(ModelConfig.preset("seed", max_seq=4), seed=0)
    cache = model.new_cache()
    model(torch.tensor([[1, 2, 3]]), cache=cache)
    with pytest.raises(ValueError, match="3 cached \\+ 2 new positions exceed max_seq=4"):
        model(torch.tensor([[1, 2]]), cache=cache)
    with pytest.raises(ValueError, match="cache has 1 layers, the model 2"):
        model(torch.tensor([[1]]), cache=cache[:1])
    with pytest.raises(ValueError, match="positions must lie in 0..3"):
        check_positions(torch.tensor([[0, 4]]), model.config)  # at the boundary, not in forward
    with pytest.raises(ValueError, match="positions \\(2,\\) must match idx \\(1, 2\\)"):
        model(torch.tensor([[1, 2]]), positions=torch.tensor([0, 1]))
