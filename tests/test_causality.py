"""No position sees its future, in the hand-written model and the reference, and the checks that
say so catch the seed's two classic mask bugs.

Each leak check is a function that *measures* a leak (0.0 means none), so the same function is
asserted zero on correct models and nonzero on deliberately broken ones.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import FORWARD_TOL, MODEL_EXAMPLES, model_cases, model_pair, with_examples

BUILDS = ("hand", "reference", "reference-bool")


def perturbation_leak(model, idx: torch.Tensor, position: int, seed: int) -> float:
    """Change every token after `position` and measure how far the logits at positions <=
    `position` moved: 0.0 only if they are bit-identical (NaN counts as a leak)."""
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(seed)
    shift = torch.randint(1, vocab, idx.shape, generator=generator)
    perturbed = idx.clone()
    perturbed[:, position + 1:] = (idx[:, position + 1:] + shift[:, position + 1:]) % vocab
    before, after = model(idx)[:, : position + 1], model(perturbed)[:, : position + 1]
    if torch.equal(before, after):
        return 0.0
    return (before - after).abs().nan_to_num(math.inf).max().item()


def gradient_leak(model, idx: torch.Tensor) -> tuple[float, float]:
    """Gradients of the logits at each position t wrt the input embeddings (token + position,
    made a leaf by a hook) at every position: (largest |grad| after t, smallest total |grad| at or
    before t). The first must be exactly 0; the second > 0 shows the hook saw the real input."""
    leaves = []

    def make_leaf(module, args, output):
        leaf = output.detach().requires_grad_()
        leaves.append(leaf)
        return leaf

    handle = model.embedding.register_forward_hook(make_leaf)
    try:
        logits = model(idx)  # b t v
    finally:
        handle.remove()
    (embedding,) = leaves
    t = idx.shape[1]
    future, past = 0.0, math.inf
    for position in range(t):
        (grad,) = torch.autograd.grad(logits[:, position].sum(), embedding, retain_graph=True)
        grad = grad.abs().nan_to_num(math.inf)  # b t (h d)
        if position + 1 < t:
            future = max(future, grad[:, position + 1:].max().item())
        past = min(past, grad[:, : position + 1].sum().item())
    return future, past


def build(case, which: str):
    hand, reference = model_pair(
        case.config, case.dtype, case.seed, bool_mask=which.endswith("bool")
    )
    return hand if which == "hand" else reference


@settings(max_examples=150)
@given(case=model_cases(), which=st.sampled_from(BUILDS), train=st.booleans(), p=st.integers(0, 63))
@with_examples(MODEL_EXAMPLES, which="hand", train=False, p=0)
@with_examples(MODEL_EXAMPLES, which="reference-bool", train=False, p=5)
def test_future_tokens_leave_past_logits_bit_identical(case, which, train, p):
    """Changing any tokens after p leaves the logits at <= p bit-identical (torch.equal), in both
    builds, training mode (dropout 0) or eval under inference_mode (MHA's fast path when the
    reference has its boolean mask and an even number of heads)."""
    model = build(case, which).train(train)
    idx = case.tokens()
    position = p % case.t
    with torch.inference_mode(not train):
        assert torch.isfinite(model(idx)).all()
        assert perturbation_leak(model, idx, position, case.seed) == 0.0


@settings(max_examples=75)
@given(
    case=model_cases(dtypes=(torch.float64,), min_d_model=2, max_seq=32),
    which=st.sampled_from(BUILDS),
)
@with_examples([c for c in MODEL_EXAMPLES if c.dtype == torch.float64], which="reference")
def test_gradient_wrt_future_embeddings_is_exactly_zero(case, which):
    """d logits[:, t] / d embedding[:, s] is exactly 0 for every s > t, and nonzero before."""
    future, past = gradient_leak(build(case, which), case.tokens())
    assert future == 0.0
    assert past > 0.0


def test_prefix_logits_match_full_run():
    """Running only the first p tokens gives the full run's first p logits (not bitwise: the
    shapes differ, so do the kernels' reduction orders)."""
    for case in MODEL_EXAMPLES:
        for model in model_pair(case.config, case.dtype, case.seed):
            idx = case.tokens()
            full = model(idx)
            for p in sorted({1, (case.t + 1) // 2, case.t}):
                torch.testing.assert_close(
                    model(idx[:, :p]), full[:, :p], **FORWARD_TOL[case.dtype]
                )


# ------------------------------------------------------------------------- the checks have teeth

NAIVE_MASKS = {
    # Bug A: True = *blocked* for nn.MultiheadAttention, so this blocks the past and opens the
    # future.
    "tril-bool": lambda n: torch.tril(torch.ones(n, n)).bool(),
    # Bug B: a float mask is *added* to the scores: +1 where allowed, nothing blocked.
    "tril-float": lambda n: torch.tril(torch.ones(n, n)),
}


def leaky_reference(case, bug: str):
    _, reference = model_pair(case.config, case.dtype, case.seed)
    reference.causal_mask = NAIVE_MASKS[bug](case.config.max_seq)
    return reference


LEAKY_CASES = [c for c in MODEL_EXAMPLES if c.t >= 4]


@pytest.mark.parametrize("bug", NAIVE_MASKS)
@pytest.mark.parametrize("case", LEAKY_CASES, ids=lambda c: f"{c.config.n_heads}h-t{c.t}-{c.dtype}")
def test_leak_checks_catch_the_seeds_naive_masks(case, bug):
    """Both leak checks, unchanged, report a leak on a reference built with a naive mask."""
    model = leaky_reference(case, bug)
    idx = case.tokens()
    assert perturbation_leak(model, idx, 0, case.seed) > 0.0
    future, _ = gradient_leak(model, idx)
    assert future > 0.0


@given(case=model_cases(min_t=2, min_d_model=4), bug=st.sampled_from(sorted(NAIVE_MASKS)))
def test_leak_checks_catch_naive_masks_in_every_drawn_config(case, bug):
    """For any config and length >= 2, position 0 sees the future through either naive mask."""
    model = leaky_reference(case, bug)
    assert perturbation_leak(model, case.tokens(), 0, case.seed) > 0.0


def test_leak_checks_catch_a_hand_written_model_without_its_mask():
    """The hand-written model with its causal buffer zeroed (full attention) is caught too."""
    case = MODEL_EXAMPLES[0]
    hand, _ = model_pair(case.config, case.dtype, case.seed)
    hand.causal_mask = torch.zeros_like(hand.causal_mask)
    idx = case.tokens()[:, :8]
    assert perturbation_leak(hand, idx, 3, case.seed) > 0.0
    assert gradient_leak(hand, idx)[0] > 0.0
