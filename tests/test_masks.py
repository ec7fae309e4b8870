"""Property tests of the mask builders in `tinygpt.masks` (re-exported by `tinygpt.attention`)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from strategies import seeds
from torch import nn

from tinygpt import (
    MultiHeadAttention,
    additive_mask,
    causal_mask,
    combine_masks,
    masks,
    padding_mask,
)

lengths = st.integers(1, 64)


def is_blocked(mask: torch.Tensor) -> torch.Tensor:
    """The boolean reading of an additive mask, after checking it holds only 0 and -inf."""
    assert mask.is_floating_point()
    assert (torch.isneginf(mask) | (mask == 0)).all(), "an additive mask holds only 0 and -inf"
    return torch.isneginf(mask)


@given(n=lengths)
def test_causal_mask_blocks_exactly_the_future(n):
    mask = causal_mask(n)
    assert mask.shape == (n, n) and mask.dtype == torch.float32
    i, j = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    assert torch.equal(is_blocked(mask), j > i)


@given(n=lengths)
def test_causal_mask_equals_torch_generate_square_subsequent_mask(n):
    assert torch.equal(causal_mask(n), nn.Transformer.generate_square_subsequent_mask(n))


@given(n_queries=st.integers(1, 32), extra=st.integers(0, 32))
def test_causal_mask_for_the_last_queries_of_a_longer_context(n_queries, extra):
    """With n_keys > n_queries, query i is absolute position i + n_keys - n_queries: the mask is
    the last n_queries rows of the square mask, and the newest query sees every key."""
    n_keys = n_queries + extra
    mask = causal_mask(n_queries, n_keys)
    assert mask.shape == (n_queries, n_keys)
    assert torch.equal(mask, causal_mask(n_keys)[extra:])
    i, j = torch.meshgrid(torch.arange(n_queries), torch.arange(n_keys), indexing="ij")
    assert torch.equal(is_blocked(mask), j > i + extra)
    assert not is_blocked(mask)[-1].any()


@given(batch=st.integers(1, 4), n=lengths, seed=seeds)
def test_padding_mask_blocks_exactly_the_padded_keys(batch, n, seed):
    is_pad = torch.rand(batch, n, generator=torch.Generator().manual_seed(seed)) < 0.5
    mask = padding_mask(is_pad)
    assert mask.shape == (batch, 1, 1, n)
    assert torch.equal(is_blocked(mask)[:, 0, 0], is_pad)


@given(shape=st.lists(st.integers(1, 6), min_size=1, max_size=4), seed=seeds,
       dtype=st.sampled_from((torch.float32, torch.float64, torch.float16)))
def test_additive_mask_turns_true_into_minus_inf(shape, seed, dtype):
    """True (blocked, MHA's convention) -> -inf, False -> 0, in the requested dtype, and nothing
    else."""
    blocked = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < 0.5
    mask = additive_mask(blocked, dtype)
    assert mask.dtype == dtype and mask.shape == blocked.shape
    assert torch.equal(is_blocked(mask), blocked)


@pytest.mark.parametrize("not_bool", [torch.ones(3, 3), torch.ones(3, 3, dtype=torch.long),
                                      torch.tril(torch.ones(3, 3))])
def test_additive_mask_refuses_a_non_boolean_mask(not_bool):
    with pytest.raises(TypeError, match=f"expected a boolean mask.*{not_bool.dtype}"):
        additive_mask(not_bool)


@given(batch=st.integers(1, 4), n=st.integers(1, 32), seed=seeds)
def test_combine_masks_blocks_what_either_mask_blocks(batch, n, seed):
    is_pad = torch.rand(batch, n, generator=torch.Generator().manual_seed(seed)) < 0.5
    combined = combine_masks(causal_mask(n), padding_mask(is_pad))
    assert combined.shape == (batch, 1, n, n)
    i, j = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    expected = (j > i) | is_pad[:, None, None, :]
    assert torch.equal(is_blocked(combined), expected)
    assert torch.equal(combine_masks(None, padding_mask(is_pad), None, causal_mask(n)), combined)


def test_combine_masks_of_nothing_is_none_and_of_one_is_that_mask():
    assert combine_masks() is None and combine_masks(None, None) is None
    mask = causal_mask(5)
    assert torch.equal(combine_masks(None, mask), mask)


@given(n=st.integers(1, 16), seed=seeds)
def test_boolean_and_additive_masks_give_the_same_attention(n, seed):
    """A boolean mask (True = blocked) and its additive conversion are the same mask, for the
    hand-written attention and for nn.MultiheadAttention alike: bit-identical outputs."""
    torch.manual_seed(seed)
    is_future = torch.ones(n, n, dtype=torch.bool).triu(1)
    x = torch.randn(2, n, 8)
    hand = MultiHeadAttention(8, 2)
    reference = nn.MultiheadAttention(8, 2, batch_first=True)
    assert torch.equal(hand(x, attn_mask=is_future)[0],
                       hand(x, attn_mask=additive_mask(is_future))[0])
    assert torch.equal(reference(x, x, x, attn_mask=is_future)[0],
                       reference(x, x, x, attn_mask=additive_mask(is_future))[0])


@given(n=lengths)
def test_tril_boolean_mask_read_as_blocked_is_the_opposite_of_causal(n):
    """The docstring's first trap, as a fact: `tril(ones).bool()` read with True = blocked blocks
    the past and the diagonal and opens exactly the future."""
    naive = additive_mask(torch.tril(torch.ones(n, n)).bool())
    assert torch.equal(is_blocked(naive), ~is_blocked(causal_mask(n)))


# ------------------------------------------------------- builders over positions (tinygpt.masks)

def grid(q_pos: torch.Tensor, k_pos: torch.Tensor):
    """Query and key positions `(i j)`, for index predicates."""
    return torch.meshgrid(q_pos, k_pos, indexing="ij")


@given(n=st.integers(1, 40), window=st.integers(1, 48))
def test_sliding_window_sees_itself_and_the_window_minus_one_before(n, window):
    pos = masks.positions(n)
    i, j = grid(pos, pos)
    allowed = ~masks.sliding_window(pos, pos, window)
    assert torch.equal(allowed, (j <= i) & (j > i - window))
    assert torch.equal(allowed.sum(dim=1), torch.clamp(torch.arange(n) + 1, max=window))
    if window >= n:  # a window as long as the sequence is plain causal attention
        assert torch.equal(masks.sliding_window(pos, pos, window), masks.causal(pos, pos))


@given(n=st.integers(1, 24), data=st.data())
def test_prefix_lm_is_bidirectional_inside_the_prefix_and_causal_after(n, data):
    prefix = torch.tensor(data.draw(st.lists(st.integers(0, n), min_size=1, max_size=3)))
    pos = masks.positions(n)
    blocked = masks.prefix_lm(pos, pos, prefix)
    i, j = grid(pos, pos)
    for row, p in enumerate(prefix.tolist()):
        assert torch.equal(~blocked[row], (j <= i) | (j < p))
        if p <= 1:
            assert torch.equal(blocked[row], masks.causal(pos, pos))
        if p == n:
            assert not blocked[row].any()


@given(starts=st.lists(st.booleans(), min_size=1, max_size=30))
def test_document_mask_is_block_diagonal_causal(starts):
    ids = torch.tensor([0] + starts[1:]).cumsum(0)[None]  # b t
    pos = masks.positions(len(starts))
    blocked = masks.document(pos, pos, ids)[0]
    i, j = grid(pos, pos)
    assert torch.equal(~blocked, (j <= i) & (ids[0][i] == ids[0][j]))
    first = torch.tensor([True] + starts[1:])
    # Each document's first token sees only itself.
    assert torch.equal((~blocked).sum(dim=1)[first], torch.ones(int(first.sum()), dtype=torch.long))


@given(n=st.integers(1, 24), window=st.integers(1, 30), data=st.data())
def test_builders_over_the_last_queries_and_over_tiles_are_slices_of_the_full_mask(n, window, data):
    """The same builder serves a KV cache (queries are the last positions) and a tiled kernel
    (one block of queries against one block of keys): each is a slice of the full mask."""
    pos = masks.positions(n)
    ids = torch.tensor(data.draw(st.lists(st.integers(0, 2), min_size=n, max_size=n))).sort()[0]
    prefix = torch.tensor([data.draw(st.integers(0, n))])
    build = {
        "causal": lambda q, k: masks.causal(q, k),
        "window": lambda q, k: masks.sliding_window(q, k, window),
        "prefix": lambda q, k: masks.prefix_lm(q, k, prefix)[0],
        "document": lambda q, k: masks.document(q, k, ids[None])[0],
    }
    past = data.draw(st.integers(0, n - 1))
    q0, q1 = sorted(data.draw(st.tuples(st.integers(0, n), st.integers(0, n))))
    k0, k1 = sorted(data.draw(st.tuples(st.integers(0, n), st.integers(0, n))))
    for name, builder in build.items():
        full = builder(pos, pos)
        assert torch.equal(builder(masks.positions(n - past, past), pos), full[past:]), name
        tile = builder(masks.positions(q1 - q0, q0), masks.positions(k1 - k0, k0))
        assert torch.equal(tile, full[q0:q1, k0:k1]), name


@given(batch=st.integers(1, 3), n=st.integers(1, 16), seed=seeds)
def test_combinators_block_where_any_or_where_all_block(batch, n, seed):
    generator = torch.Generator().manual_seed(seed)
    a, b = (torch.rand(batch, n, n, generator=generator) < 0.5 for _ in range(2))
    pad = torch.rand(batch, n, generator=generator) < 0.5
    assert torch.equal(masks.blocked_by_any(a, b), a | b)
    assert torch.equal(masks.blocked_by_all(a, b), a & b)
    assert torch.equal(masks.blocked_by_any(a, masks.key_padding(pad)), a | pad[:, None, :])
    assert torch.equal(masks.blocked_by_any(a), a)


# The paper's slopes: 2^(-8k/n) for a power of two n; otherwise the nearest lower power of two's
# slopes, then every other slope of the next power of two (written out here by hand).
PAPER_SLOPES = {
    1: [2**-8],
    2: [2**-4, 2**-8],
    4: [2**-2, 2**-4, 2**-6, 2**-8],
    8: [2**-k for k in range(1, 9)],
    3: [2**-4, 2**-8] + [2**-2],
    6: [2**-2, 2**-4, 2**-6, 2**-8] + [2**-1, 2**-3],
    12: [2**-k for k in range(1, 9)] + [2**-0.5, 2**-1.5, 2**-2.5, 2**-3.5],
    16: [2 ** (-k / 2) for k in range(1, 17)],
}


@pytest.mark.parametrize("n_heads", sorted(PAPER_SLOPES))
def test_alibi_slopes_are_the_papers(n_heads):
    slopes = masks.alibi_slopes(n_heads)
    assert slopes.dtype == torch.float64
    torch.testing.assert_close(slopes, torch.tensor(PAPER_SLOPES[n_heads], dtype=torch.float64),
                               rtol=1e-15, atol=0)


@given(n_heads=st.integers(1, 16), n=st.integers(1, 16), past=st.integers(0, 8))
def test_alibi_bias_is_minus_slope_times_distance(n_heads, n, past):
    slopes = masks.alibi_slopes(n_heads)
    q_pos, k_pos = masks.positions(n, past), masks.positions(n + past)
    bias = masks.alibi_bias(slopes, q_pos, k_pos)
    i, j = grid(q_pos, k_pos)
    assert bias.shape == (n_heads, n, n + past)
    assert torch.equal(bias, -slopes[:, None, None] * (i - j).abs().double())
    assert (bias[:, torch.arange(n), torch.arange(n) + past] == 0).all()  # the query itself


def test_with_head_bias_pairs_batch_rows_with_rows_and_heads_with_heads():
    """A per-row mask `(b i j)` plus a per-head bias `(h i j)` is `(b h i j)`, not a broadcast
    that would read the batch axis as heads."""
    mask = torch.zeros(2, 3, 3).masked_fill(torch.eye(3, dtype=torch.bool), float("-inf"))
    mask[1] = 0.0
    bias = torch.arange(4.0)[:, None, None].expand(4, 3, 3)
    combined = masks.with_head_bias(mask, bias)
    assert combined.shape == (2, 4, 3, 3)
    for b in range(2):
        for h in range(4):
            assert torch.equal(combined[b, h], mask[b] + h)
    assert masks.with_head_bias(torch.zeros(3, 3), bias).shape == (1, 4, 3, 3)
