"""Circuit tools: head scores, activation patching, the logit lens, direct logit attribution and
composition scores between heads.

Everything runs the model through `tinygpt.inspection` (`run_with_cache`, `hooks`), so hooks live
only for one call. Matrices use the column convention of Elhage et al. (2021): a residual vector
`x` (length m = d_model = (h d)) is written to by `W x`, and a torch `Linear` holds that `W` as its
`weight`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import einsum, rearrange, repeat
from torch import Tensor

from tinygpt.induction import induction_pattern_scores, previous_token_pattern_scores
from tinygpt.inspection import hooks, run_with_cache
from tinygpt.model import TinyDecoderModel, check_token_ids
from tinygpt.pictures import display_token, save_figure

Metric = Callable[[Tensor], Tensor]  # logits (b t v) -> any tensor, e.g. a scalar


def _pattern_names(model: TinyDecoderModel) -> list[str]:
    return [f"blocks.{n}.attention.hook_pattern" for n in range(model.config.n_layers)]


@torch.no_grad()
def induction_scores(model: TinyDecoderModel, idx: Tensor) -> Tensor:
    """`(l h)` induction score of every head on `repeated_tokens` rows idx `(b t)`."""
    _, cache = run_with_cache(model, idx, _pattern_names(model))
    return torch.stack([induction_pattern_scores(p) for p in cache.values()]).float().cpu()


@torch.no_grad()
def previous_token_scores(model: TinyDecoderModel, idx: Tensor) -> Tensor:
    """`(l h)` mean attention of every head on the previous token over queries 1.. of idx (b t)."""
    _, cache = run_with_cache(model, idx, _pattern_names(model))
    return torch.stack([previous_token_pattern_scores(p) for p in cache.values()]).float().cpu()


@torch.no_grad()
def token_losses(model: TinyDecoderModel, idx: Tensor, targets: Tensor) -> Tensor:
    """`(t)` next-token loss at each position, averaged over the batch of idx, targets `(b t)`."""
    check_token_ids(idx, model.config)
    logits = model(idx)
    loss = F.cross_entropy(rearrange(logits, "b t v -> b v t"), targets, reduction="none")  # b t
    return loss.mean(dim=0).float().cpu()


def in_context_learning_score(losses: Tensor, early: int, late: int) -> float:
    """Loss at position `late` minus loss at position `early` (from `token_losses`): how much the
    model gains from the context between them (Olsson et al. 2022 use tokens 500 and 50)."""
    return float(losses[late] - losses[early])


# Activation patching ---------------------------------------------------------------------------

_RESIDUAL = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post")


def _patch_axis(name: str) -> str:
    """How `patch` slices an activation: per head (`hook_z`, b h t d), per position (the residual
    stream, b t (h d)) or whole."""
    if name.endswith("hook_z"):
        return "head"
    return "position" if name.endswith(_RESIDUAL) else "whole"


def patched_logits(model: TinyDecoderModel, corrupted: Tensor, name: str, clean_value: Tensor,
                   index: int | None = None) -> Tensor:
    """Logits `(b t v)` of the corrupted run with activation `name` taken from the clean run:
    all of it (`index` None) or only slice `index` along dim 1 (a head of `hook_z`, a position
    of the residual stream)."""

    def substitute(x: Tensor) -> Tensor:
        if index is None:
            return clean_value
        x = x.clone()
        x[:, index] = clean_value[:, index]
        return x

    with hooks(model, {name: substitute}):
        return model(corrupted)


@torch.no_grad()
def patch(model: TinyDecoderModel, clean: Tensor, corrupted: Tensor, names: Iterable[str],
          metric: Metric) -> Tensor:
    """Activation patching: run `corrupted` `(b t)` with one piece of one activation replaced by
    its value in the `clean` run (same shape), for every piece, and measure `metric(logits)`.

    Returns `(len(names), *grid, *metric shape)`, where the grid is `(h)` for `hook_z` (one head
    at a time), `(t)` for the residual stream (one position at a time) and empty for any other
    activation (all of it: the whole layer's output). All names must share one kind of grid.
    """
    names = list(names)
    if clean.shape != corrupted.shape:
        raise ValueError(f"clean {tuple(clean.shape)} and corrupted {tuple(corrupted.shape)} "
                         "prompts must have the same shape to patch position by position.")
    axes = {_patch_axis(name) for name in names}
    if len(axes) != 1:
        raise ValueError("patch one kind of activation at a time: hook_z (per head), the "
                         "residual stream (per position) or whole outputs, not a mix.")
    check_token_ids(corrupted, model.config)
    _, cache = run_with_cache(model, clean, names)
    rows = []
    for name in names:
        value = cache[name]
        indices = [None] if axes == {"whole"} else range(value.shape[1])
        rows.append(torch.stack([metric(patched_logits(model, corrupted, name, value, index))
                                 for index in indices]))
    result = torch.stack(rows)
    return result[:, 0] if axes == {"whole"} else result


def logit_difference(target: int, foil: int, position: int = -1) -> Metric:
    """A metric for `patch`: logit of `target` minus logit of `foil` at `position`, batch mean."""
    return lambda logits: (logits[:, position, target] - logits[:, position, foil]).mean()


# The logit lens and direct logit attribution ----------------------------------------------------


@torch.no_grad()
def logit_lens(model: TinyDecoderModel, idx: Tensor) -> Tensor:
    """`(l b t v)` logits read from the residual stream after each block, decoded as the model
    decodes its last one: through `final_norm` (pre-norm models) and `lm_head`. The last layer's
    are the model's own logits, bit for bit (the same operations on the same tensor)."""
    names = [f"blocks.{n}.hook_resid_post" for n in range(model.config.n_layers)]
    _, cache = run_with_cache(model, idx, names)
    decoded = []
    for name in names:
        resid = cache[name]  # b t (h d)
        if model.final_norm is not None:
            resid = model.final_norm(resid)
        decoded.append(model.lm_head(resid))
    return torch.stack(decoded)


def top_tokens(lens: Tensor, k: int = 1) -> tuple[Tensor, Tensor]:
    """Probabilities and ids `(... k)` of the k most likely tokens of logits `(... v)`."""
    return lens.float().softmax(dim=-1).topk(k, dim=-1)


@dataclass(frozen=True)
class Attribution:
    """Direct logit attribution at one position: `contributions (c b)` of the components named in
    `labels`, which sum to `logit_diff (b)`, the model's own logit (difference)."""

    labels: list[str]
    contributions: Tensor
    logit_diff: Tensor


@torch.no_grad()
def direct_logit_attribution(model: TinyDecoderModel, idx: Tensor, target: int,
                             foil: int | None = None, position: int = -1) -> Attribution:
    """Split the logit of `target` (minus that of `foil`) at `position` of idx `(b t)` into the
    direct contributions of the embeddings, each head, each attention bias, each MLP and the
    final biases.

    The final LayerNorm divides the residual stream by its standard deviation, which depends on
    every component at once; that scale is frozen at its value in this run, so the map from the
    stream to the logit is linear and the contributions sum exactly. A head's contribution is its
    `hook_z (b h t d)` times its slice of `attention.out_proj.weight`.
    """
    config = model.config
    if not config.norm_first:
        raise ValueError("direct logit attribution needs a pre-norm model (norm_first=True): in a "
                         "post-norm model each block's LayerNorm rescales the sum of everything "
                         "before it, so the logits are not a sum of per-component terms.")
    if model.training and config.dropout > 0:
        raise ValueError("direct logit attribution needs the model in eval mode: dropout would "
                         "make the components differ from the run they are summed against.")
    labels, parts, resid, logits = _residual_components(model, idx, position)
    unembed = model.lm_head.weight[target]  # (h d)
    has_bias = model.lm_head.bias is not None
    bias = model.lm_head.bias[target] if has_bias else 0.0
    logit_diff = logits[:, target]
    if foil is not None:
        unembed = unembed - model.lm_head.weight[foil]
        bias = bias - model.lm_head.bias[foil] if has_bias else 0.0
        logit_diff = logit_diff - logits[:, foil]
    norm = model.final_norm
    scale = (resid.var(dim=-1, unbiased=False, keepdim=True) + norm.eps).sqrt()  # b 1, frozen
    centred = parts - parts.mean(dim=-1, keepdim=True)  # c b (h d)
    direct = einsum(centred / scale * norm.weight, unembed, "c b m, m -> c b")
    final_bias = (norm.bias @ unembed + bias).expand(1, idx.shape[0])
    return Attribution([*labels, "final biases"], torch.cat([direct, final_bias]), logit_diff)


def _residual_components(model: TinyDecoderModel, idx: Tensor,
                         position: int) -> tuple[list[str], Tensor, Tensor, Tensor]:
    """At `position`: the labels and values `(c b (h d))` of the terms whose sum is the residual
    stream after the last block, that stream itself `(b (h d))` and the logits `(b v)`."""
    n_layers, n_heads = model.config.n_layers, model.config.n_heads
    final = f"blocks.{n_layers - 1}.hook_resid_post"
    names = ["blocks.0.hook_resid_pre", final]
    for n in range(n_layers):
        names += [f"blocks.{n}.attention.hook_z", f"blocks.{n}.hook_mlp_out"]
    logits, cache = run_with_cache(model, idx, names)
    labels, parts = ["embed + positions"], [cache["blocks.0.hook_resid_pre"][:, position]]
    for n, block in enumerate(model.blocks):
        out_proj = block.attention.out_proj
        z = cache[f"blocks.{n}.attention.hook_z"][:, :, position]  # b h d
        w_o = rearrange(out_proj.weight, "m (h d) -> h d m", h=n_heads)
        heads = einsum(z, w_o, "b h d, h d m -> h b m")
        labels += [f"L{n}H{h}" for h in range(n_heads)] + [f"L{n} attn bias"]
        parts += [*heads, out_proj.bias.expand_as(parts[0])]
        if block.mlp is not None:
            labels.append(f"L{n} MLP")
            parts.append(cache[f"blocks.{n}.hook_mlp_out"][:, position])
    return labels, torch.stack(parts), cache[final][:, position], logits[:, position]


# Composition scores -----------------------------------------------------------------------------


def head_circuits(model: TinyDecoderModel, layer: int) -> tuple[Tensor, Tensor]:
    """`W_QK (h m m)` and `W_OV (h m m)` of every head of `layer`, biases left out.

    With `W_Q^h`, `W_K^h`, `W_V^h` `(d m)` the head's rows of `in_proj.weight` and `W_O^h` `(m d)`
    its columns of `out_proj.weight`: `W_QK^h = W_Q^hᵀ W_K^h`, so the score of query i on key j is
    `x_iᵀ W_QK^h x_j / √d`; and `W_OV^h = W_O^h W_V^h`, what the head writes for a key it reads.
    With grouped key/value heads (g < h), `W_K^h` and `W_V^h` are the rows of the group that query
    head h reads, as the attention shares them.
    """
    attention = model.blocks[layer].attention
    h, g = attention.n_heads, attention.n_kv_heads
    weight = attention.in_proj.weight  # rows: q (h d), k (g d), v (g d)
    d_q = weight.shape[1]
    w_q = rearrange(weight[:d_q], "(h d) m -> h d m", h=h)
    w_k, w_v = (repeat(kv, "(g d) m -> (g r) d m", g=g, r=h // g)
                for kv in rearrange(weight[d_q:], "(two gd) m -> two gd m", two=2))
    w_o = rearrange(attention.out_proj.weight, "m (h d) -> h m d", h=attention.n_heads)
    w_qk = einsum(w_q, w_k, "h d m, h d n -> h m n")
    w_ov = einsum(w_o, w_v, "h m d, h d n -> h m n")
    return w_qk, w_ov


def composition_score(later: Tensor, earlier: Tensor) -> Tensor:
    """`||later @ earlier||_F / (||later||_F ||earlier||_F)` for `(... m m)` matrices, broadcast."""
    product = torch.linalg.matrix_norm(later @ earlier)
    return product / (torch.linalg.matrix_norm(later) * torch.linalg.matrix_norm(earlier))


@torch.no_grad()
def composition_scores(model: TinyDecoderModel) -> dict[str, Tensor]:
    """Q-, K- and V-composition (Elhage et al. 2021) of every head of layer n (earlier, e) with
    every head of layer n+1 (later, l): `{"q", "k", "v"}` -> `(n e l)` for n = 0..layers-2.

    The earlier head's `W_OV` sits on the right, as it acts first on the stream:
    Q: `W_QK^lᵀ W_OV^e` (the later head's queries read e's output), K: `W_QK^l W_OV^e` (its keys
    do), V: `W_OV^l W_OV^e` (its values do). Each score is scale-free: rescaling either head's
    matrices leaves it unchanged. LayerNorm and biases are left out, as in the paper. Under RoPE a
    query at i and a key at j meet through `W_Q R(j - i) W_K`, so Q and K scores here are those of
    offset 0 (R = I); values are not rotated, so V scores are exact.
    """
    scores: dict[str, list[Tensor]] = {"q": [], "k": [], "v": []}
    for n in range(model.config.n_layers - 1):
        _, ov_e = head_circuits(model, n)
        qk_l, ov_l = head_circuits(model, n + 1)
        ov_e = rearrange(ov_e, "e m k -> e 1 m k")
        scores["q"].append(composition_score(rearrange(qk_l.mT, "l m k -> 1 l m k"), ov_e))
        scores["k"].append(composition_score(rearrange(qk_l, "l m k -> 1 l m k"), ov_e))
        scores["v"].append(composition_score(rearrange(ov_l, "l m k -> 1 l m k"), ov_e))
    width = model.config.n_heads
    return {kind: torch.stack(s) if s else torch.zeros(0, width, width)
            for kind, s in scores.items()}


def plot_patching(resid: Tensor, heads: Tensor, tokens: list[str], path: str | Path,
                  title: str | None = None) -> Path:
    """Save two heatmaps of patching results: the residual stream `(l t)` (rows: the input of
    each block and the final output) and the heads `(l h)`, each cell the metric after patching
    that piece. Drawn with matplotlib's object API, so no global state changes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n_rows, t = resid.shape
    figure = Figure(figsize=(max(6.0, 0.35 * t + 2 + 0.5 * heads.shape[1]), 1.2 + 0.45 * n_rows),
                    layout="constrained")
    FigureCanvasAgg(figure)
    left, right = figure.subplots(1, 2, width_ratios=[t, max(heads.shape[1], 3)])
    limit = float(max(resid.abs().max(), heads.abs().max(), 1e-6))
    for ax, values in ((left, resid), (right, heads)):
        image = ax.imshow(values.float().numpy(), cmap="RdBu", vmin=-limit, vmax=limit,
                          aspect="auto")
    left.set(xticks=range(t), yticks=range(n_rows), xlabel="position patched",
             title="residual stream")
    left.set_xticklabels([display_token(tok) for tok in tokens], fontsize=8)
    left.set_yticklabels([f"block {n} in" for n in range(n_rows - 1)] + ["final"], fontsize=8)
    right.set(xticks=range(heads.shape[1]), yticks=range(heads.shape[0]), xlabel="head",
              title="head outputs (hook_z)")
    right.set_yticklabels([f"layer {n}" for n in range(heads.shape[0])], fontsize=8)
    figure.colorbar(image, ax=right, label="metric after patching")
    if title:
        figure.suptitle(title, fontsize=9)
    return save_figure(figure, path, dpi=100, metadata={"Software": None})
