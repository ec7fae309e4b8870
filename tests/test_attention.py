"""The hand-written attention on its own: shapes, weights, the fully masked row, dropout,
gradcheck."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from strategies import ATTENTION_EXAMPLES, FORWARD_TOL, attention_cases, with_examples
from torch.func import functional_call

from tinygpt import MultiHeadAttention, causal_mask, scaled_dot_product


def module_and_input(case, dropout: float = 0.0):
    torch.manual_seed(case.seed)
    module = MultiHeadAttention(case.d_model, case.n_heads, dropout).to(case.dtype)
    x = torch.randn(case.batch, case.t, case.d_model, generator=case.generator(), dtype=case.dtype)
    return module, x


@given(case=attention_cases())
@with_examples(ATTENTION_EXAMPLES)
def test_shapes_and_causal_weights(case):
    """out `(b t (h d))`; weights `(b h i j)` per head or `(b i j)` averaged, each a causal
    distribution: rows sum to 1 and everything above the diagonal is exactly 0."""
    module, x = module_and_input(case)
    mask = causal_mask(case.t).to(case.dtype)
    out, none = module(x, attn_mask=mask)
    assert out.shape == x.shape and none is None
    _, per_head = module(x, attn_mask=mask, need_weights=True, average_attn_weights=False)
    _, averaged = module(x, attn_mask=mask, need_weights=True)
    assert per_head.shape == (case.batch, case.n_heads, case.t, case.t)
    assert averaged.shape == (case.batch, case.t, case.t)
    torch.testing.assert_close(averaged, per_head.mean(dim=1))
    for weights in (per_head, averaged):
        assert torch.isfinite(weights).all() and (weights >= 0).all()
        torch.testing.assert_close(weights.sum(-1), torch.ones_like(weights.sum(-1)))
        assert (weights.triu(1) == 0).all()


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
@pytest.mark.parametrize("need_weights", (False, True))
def test_fully_masked_row_is_zero_and_has_finite_gradients(dtype, need_weights):
    """A query with no visible key (all its keys padding, or a -inf row in attn_mask) gets zero
    weights and outputs `out_proj.bias`, never NaN; every gradient stays finite and the other
    rows are what they are without the masked row."""
    case = ATTENTION_EXAMPLES[0]
    module, x = module_and_input(case)
    module = module.to(dtype)
    x = x.to(dtype).requires_grad_()
    is_pad = torch.zeros(case.batch, case.t, dtype=torch.bool)
    is_pad[0] = True
    attn_mask = causal_mask(case.t).to(dtype)
    attn_mask[3] = float("-inf")
    out, weights = module(
        x,
        attn_mask=attn_mask,
        key_padding_mask=is_pad,
        need_weights=need_weights,
        average_attn_weights=False,
    )
    assert not out.isnan().any()
    bias = module.out_proj.bias.detach()
    torch.testing.assert_close(out[0].detach(), bias.expand(case.t, -1))
    torch.testing.assert_close(out[1:, 3].detach(), bias.expand(case.batch - 1, -1))
    if need_weights:
        assert (weights[0] == 0).all() and (weights[:, :, 3] == 0).all()
    (out * torch.randn_like(out)).sum().backward()
    for name, param in module.named_parameters():
        assert torch.isfinite(param.grad).all(), name
    assert torch.isfinite(x.grad).all()
    unmasked, _ = module(x[1:], attn_mask=causal_mask(case.t).to(dtype))
    rows = [r for r in range(case.t) if r != 3]
    torch.testing.assert_close(out[1:, rows], unmasked[:, rows], **FORWARD_TOL[dtype])


def test_scaled_dot_product_fully_masked_row_directly():
    """The pure function's rule: a row of -inf masks gives zero weights and zero output."""
    q, k, v = torch.randn(3, 1, 2, 4, 5, dtype=torch.float64).unbind(0)
    mask = torch.zeros(4, 4, dtype=torch.float64)
    mask[1] = float("-inf")
    out, weights = scaled_dot_product(q, k, v, mask)
    assert (weights[:, :, 1] == 0).all() and (out[:, :, 1] == 0).all()
    assert torch.isfinite(out).all()
    torch.testing.assert_close(weights[:, :, 0].sum(-1), torch.ones(1, 2, dtype=torch.float64))


def test_dropout_acts_on_the_weights_only_in_training():
    """Training: two calls differ and every weight is 0 or its undropped value / (1 - p).
    Eval: the dropout rate is ignored and calls are identical to a dropout-free twin."""
    case = ATTENTION_EXAMPLES[0]
    module, x = module_and_input(case, dropout=0.5)
    plain = MultiHeadAttention(case.d_model, case.n_heads).to(case.dtype)
    plain.load_state_dict(module.state_dict())
    mask = causal_mask(case.t).to(case.dtype)
    kwargs = dict(attn_mask=mask, need_weights=True, average_attn_weights=False)
    _, clean = plain(x, **kwargs)
    torch.manual_seed(0)
    first, dropped = module(x, **kwargs)
    second, _ = module(x, **kwargs)
    assert not torch.equal(first, second)
    kept = dropped != 0
    assert 0 < kept[clean != 0].float().mean() < 1
    torch.testing.assert_close(dropped[kept], clean[kept] / 0.5)
    module.eval()
    assert torch.equal(module(x, **kwargs)[0], module(x, **kwargs)[0])
    torch.testing.assert_close(module(x, **kwargs)[0], plain(x, **kwargs)[0], rtol=0, atol=0)


def attention_function(d_model: int, n_heads: int, t: int):
    """(f, inputs): the attention with a causal and a padding mask as a pure function of the
    input and every parameter, for autograd's numerical checks (float64)."""
    torch.manual_seed(0)
    module = MultiHeadAttention(d_model, n_heads).double()
    names = [name for name, _ in module.named_parameters()]
    x = torch.randn(2, t, d_model, dtype=torch.float64, requires_grad=True)
    params = [p.detach().clone().requires_grad_() for p in module.parameters()]
    is_pad = torch.zeros(2, t, dtype=torch.bool)
    is_pad[0, -1] = True
    mask = causal_mask(t).double()

    def attention(x, *params):
        return functional_call(
            module,
            dict(zip(names, params)),
            (x,),
            dict(
                attn_mask=mask,
                key_padding_mask=is_pad,
                need_weights=True,
                average_attn_weights=False,
            ),
        )

    return attention, (x, *params)


def test_gradcheck_full_jacobian_at_the_smallest_split():
    """Every entry of d(out, per-head weights) wrt the input and every parameter against finite
    differences, at the smallest size with a real head split (E=4, H=2, T=3)."""
    assert torch.autograd.gradcheck(*attention_function(4, 2, 3))


def test_gradcheck_and_gradgradcheck_in_fast_mode():
    """First and second derivatives at E=8, H=2, T=5 in gradcheck's fast mode (random
    projections of the Jacobian), which keeps them to about a second."""
    f, inputs = attention_function(8, 2, 5)
    assert torch.autograd.gradcheck(f, inputs, fast_mode=True)
    assert torch.autograd.gradgradcheck(f, inputs, fast_mode=True)


@given(d_model=st.integers(2, 64), n_heads=st.integers(2, 16))
def test_heads_must_divide_d_model(d_model, n_heads):
    if d_model % n_heads:
        message = rf"d_model \({d_model}\) must be divisible by n_heads \({n_heads}\)"
        with pytest.raises(ValueError, match=message):
            MultiHeadAttention(d_model, n_heads)
    else:
        assert MultiHeadAttention(d_model, n_heads).n_heads == n_heads
