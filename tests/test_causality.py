"""No position sees its future, in the hand-written model and the reference, and the checks that
say so catch the seed's two classic mask bugs.

Each leak check is a function that *measures* a leak (0.0 means none), so the same function is
asserted zero on correct models and nonzero on deliberately broken ones.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import (
    FORWARD_TOL,
    MODEL_EXAMPLES,
    VARIANT_MODEL_EXAMPLES,
    model_cases,
    model_pair,
    variant_model_cases,
    with_examples,
)

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


def logits_and_embedding_leaf(model, idx: torch.Tensor, **kwargs):
    """Logits `(b t v)` and the token embedding `(b t (h d))` they were computed from, made a
    leaf tensor by a forward hook so gradients can be taken with respect to it."""
    leaves = []

    def make_leaf(module, args, output):
        leaf = output.detach().requires_grad_()
        leaves.append(leaf)
        return leaf

    handle = model.embedding.register_forward_hook(make_leaf)
    try:
        logits = model(idx, **kwargs)
    finally:
        handle.remove()
    (embedding,) = leaves
    return logits, embedding


def gradient_leak(model, idx: torch.Tensor) -> tuple[float, float]:
    """Gradients of the logits at each position t wrt the input embeddings (token + position,
    made a leaf by a hook) at every position: (largest |grad| after t, smallest total |grad| at or
    before t). The first must be exactly 0; the second > 0 shows the hook saw the real input."""
    logits, embedding = logits_and_embedding_leaf(model, idx)
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


# ----------------------------------------------------------- every mask: what may a position see?

def visible(case) -> torch.Tensor:
    """`(b i j)` bool: may the logits at i depend on the token at j? Written from the definitions,
    not from tinygpt: one layer lets i see j when j <= i, within the window, in the same document,
    or both inside the prefix; a stack of L layers composes that relation L times (a window grows
    by window - 1 positions per layer; causal, document and prefix masks do not grow)."""
    t, config = case.t, case.config
    i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
    layer = (j <= i).repeat(case.batch, 1, 1)
    kwargs = case.forward_kwargs()
    if config.window is not None:
        layer &= i - j < config.window
    if "document_ids" in kwargs:
        ids = kwargs["document_ids"]
        layer &= ids[:, :, None] == ids[:, None, :]
    if "prefix_len" in kwargs:
        prefix = kwargs["prefix_len"][:, None, None]
        layer |= (i < prefix) & (j < prefix)
    reach = layer
    for _ in range(config.n_layers - 1):
        reach = (reach.double() @ layer.double()) > 0
    return reach


def variant_model(case):
    from tinygpt import TinyDecoderModel

    torch.manual_seed(case.seed)
    return TinyDecoderModel(case.config).to(case.dtype)


def dependence(model, idx, **kwargs) -> torch.Tensor:
    """`(b i j)`: sum over features of |d logits[b, i] / d token embedding[b, j]| (made a leaf by
    a hook, so learned positions, added after it, are part of the model)."""
    logits, embedding = logits_and_embedding_leaf(model, idx, **kwargs)
    rows = []
    for position in range(idx.shape[1]):
        (grad,) = torch.autograd.grad(logits[:, position].sum(), embedding, retain_graph=True)
        rows.append(grad.abs().nan_to_num(math.inf).sum(dim=-1))  # b j
    return torch.stack(rows, dim=1)


def hidden_perturbation_leak(model, case, position: int) -> float:
    """Change, in every row, each token the logits at `position` may not see; measure how far
    those logits moved (0.0 only if bit-identical; NaN counts as a leak)."""
    idx, vocab = case.tokens(), case.config.vocab_size
    hidden = ~visible(case)[:, position]  # b j
    generator = torch.Generator().manual_seed(case.seed + 7)
    shifted = (idx + torch.randint(1, vocab, idx.shape, generator=generator)) % vocab
    perturbed = torch.where(hidden, shifted, idx)
    kwargs = case.forward_kwargs()
    before = model(idx, **kwargs)[:, position]
    after = model(perturbed, **kwargs)[:, position]
    if torch.equal(before, after):
        return 0.0
    return (before - after).abs().nan_to_num(math.inf).max().item()


def gradient_leak_and_reach(model, case) -> tuple[float, float]:
    """(largest dependence on a token the position may not see, smallest on one it sees)."""
    seen = visible(case)
    dep = dependence(model, case.tokens(), **case.forward_kwargs())
    leak = dep[~seen].max().item() if (~seen).any() else 0.0
    return leak, dep[seen].min().item()


@settings(max_examples=100)
@given(case=variant_model_cases(), train=st.booleans(), p=st.integers(0, 63))
@with_examples(VARIANT_MODEL_EXAMPLES, train=False, p=0)
@with_examples(VARIANT_MODEL_EXAMPLES, train=True, p=5)
def test_no_variant_lets_a_position_see_a_token_it_may_not(case, train, p):
    """Every variant (window, documents, prefix; learned, ALiBi, RoPE or no positions; grouped
    heads): changing every token a position may not see leaves its logits bit-identical."""
    model = variant_model(case).train(train)
    with torch.inference_mode(not train):
        assert torch.isfinite(model(case.tokens(), **case.forward_kwargs())).all()
        assert hidden_perturbation_leak(model, case, p % case.t) == 0.0


@settings(max_examples=60)
@given(case=variant_model_cases(dtypes=(torch.float64,), min_d_model=2, max_seq=16))
@with_examples(VARIANT_MODEL_EXAMPLES)
def test_variant_jacobian_is_exactly_zero_where_hidden_and_nonzero_where_seen(case):
    """d logits[i] / d embedding[j] is exactly 0 for every j that i may not see, and nonzero
    for every j it may: inside a prefix that includes later prefix tokens, and with a window it
    includes the positions earlier layers bring in from beyond the last layer's window."""
    leak, reach = gradient_leak_and_reach(variant_model(case), case)
    assert leak == 0.0
    assert reach > 0.0


def test_a_prefix_is_seen_both_ways():
    """Not vacuous: inside a prefix, position 0 depends on the last prefix token."""
    case = next(c for c in VARIANT_MODEL_EXAMPLES if c.prefix_len == (8, 0, 3))
    dep = dependence(variant_model(case), case.tokens(), **case.forward_kwargs())
    assert dep[0, 0, 7] > 0 and dep[2, 0, 2] > 0
    assert dep[1, 0, 1:].eq(0).all() and dep[2, 0, 3:].eq(0).all()


# ------------------------------------------------------- the variant checks have teeth, too

class _DocumentBoundaryOffByOne:
    """Planted bug: the document mask reads each label one position late, so the first token of
    every document after the first still sees the document before it."""

    def _attention_mask(self, t, past, x, document_ids, prefix_len):
        late = torch.cat([document_ids[:, :1], document_ids[:, :-1]], dim=1)
        return super()._attention_mask(t, past, x, late, prefix_len)


def planted(case, bug: str):
    """A model with one planted mask bug; the leak checks judge it against `case`'s own mask."""
    from tinygpt import TinyDecoderModel

    torch.manual_seed(case.seed)
    if bug == "window-off-by-one":  # sees window + 1 keys
        config = replace(case.config, window=case.config.window + 1)
        return TinyDecoderModel(config).to(case.dtype)
    if bug == "document-boundary":
        leaky = type("LeakyDocuments", (_DocumentBoundaryOffByOne, TinyDecoderModel), {})
        return leaky(case.config).to(case.dtype)
    assert bug == "alibi-wrong-sign"
    model = TinyDecoderModel(case.config).to(case.dtype)
    model.alibi_slopes.neg_()  # +m |i - j|: far keys favoured
    return model


WINDOW_CASE = VARIANT_MODEL_EXAMPLES[1]  # window 2, three layers
DOCUMENT_CASE = VARIANT_MODEL_EXAMPLES[3]  # documents at 0, 3, 5
ALIBI_CASE = VARIANT_MODEL_EXAMPLES[0]


@pytest.mark.parametrize("bug, case", [("window-off-by-one", WINDOW_CASE),
                                       ("document-boundary", DOCUMENT_CASE)])
def test_variant_leak_checks_catch_planted_mask_bugs(bug, case):
    """Both checks report the leak: the perturbation moves some position's logits, and the
    Jacobian is nonzero on a token that position may not see."""
    model = planted(case, bug)
    assert max(hidden_perturbation_leak(model, case, p) for p in range(case.t)) > 0.0
    leak, _ = gradient_leak_and_reach(model, case)
    assert leak > 0.0


def test_document_boundary_bug_leaks_exactly_into_each_first_token():
    """The planted document bug is what it claims: only the first token of each later document
    depends on tokens it may not see."""
    model, case = planted(DOCUMENT_CASE, "document-boundary"), DOCUMENT_CASE
    dep = dependence(model, case.tokens(), **case.forward_kwargs())
    leaking = (dep * ~visible(case)).sum(dim=-1) > 0  # b i
    assert leaking[:, [3, 5]].all() and leaking.sum() == 2 * case.batch


def test_alibi_with_the_wrong_sign_is_not_a_leak():
    """A wrong-sign ALiBi favours far keys but still sees only what it may: the leak checks
    rightly pass it. The oracles catch it (test_variants: MHA, FlexAttention and ALiBi's
    distance profile)."""
    model = planted(ALIBI_CASE, "alibi-wrong-sign")
    assert hidden_perturbation_leak(model, ALIBI_CASE, ALIBI_CASE.t - 1) == 0.0
    assert gradient_leak_and_reach(model, ALIBI_CASE)[0] == 0.0
