"""Property tests of the additive mask builders in `tinygpt.attention`."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from strategies import seeds
from torch import nn

from tinygpt import MultiHeadAttention, additive_mask, causal_mask, combine_masks, padding_mask

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
    """True (blocked, MHA's convention) -> -inf, False -> 0, in the requested dtype; no other value."""
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
    assert torch.equal(hand(x, attn_mask=is_future)[0], hand(x, attn_mask=additive_mask(is_future))[0])
    assert torch.equal(reference(x, x, x, attn_mask=is_future)[0],
                       reference(x, x, x, attn_mask=additive_mask(is_future))[0])


@given(n=lengths)
def test_tril_boolean_mask_read_as_blocked_is_the_opposite_of_causal(n):
    """The docstring's first trap, as a fact: `tril(ones).bool()` read with True = blocked blocks
    the past and the diagonal and opens exactly the future."""
    naive = additive_mask(torch.tril(torch.ones(n, n)).bool())
    assert torch.equal(is_blocked(naive), ~is_blocked(causal_mask(n)))
