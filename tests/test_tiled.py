"""The tiled attention (FlashAttention by hand) is the dense attention, in linear memory.

Oracles: `scaled_dot_product` (the dense hand-written core) and `nn.MultiheadAttention` with
identity projections, both given a dense float mask built here from positions, with no code of
`tinygpt.tiled`; the log-sum-exp against `torch.logsumexp` of the dense masked scores.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import pytest
import torch
from einops import rearrange
from hypothesis import example, given, settings
from hypothesis import strategies as st
from test_causality import gradient_leak, perturbation_leak
from torch import nn
from torch.profiler import ProfilerActivity, profile

import tinygpt.tiled as tiled_module
from benchmarks.harness import peak_memory
from tinygpt import ModelConfig, MultiHeadAttention, TinyDecoderModel, next_token_loss
from tinygpt.attention import scaled_dot_product
from tinygpt.cli import main as cli_main
from tinygpt.generate import generate
from tinygpt.inspection import hook_names, run_with_cache
from tinygpt.tiled import TileDropout, TileMask, tile_plan, tiled_attention, tiles

# fp64: forward (and log-sum-exp) rtol = atol = 1e-10, gradients rtol 1e-8 / atol 1e-9.
# fp32: 1e-5 for both; the tiled sums are reordered, so bitwise equality is not expected.
FORWARD_TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10),
               torch.float32: dict(rtol=1e-5, atol=1e-5)}
GRAD_TOL = {torch.float64: dict(rtol=1e-8, atol=1e-9), torch.float32: dict(rtol=1e-5, atol=1e-5)}


@dataclass(frozen=True)
class Case:
    """One drawn call: sizes, tile sizes, a mask description (as plain values) and a seed."""

    batch: int
    heads: int
    n_queries: int
    n_keys: int
    d_head: int
    query_tile: int
    key_tile: int
    causal: bool
    window: int | None
    padding: bool
    documents: bool
    bias: str | None  # None, "tensor" (random, some -inf) or "alibi" (a callable)
    dtype: torch.dtype
    seed: int

    @property
    def query_offset(self) -> int:
        return self.n_keys - self.n_queries  # the queries are the last positions (a cache)

    def tensors(self):
        """q `(b h i d)`, k, v `(b h j d)`, grad_out `(b h i d)`, grad_lse `(b h i)`, is_pad
        `(b j)`, document_ids `(b j)` and a bias tensor `(b h i j)`, all drawn from the seed."""
        g = torch.Generator().manual_seed(self.seed)
        b, h, i, j, d = self.batch, self.heads, self.n_queries, self.n_keys, self.d_head
        randn = lambda *shape: torch.randn(*shape, generator=g, dtype=self.dtype)  # noqa: E731
        q, k, v, grad_out, grad_lse = randn(b, h, i, d), randn(b, h, j, d), randn(b, h, j, d), \
            randn(b, h, i, d), randn(b, h, i)
        is_pad = torch.rand(b, j, generator=g) < 0.3
        document_ids = torch.randint(0, 3, (b, j), generator=g).sort(dim=-1).values
        bias = randn(b, h, i, j).masked_fill(torch.rand(b, h, i, j, generator=g) < 0.2, -math.inf)
        return q, k, v, grad_out, grad_lse, is_pad, document_ids, bias


def alibi(heads: int, dtype):
    """ALiBi's bias as a callable: -slope_h x (query position - key position), `(h i j)`."""
    slopes = rearrange(2.0 ** -torch.arange(1, heads + 1, dtype=dtype), "h -> h 1 1")
    return lambda query, key: -slopes * (rearrange(query, "i -> i 1") - key).to(dtype)


def tile_mask(case: Case, is_pad, document_ids, bias) -> TileMask:
    chosen = {None: None, "tensor": bias, "alibi": alibi(case.heads, case.dtype)}[case.bias]
    return TileMask(causal=case.causal, window=case.window, query_offset=case.query_offset,
                    is_pad=is_pad if case.padding else None,
                    document_ids=document_ids if case.documents else None, bias=chosen)


def dense_mask(case: Case, is_pad, document_ids, bias) -> torch.Tensor:
    """The oracle's additive mask `(b h i j)`, element by element from positions."""
    b, h, i, j = case.batch, case.heads, case.n_queries, case.n_keys
    query = torch.arange(i) + case.query_offset
    key = torch.arange(j)
    behind = query[:, None] - key[None, :]  # i j: how far the key is behind the query
    blocked = torch.zeros(b, h, i, j, dtype=torch.bool)
    if case.causal:
        blocked |= behind < 0
    if case.window is not None:
        blocked |= behind >= case.window
    if case.padding:
        blocked |= is_pad[:, None, None, :]
    if case.documents:
        query_ids = document_ids[:, case.query_offset:]
        blocked |= query_ids[:, None, :, None] != document_ids[:, None, None, :]
    mask = torch.zeros(b, h, i, j, dtype=case.dtype).masked_fill(blocked, -math.inf)
    if case.bias == "tensor":
        mask = mask + bias
    elif case.bias == "alibi":
        slopes = 2.0 ** -torch.arange(1, h + 1, dtype=case.dtype)
        mask = mask - slopes[:, None, None] * behind.to(case.dtype)
    return mask


def oracle_lse(q, k, mask):
    """log-sum-exp of each row's masked scores `(b h i)`: -inf (with a zero gradient) for a row
    with no visible key, whose torch.logsumexp gradient would be NaN."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + mask
    empty = torch.isneginf(mask).all(dim=-1)
    lse = torch.logsumexp(scores.masked_fill(empty[..., None], 0.0), dim=-1)
    return lse.masked_fill(empty, -math.inf)


def mha_core(q, k, v, mask):
    """nn.MultiheadAttention with identity projections: its core alone, on `(b h i d)` tensors,
    given the float mask as `((b h) i j)`."""
    b, h, _, d = q.shape
    e = h * d
    mha = nn.MultiheadAttention(e, h, batch_first=True).to(q.dtype)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.eye(e, dtype=q.dtype).repeat(3, 1))
        mha.in_proj_bias.zero_()
        mha.out_proj.weight.copy_(torch.eye(e, dtype=q.dtype))
        mha.out_proj.bias.zero_()
    merge = lambda x: rearrange(x, "b h t d -> b t (h d)")  # noqa: E731
    out, _ = mha(merge(q), merge(k), merge(v), attn_mask=rearrange(mask, "b h i j -> (b h) i j"),
                 need_weights=False)
    return rearrange(out, "b t (h d) -> b h t d", h=h)


@st.composite
def cases(draw, dtypes=(torch.float64, torch.float32)) -> Case:
    n_queries = draw(st.integers(1, 24))
    n_keys = n_queries + draw(st.sampled_from([0, 0, 1, 7]))
    return Case(
        batch=draw(st.integers(1, 3)), heads=draw(st.integers(1, 3)), n_queries=n_queries,
        n_keys=n_keys, d_head=draw(st.integers(1, 6)),
        query_tile=draw(st.sampled_from([1, 2, 3, 4, 5, 8, 16, 32])),
        key_tile=draw(st.sampled_from([2, 3, 4, 7, 8, 16, 32])),
        causal=draw(st.booleans()), window=draw(st.none() | st.integers(1, 9)),
        padding=draw(st.booleans()), documents=draw(st.booleans()),
        bias=draw(st.sampled_from([None, "tensor", "alibi"])),
        dtype=draw(st.sampled_from(dtypes)), seed=draw(st.integers(0, 2**32 - 1)))


SMALL = Case(2, 2, 9, 9, 3, 4, 4, True, None, False, False, None, torch.float64, 0)
EVERYTHING = Case(3, 3, 13, 20, 4, 5, 3, True, 6, True, True, "tensor", torch.float64, 1)
ONE_TOKEN = Case(1, 2, 1, 1, 4, 128, 128, True, None, False, False, None, torch.float64, 2)
DECODE = Case(2, 3, 1, 23, 4, 1, 4, True, None, True, False, "alibi", torch.float32, 3)


def run_both(case: Case):
    """(tiled, dense, mha) each as (out, lse or None, grads of q, k, v) for one case."""
    q, k, v, grad_out, grad_lse, is_pad, document_ids, bias = case.tensors()
    mask = dense_mask(case, is_pad, document_ids, bias)
    results = []
    for name in ("tiled", "dense", "mha"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        if name == "tiled":
            out, lse = tiled_attention(*leaves, tile_mask(case, is_pad, document_ids, bias),
                                       query_tile=case.query_tile, key_tile=case.key_tile)
        elif name == "dense":
            out, lse = scaled_dot_product(*leaves, mask)[0], oracle_lse(*leaves[:2], mask)
        else:
            out, lse = mha_core(*leaves, mask), None
        loss = (out * grad_out).sum()
        if lse is not None:
            loss = loss + (lse.masked_fill(torch.isneginf(lse), 0.0) * grad_lse).sum()
        grads = torch.autograd.grad(loss, leaves)
        results.append((out.detach(), None if lse is None else lse.detach(), grads))
    return results


@given(case=cases())
@example(case=SMALL)
@example(case=EVERYTHING)
@example(case=ONE_TOKEN)
@example(case=DECODE)
def test_tiled_equals_dense_and_mha(case):
    """Output, log-sum-exp and the gradients of q, k, v (of a loss using both outputs) equal the
    dense core's; output and gradients (of the output alone) equal nn.MultiheadAttention's.

    Drawn: lengths 1..24 with 0, 1 or 7 cached keys, tiles of 1..32 (multiples or not, larger
    than the sequence or not), causal, window, padding, documents, a tensor bias with -inf
    entries or an ALiBi callable, in every combination; fully masked rows arise from all but
    causal."""
    (out, lse, grads), (dense_out, dense_lse, dense_grads), (mha_out, _, _) = run_both(case)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    torch.testing.assert_close(out, dense_out, **FORWARD_TOL[case.dtype])
    torch.testing.assert_close(out, mha_out, **FORWARD_TOL[case.dtype])
    torch.testing.assert_close(lse, dense_lse, **FORWARD_TOL[case.dtype])
    for got, want in zip(grads, dense_grads):
        torch.testing.assert_close(got, want, **GRAD_TOL[case.dtype])


@settings(max_examples=25)
@given(case=cases())
def test_tiled_gradients_equal_mha(case):
    """Gradients of the output alone against nn.MultiheadAttention (which has no log-sum-exp)."""
    q, k, v, grad_out, _, is_pad, document_ids, bias = case.tensors()
    mask = dense_mask(case, is_pad, document_ids, bias)
    grads = {}
    for name in ("tiled", "mha"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = (tiled_attention(*leaves, tile_mask(case, is_pad, document_ids, bias),
                               query_tile=case.query_tile, key_tile=case.key_tile)[0]
               if name == "tiled" else mha_core(*leaves, mask))
        grads[name] = torch.autograd.grad((out * grad_out).sum(), leaves)
    for got, want in zip(grads["tiled"], grads["mha"]):
        torch.testing.assert_close(got, want, **GRAD_TOL[case.dtype])


def test_fully_masked_rows_give_zero_output_and_finite_zero_gradients():
    """A query whose keys are all padding, or all in another document, or all -inf in the bias,
    outputs 0 with lse -inf; its q gets a zero gradient, every gradient is finite."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 6, 3, generator=g, dtype=torch.float64).requires_grad_()
               for _ in range(3))
    is_pad = torch.zeros(2, 6, dtype=torch.bool)
    is_pad[0] = True  # batch row 0: no key at all
    bias = torch.zeros(2, 2, 6, 6, dtype=torch.float64)
    bias[1, 1, 4] = -math.inf  # batch 1, head 1, query 4: every key blocked
    out, lse = tiled_attention(q, k, v, TileMask(causal=True, is_pad=is_pad, bias=bias),
                               query_tile=4, key_tile=4)
    assert (out[0] == 0).all() and (out[1, 1, 4] == 0).all()
    assert torch.isneginf(lse[0]).all() and torch.isneginf(lse[1, 1, 4])
    assert torch.isfinite(lse[1, 0]).all()
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert (q.grad[0] == 0).all() and (q.grad[1, 1, 4] == 0).all()


def test_gradcheck_of_output_and_log_sum_exp():
    """Every derivative of out and lse wrt q, k, v against finite differences (fp64), across
    three query tiles, three key tiles, a cache offset and padding."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, 2, 7, 3, generator=g, dtype=torch.float64, requires_grad=True)
            for _ in range(2))
    is_pad = torch.tensor([[True, False, False, False, False, False, False]])
    mask = TileMask(causal=True, query_offset=2, is_pad=is_pad)
    assert torch.autograd.gradcheck(
        lambda q, k, v: tiled_attention(q, k, v, mask, query_tile=2, key_tile=3), (q, k, v))


def test_gradgradcheck_second_derivatives():
    """The backward is itself differentiable (plain torch operations on saved q, k, v, out and
    lse), so second derivatives match finite differences too (fast mode keeps it short)."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, 6, 3, generator=g, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    mask = TileMask(causal=True, window=4)
    f = lambda q, k, v: tiled_attention(q, k, v, mask, query_tile=4, key_tile=3)  # noqa: E731
    assert torch.autograd.gradgradcheck(f, (q, k, v), fast_mode=True)


# ------------------------------------------------------------------ the structure, from ints

@st.composite
def structures(draw):
    """A structural mask and one tile of it: causal, window, documents, a cache offset."""
    n_queries, extra = draw(st.integers(1, 20)), draw(st.integers(0, 6))
    n_keys = n_queries + extra
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    ids = torch.randint(0, 4, (2, n_keys), generator=g).sort(dim=-1).values
    mask = TileMask(causal=draw(st.booleans()), window=draw(st.none() | st.integers(1, 8)),
                    query_offset=extra, document_ids=ids if draw(st.booleans()) else None)
    r0 = draw(st.integers(0, n_queries - 1))
    c0 = draw(st.integers(0, n_keys - 1))
    rows = range(r0, draw(st.integers(r0 + 1, n_queries)))
    cols = range(c0, draw(st.integers(c0 + 1, n_keys)))
    return mask, n_queries, n_keys, rows, cols


@settings(max_examples=200)
@given(drawn=structures())
def test_is_blocked_and_is_open_are_exact(drawn):
    """From ints alone, `is_blocked` says the whole tile is -inf in the mask and `is_open` says
    none of it is: exactly what the dense tile says (not merely on the safe side)."""
    mask, n_queries, n_keys, rows, cols = drawn
    dense = mask.dense(n_queries, n_keys, dtype=torch.float64)
    blocked = torch.zeros(1, 1, n_queries, n_keys, dtype=torch.bool) if dense is None \
        else torch.isneginf(dense)
    part = blocked[..., rows.start:rows.stop, cols.start:cols.stop]
    assert mask.is_blocked(rows, cols) == bool(part.all())
    assert mask.is_open(rows, cols) == (not bool(part.any()))


def count_tiles(mask: TileMask, n: int, tile: int) -> int:
    """How many tiles a forward pass really computes: the bias is called once per computed tile."""
    calls = []

    def zero_bias(query, key):
        calls.append((int(query[0]), int(key[0])))
        return torch.zeros(len(query), len(key))

    counted = TileMask(causal=mask.causal, window=mask.window, document_ids=mask.document_ids,
                       bias=zero_bias)
    q = torch.randn(1, 1, n, 4)
    with torch.no_grad():
        tiled_attention(q, q, q, counted, query_tile=tile, key_tile=tile)
    assert len(set(calls)) == len(calls)  # no tile twice
    return len(calls)


def blocked_tiles(mask: TileMask, n: int, tile: int) -> int:
    """The oracle: tiles whose dense mask is -inf everywhere, looked at element by element."""
    dense = torch.isneginf(mask.dense(n, n))
    return sum(bool(dense[..., r.start:r.stop, c.start:c.stop].all())
               for r in tiles(n, tile) for c in tiles(n, tile))


def test_causal_tiles_above_the_diagonal_are_skipped():
    """64 positions in tiles of 8: 8 x 8 tiles, of which the 28 above the diagonal are skipped
    and 36 (half plus the diagonal) computed."""
    mask = TileMask(causal=True)
    assert count_tiles(mask, 64, 8) == 36 == 64 - blocked_tiles(mask, 64, 8)
    assert sum(len(cols) for _, cols in tile_plan(64, 64, mask, query_tile=8, key_tile=8)) == 36


def test_window_and_document_tiles_are_skipped():
    """A causal window of 16 keys over 64 positions in tiles of 8 computes only the band: each
    row of tiles its diagonal tile and the two before it (3 x 8 - 3 = 21 tiles, not 64); four
    packed documents of 16 keep only the tiles inside a document (4 x 3 = 12)."""
    window = TileMask(causal=True, window=16)
    assert count_tiles(window, 64, 8) == 21 == 64 - blocked_tiles(window, 64, 8)
    ids = torch.arange(64).div(16, rounding_mode="floor").unsqueeze(0)
    documents = TileMask(causal=True, document_ids=ids)
    assert count_tiles(documents, 64, 8) == 12 == 64 - blocked_tiles(documents, 64, 8)


# ------------------------------------------------------------------------------------ memory

def largest_allocation(fn) -> int:
    """The largest single block torch's CPU allocator handed out while `fn()` ran (the
    allocation events of the profiler's event tree, as `benchmarks.harness.peak_memory` reads)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    allocation = torch._C._profiler._EventType.Allocation
    events, largest = list(prof.profiler.kineto_results.experimental_event_tree()), 0
    while events:
        event = events.pop()
        if event.tag == allocation:
            largest = max(largest, event.extra_fields.alloc_size)
        events.extend(event.children)
    return largest


def fwd_bwd(run, n: int):
    """forward + backward of `run(q, k, v)` at n positions (1 head of width 16, fp32)."""
    g = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(1, 1, n, 16, generator=g).requires_grad_() for _ in range(3))
    return lambda: run(q, k, v).sum().backward()


def tiled_run(tile):
    return lambda q, k, v: tiled_attention(q, k, v, TileMask(causal=True), query_tile=tile,
                                           key_tile=tile)[0]


def dense_run(q, k, v):
    n = q.shape[2]
    mask = torch.ones(n, n, dtype=torch.bool).triu(1)
    return scaled_dot_product(q, k, v, torch.zeros(n, n).masked_fill(mask, -math.inf))[0]


def test_memory_grows_linearly_and_no_i_by_j_tensor_is_allocated():
    """Peak memory of forward + backward above the start (the profiler's allocation log, as the
    benchmarks measure it): doubling the context from 512 to 1,024 at most doubles the tiled
    path's (plus 128 KiB for a few 64 x 64 tiles) while the dense path's quadruples; and no
    single allocation of the tiled path is as large as one i x j matrix."""
    cpu = torch.device("cpu")
    tiled = [peak_memory(fwd_bwd(tiled_run(64), n), cpu) for n in (512, 1024)]
    dense = [peak_memory(fwd_bwd(dense_run, n), cpu) for n in (512, 1024)]
    assert tiled[1] <= 2 * tiled[0] + 128 * 1024, tiled
    assert dense[1] >= 3.5 * dense[0], dense
    assert tiled[1] < dense[1] / 8
    assert largest_allocation(fwd_bwd(tiled_run(64), 1024)) < 1024 * 1024 * 4


def test_memory_checks_catch_tiles_as_large_as_the_sequence():
    """The same measurement has teeth: with one tile covering all i x j the peak quadruples
    and the largest allocation is a whole i x j matrix."""
    cpu = torch.device("cpu")
    whole = [peak_memory(fwd_bwd(tiled_run(n), n), cpu) for n in (512, 1024)]
    assert whole[1] > 2 * whole[0] + 128 * 1024
    assert largest_allocation(fwd_bwd(tiled_run(1024), 1024)) >= 1024 * 1024 * 4


# ------------------------------------------------------------------------- inside the model

def model_twins(dtype=torch.float64, **overrides):
    """(dense, tiled) models of the same config and weights (shakespeare-cpu's shape, smaller)."""
    sizes = dict(vocab_size=23, d_model=24, n_heads=3, n_layers=2, d_ff=32, max_seq=40)
    config = ModelConfig.preset("shakespeare-cpu", **{**sizes, **overrides})
    torch.manual_seed(0)
    dense = TinyDecoderModel(config).to(dtype).eval()
    tiled = TinyDecoderModel(dataclasses.replace(config, attention_impl="tiled")).to(dtype).eval()
    tiled.load_state_dict(dense.state_dict(), strict=True)
    return dense, tiled


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 4 x 4 inside the model, so a 40-token window spans many tiles."""
    monkeypatch.setattr(tiled_module, "QUERY_TILE", 4)
    monkeypatch.setattr(tiled_module, "KEY_TILE", 4)


def test_config_chooses_the_core_and_names_a_bad_choice():
    assert ModelConfig().attention_impl == "dense"
    assert ModelConfig(attention_impl="tiled").attention_impl == "tiled"
    with pytest.raises(ValueError, match="^attention_impl must be one of dense, tiled, got 'fl"):
        ModelConfig(attention_impl="flash")
    with pytest.raises(ValueError, match="impl must be one of dense, tiled"):
        MultiHeadAttention(8, 2, impl="flash")


def test_command_line_takes_attention_impl(capsys):
    """`--attention-impl` is one of the CLI's model options; a bad value is one line, exit 2."""
    assert cli_main(["summary", "--config", "seed", "--attention-impl", "tiled"]) == 0
    assert "20,712" in capsys.readouterr().out
    assert cli_main(["summary", "--config", "seed", "--attention-impl", "flash"]) == 2
    assert capsys.readouterr().err.strip().endswith("got 'flash'.")


@pytest.mark.parametrize("masks", ["float attn_mask, bool padding", "bool attn_mask, float padding",
                                   "TileMask with padding, bool padding"])
def test_module_takes_mha_style_masks(masks, small_tiles):
    """`MultiHeadAttention(impl="tiled")` accepts what the dense module accepts (an `(i j)`
    mask and a `(b j)` key padding mask, each boolean or additive) and a TileMask, whose own
    padding joins the key padding mask; outputs equal the dense module's (fp64)."""
    torch.manual_seed(0)
    dense = MultiHeadAttention(12, 3).double()
    tiled = MultiHeadAttention(12, 3, impl="tiled").double()
    tiled.load_state_dict(dense.state_dict(), strict=True)
    x = torch.randn(2, 11, 12, dtype=torch.float64)
    is_future = torch.ones(11, 11, dtype=torch.bool).triu(1)
    first_pad, second_pad = torch.zeros(2, 2, 11, dtype=torch.bool).unbind(0)
    first_pad[0, :3], second_pad[1, 5] = True, True
    additive = lambda m: torch.zeros(m.shape, dtype=torch.float64).masked_fill(m, -math.inf)  # noqa: E731
    if masks == "float attn_mask, bool padding":
        given = (additive(is_future), first_pad)
    elif masks == "bool attn_mask, float padding":
        given = (is_future, additive(first_pad))
    else:
        given = (TileMask(causal=True, is_pad=second_pad), first_pad)
    want = dense(x, attn_mask=additive(is_future), key_padding_mask=first_pad | (
        second_pad if isinstance(given[0], TileMask) else torch.zeros_like(first_pad)))[0]
    got = tiled(x, attn_mask=given[0], key_padding_mask=given[1])[0]
    torch.testing.assert_close(got, want, **FORWARD_TOL[torch.float64])


def test_tiled_model_equals_dense_model(small_tiles):
    """Logits and every parameter's gradient (fp64), on 37 tokens in tiles of 4; then a
    prefill of 30 and one-token decode steps against the cache, each equal to the full run."""
    dense, tiled = model_twins()
    idx = torch.randint(23, (2, 37), generator=torch.Generator().manual_seed(0))
    targets = torch.randint(23, (2, 37), generator=torch.Generator().manual_seed(1))
    grads = []
    for model in (dense, tiled):
        logits = model(idx)
        loss = next_token_loss(logits, targets)
        grads.append((logits.detach(), torch.autograd.grad(loss, list(model.parameters()))))
    torch.testing.assert_close(grads[1][0], grads[0][0], **FORWARD_TOL[torch.float64])
    for got, want in zip(grads[1][1], grads[0][1]):
        torch.testing.assert_close(got, want, **GRAD_TOL[torch.float64])
    with torch.no_grad():
        cache = tiled.new_cache()
        steps = [tiled(idx[:, :30], cache=cache)]
        steps += [tiled(idx[:, p:p + 1], cache=cache) for p in range(30, 37)]
    torch.testing.assert_close(torch.cat(steps, dim=1), grads[0][0], **FORWARD_TOL[torch.float64])


def test_training_follows_the_dense_loss_curve(small_tiles):
    """30 AdamW steps (fp32, tiles of 4 over 40 tokens) from the same weights and batches: the
    tiled model's losses stay within fp32 noise (1e-4 relative) of the dense model's."""
    losses = []
    for model in model_twins(torch.float32):
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        batches = torch.Generator().manual_seed(0)
        curve = []
        for _ in range(30):
            rows = torch.randint(23, (4, 41), generator=batches)
            loss = next_token_loss(model(rows[:, :-1]), rows[:, 1:])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            curve.append(loss.item())
        losses.append(torch.tensor(curve))
    dense, tiled = losses
    assert dense[-1] < dense[0] - 0.1  # it learned something
    torch.testing.assert_close(tiled, dense, rtol=1e-4, atol=0)


def test_decoding_one_query_against_a_long_cache():
    """One query against 1,000 cached keys in tiles of 64, split over the keys and combined
    through the log-sum-exp: the dense core's output and log-sum-exp."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 1, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 3, 1000, 8, generator=g, dtype=torch.float64) for _ in range(2))
    out, lse = tiled_attention(q, k, v, TileMask(causal=True, query_offset=999), key_tile=64)
    dense_out, _ = scaled_dot_product(q, k, v)
    torch.testing.assert_close(out, dense_out, **FORWARD_TOL[torch.float64])
    scores = q @ k.transpose(-1, -2) / math.sqrt(8)
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1), **FORWARD_TOL[torch.float64])


def test_greedy_generation_equals_the_dense_path(small_tiles):
    """Greedy decoding of prompts of different lengths (left padding, so a key padding mask)
    gives the same tokens with either core."""
    dense, tiled = model_twins(torch.float32)
    prompts = [torch.tensor([1, 2, 3, 4, 5, 6, 7]), torch.tensor([9, 8])]
    want = generate(dense, prompts, 20, do_sample=False)
    got = generate(tiled, prompts, 20, do_sample=False)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_tiled_model_compiles_as_one_graph(monkeypatch):
    """torch.compile(fullgraph=True) traces the tiled model whole (the tile loops unroll, the
    structure is Python ints) and gives the eager logits; one layer, 13 tokens in tiles of 8."""
    monkeypatch.setattr(tiled_module, "QUERY_TILE", 8)
    monkeypatch.setattr(tiled_module, "KEY_TILE", 8)
    _, tiled = model_twins(torch.float32, n_layers=1)
    idx = torch.randint(23, (2, 13), generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(tiled, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(idx), tiled(idx), rtol=0, atol=0)


def test_hooks_of_the_weights_do_not_exist_and_asking_is_an_error():
    """The tiled model has every hook point but scores, masked scores and pattern; asking for
    those, or for the weights, is a one-sentence ValueError."""
    dense, tiled = model_twins(torch.float32)
    missing = {f"blocks.{n}.attention.hook_{name}" for n in range(2)
               for name in ("scores", "masked_scores", "pattern")}
    assert set(hook_names(dense)) - set(hook_names(tiled)) == missing
    idx = torch.randint(23, (1, 9), generator=torch.Generator().manual_seed(0))
    _, cache = run_with_cache(tiled, idx)
    assert set(cache) == set(hook_names(tiled))
    with pytest.raises(ValueError, match=r"^'blocks.0.attention.hook_pattern' does not exist: the "
                                         r"tiled attention never forms the scores or the pattern"):
        run_with_cache(tiled, idx, names=["blocks.0.attention.hook_pattern"])
    x = torch.randn(1, 9, 24)
    with pytest.raises(ValueError, match=r"^the tiled attention never forms the \(b h i j\) "):
        tiled.blocks[0].attention(x, need_weights=True)


def test_tiled_model_does_not_leak_the_future(small_tiles):
    """The causality suite's two leak checks on the tiled model (tiles of 4): changing the
    tokens after p leaves logits at <= p bit-identical, and future gradients are exactly 0."""
    _, tiled = model_twins()
    idx = torch.randint(23, (2, 37), generator=torch.Generator().manual_seed(2))
    for position in (0, 3, 4, 17, 35):
        assert perturbation_leak(tiled, idx, position, seed=position) == 0.0
    future, past = gradient_leak(tiled, idx[:, :13])
    assert future == 0.0 and past > 0.0


def test_leak_checks_catch_a_tile_boundary_off_by_one(small_tiles, monkeypatch):
    """Planted bug: `is_open` judges the causal corner by the tile's *last* query instead of
    its first, so each diagonal tile is taken as fully visible and its mask is left out. Both
    leak checks report it."""
    def wrong_corner(self, rows, cols):
        return not self.causal or cols.stop - 1 <= rows.stop - 1 + self.query_offset

    monkeypatch.setattr(TileMask, "is_open", wrong_corner)
    _, tiled = model_twins()
    idx = torch.randint(23, (2, 37), generator=torch.Generator().manual_seed(2))
    assert perturbation_leak(tiled, idx, 0, seed=0) > 0.0
    assert gradient_leak(tiled, idx[:, :13])[0] > 0.0


# ----------------------------------------------------------------------------------- dropout

def dropped_weights(p: float, seed: int | None, n: int = 40, tile: int = 8):
    """With v the identity (d = j), out is the dropped weight matrix itself `(b h i j)`; also
    the undropped weights of the same scores, from the dense core."""
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 2, n, 4, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.eye(n, dtype=torch.float64).expand(2, 2, n, n)
    out, _ = tiled_attention(q, k, v, TileMask(causal=True), query_tile=tile, key_tile=tile,
                             dropout_p=p, dropout_seed=seed)
    _, weights = scaled_dot_product(q, k, v, dense_mask(
        Case(2, 2, n, n, 4, tile, tile, True, None, False, False, None, torch.float64, 0),
        None, None, None))
    return out, weights


def test_dropout_drops_weights_after_the_softmax_and_rescales_the_rest():
    """Every weight is either dropped (0) or its undropped value / (1 - p); about p of the
    visible ones are dropped; a seed repeats the draw and another seed changes it."""
    out, weights = dropped_weights(0.5, seed=7)
    visible = weights > 0
    kept = out != 0
    torch.testing.assert_close(out[kept], weights[kept] / 0.5, **FORWARD_TOL[torch.float64])
    assert (out[~visible] == 0).all()
    assert 0.4 < 1 - kept[visible].double().mean() < 0.6
    assert torch.equal(dropped_weights(0.5, seed=7)[0], out)
    assert not torch.equal(dropped_weights(0.5, seed=8)[0], out)
    torch.testing.assert_close(dropped_weights(0.0, seed=None)[0], weights)


def test_each_tile_draws_its_own_keep_mask():
    """Tiles differ from each other (no pattern repeated along a row or a column of tiles), and
    the same tile and seed always give the same mask."""
    dropout = TileDropout(0.5, seed=3)
    draw = lambda rows, cols: dropout.keep(rows, cols, (2, 2, 8, 8), device="cpu",  # noqa: E731
                                           dtype=torch.float32)
    first = draw(range(0, 8), range(0, 8))
    assert torch.equal(first, draw(range(0, 8), range(0, 8)))
    for rows, cols in ((range(0, 8), range(8, 16)), (range(8, 16), range(0, 8))):
        assert not torch.equal(first, draw(rows, cols))
    assert set(first.unique().tolist()) == {0.0, 2.0}


def test_dropout_backward_redraws_the_same_tiles():
    """gradcheck with dropout (fixed seed): the backward's tile masks are the forward's."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 7, 3, generator=g, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    assert torch.autograd.gradcheck(
        lambda q, k, v: tiled_attention(q, k, v, TileMask(causal=True), query_tile=3,
                                        key_tile=2, dropout_p=0.3, dropout_seed=11), (q, k, v))


def test_model_dropout_only_in_training():
    """A tiled model with dropout: two training calls differ, eval calls equal the dense twin."""
    dense, tiled = model_twins(torch.float64, dropout=0.2)
    idx = torch.randint(23, (2, 9), generator=torch.Generator().manual_seed(0))
    tiled.train()
    assert not torch.equal(tiled(idx), tiled(idx))
    tiled.eval()
    torch.testing.assert_close(tiled(idx), dense(idx), **FORWARD_TOL[torch.float64])


# ------------------------------------------------------------------------------------ errors

@pytest.mark.parametrize("build, message", [
    (lambda: TileMask(window=0), "window must be a positive number of keys"),
    (lambda: TileMask(query_offset=-1), "query_offset must be >= 0"),
    (lambda: TileMask(is_pad=torch.zeros(1, 3)), "is_pad must be boolean"),
    (lambda: TileMask(bias=torch.zeros(3, 3, requires_grad=True)), "treats bias as a constant"),
    (lambda: TileMask(document_ids=torch.tensor([[1, 0]])), "must be non-decreasing"),
])
def test_bad_masks_are_one_sentence_errors(build, message):
    with pytest.raises((ValueError, TypeError), match=message):
        build()


def test_bad_calls_are_one_sentence_errors():
    q = torch.randn(1, 2, 4, 3)
    with pytest.raises(ValueError, match="expected q"):
        tiled_attention(q, q[:, :, :, :2], q)
    with pytest.raises(ValueError, match="tile sizes must be positive"):
        tiled_attention(q, q, q, query_tile=0)
    with pytest.raises(ValueError, match=r"is_pad has shape \(1, 3\)"):
        tiled_attention(q, q, q, TileMask(is_pad=torch.zeros(1, 3, dtype=torch.bool)))
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\)"):
        tiled_attention(q, q, q, dropout_p=1.0)
    with pytest.raises(ValueError, match="run past"):
        tiled_attention(q, q, q, TileMask(query_offset=1, document_ids=torch.zeros(1, 4)))


def test_asking_a_tiled_model_for_its_pattern_says_why_and_the_dense_twin_answers(
        tmp_path, capsys):
    """The tiled core never forms the pattern: asking for it names the reason, and `heads` /
    `inspect` read the dense twin (same weights, same logits) instead, with a note."""
    from tinygpt.checkpoint import save_checkpoint
    from tinygpt.inspection import dense_twin
    from tinygpt.tokenizer import CharTokenizer

    torch.manual_seed(0)
    model = TinyDecoderModel(ModelConfig(vocab_size=12, attention_impl="tiled")).eval()
    idx = torch.randint(12, (1, 9))
    with pytest.raises(ValueError, match="tiled attention never forms the scores or the pattern"):
        run_with_cache(model, idx, ["blocks.0.attention.hook_pattern"])
    twin = dense_twin(model)
    assert twin.config.attention_impl == "dense" and model.config.attention_impl == "tiled"
    logits, cache = run_with_cache(twin, idx, ["blocks.1.attention.hook_pattern"])
    torch.testing.assert_close(logits, model(idx), rtol=1e-5, atol=1e-5)
    assert cache["blocks.1.attention.hook_pattern"].shape == (1, 4, 9, 9)
    tokenizer = CharTokenizer.from_text("abcdefghijk")
    save_checkpoint(tmp_path / "run", model=model, tokenizer=tokenizer, step=1)
    assert cli_main(["inspect", "--checkpoint", str(tmp_path / "run"), "--prompt", "abcab",
                     "--out", str(tmp_path / "grid.png"), "--device", "cpu"]) == 0
    assert "dense twin" in capsys.readouterr().err and (tmp_path / "grid.png").stat().st_size
