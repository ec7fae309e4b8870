"""Pictures: attention as a grid of heatmaps or a self-contained interactive HTML page, and a
training run's loss curve.

The attention pictures take the weights of one prompt as a tensor `(l h i j)` (layers, heads,
query, key; see `attention_patterns`) and the prompt's tokens as display strings. Optionally they
take which cells the mask blocked, `(l h i j)` bool (see `blocked_cells`), and draw those apart
from cells whose weight is merely near zero: a weight of 0.0 may be the model's choice or the
mask's, and only the mask the model used can tell them apart.

Figures are drawn through matplotlib's object API (a `Figure` saved to a file), never through
`pyplot`: a library function must not switch the caller's backend (in a notebook, say) or leave
figures in pyplot's global list.
"""

from __future__ import annotations

import html
import io
import itertools
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tinygpt.files import write_atomic
from tinygpt.inspection import run_with_cache
from tinygpt.model import TinyDecoderModel

# Characters that would be invisible or break a line on an axis label.
_VISIBLE = {" ": "·", "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def display_token(text: str) -> str:
    """A token as it should appear on an axis: whitespace made visible (GPT-2's leading-space
    tokens read `·the`), and any other unprintable character, such as the control bytes a
    byte-level BPE has a token for, as its escape (`\\x1b`), so no label is blank or breaks."""
    return "".join(_VISIBLE.get(c, c if c.isprintable() else repr(c)[1:-1])
                   for c in text) or "∅"


@torch.no_grad()
def attention_patterns(model: TinyDecoderModel, idx: Tensor) -> Tensor:
    """Attention weights `(l h i j)` of every layer and head for one prompt idx `(1 t)`."""
    if idx.ndim != 2 or idx.shape[0] != 1:
        raise ValueError(f"expected one prompt of shape (1, t), got {tuple(idx.shape)}.")
    names = [f"blocks.{n}.attention.hook_pattern" for n in range(model.config.n_layers)]
    _, cache = run_with_cache(model, idx, names)
    return torch.stack([cache[name][0] for name in names]).float().cpu()


@torch.no_grad()
def blocked_cells(model: TinyDecoderModel, idx: Tensor) -> Tensor:
    """Which cells the mask blocked, `(l h i j)` bool, for one prompt idx `(1 t)`.

    Read from the scores after the mask (`hook_masked_scores`): a cell is blocked where the
    model added -inf, so the answer is the mask the model actually used (causal, window, ALiBi's
    bias on top), not a guess from near-zero weights.
    """
    if idx.ndim != 2 or idx.shape[0] != 1:
        raise ValueError(f"expected one prompt of shape (1, t), got {tuple(idx.shape)}.")
    names = [f"blocks.{n}.attention.hook_masked_scores" for n in range(model.config.n_layers)]
    _, cache = run_with_cache(model, idx, names)
    return torch.stack([cache[name][0] == float("-inf") for name in names]).cpu()


def mask_note(model: TinyDecoderModel) -> str | None:
    """A subtitle naming the model's sliding window and ALiBi slopes, or None if it has neither."""
    parts = []
    if model.config.window is not None:
        parts.append(f"sliding window W = {model.config.window}")
    if model.config.position == "alibi":
        slopes = ", ".join(f"{s:.3g}" for s in model.alibi_slopes.tolist())
        parts.append(f"ALiBi bias -slope x distance, slopes per head: {slopes}")
    return "; ".join(parts) or None


def _check(patterns: Tensor, tokens: list[str], blocked: Tensor | None = None) -> None:
    if patterns.ndim != 4 or patterns.shape[-1] != patterns.shape[-2]:
        raise ValueError(f"patterns must have shape (l, h, t, t), got {tuple(patterns.shape)}.")
    if len(tokens) != patterns.shape[-1]:
        raise ValueError(f"got {len(tokens)} tokens for {patterns.shape[-1]} attention positions.")
    if blocked is not None and (blocked.dtype != torch.bool or blocked.shape != patterns.shape):
        raise ValueError(f"blocked must be a bool tensor of the patterns' shape "
                         f"{tuple(patterns.shape)}, got {blocked.dtype} {tuple(blocked.shape)}.")


def shown_weights(patterns: Tensor, blocked: Tensor | None = None):
    """The weights `(l h i j)` as a numpy masked array whose masked cells are the blocked ones
    (none without `blocked`): what `plot_attention_grid` draws, blocked cells in hatched grey."""
    import numpy as np

    weights = patterns.numpy()
    hidden = np.zeros(weights.shape, dtype=bool) if blocked is None else blocked.numpy()
    return np.ma.masked_array(weights, mask=hidden)


def plot_attention_grid(patterns: Tensor, tokens: list[str], path: str | Path,
                        title: str | None = None, blocked: Tensor | None = None,
                        note: str | None = None) -> Path:
    """Save a layers-by-heads grid of heatmaps (query down, key across) to `path` (PNG, SVG...).

    Cells in `blocked (l h i j)` are drawn hatched grey, apart from the colour scale of the
    weights; `note` (e.g. `mask_note(model)`) is printed under the title.
    """
    import matplotlib
    from matplotlib.figure import Figure

    _check(patterns, tokens, blocked)
    weights = shown_weights(patterns, blocked)
    colours = matplotlib.colormaps["viridis"].with_extremes(bad="#c8c8c8")
    n_layers, n_heads, t, _ = patterns.shape
    labels = [display_token(tok) for tok in tokens]
    # About 0.11 inch per token keeps labels readable; past 64 tokens, label every k-th only, so
    # a long prompt still gives a figure of sane size. A big grid (GPT-2 has 144 heads) also
    # shrinks its panels to fit about 32 inches and labels only the outer row and column: drawing
    # 14,000 tick labels took matplotlib minutes.
    every = -(-t // 64)
    ticks = range(0, t, every)
    cell = max(2.2, min(0.11 * len(ticks), 32 / max(n_layers, n_heads)))
    outer_only = n_layers * n_heads > 16
    fig = Figure(figsize=(cell * n_heads + 1, cell * n_layers + 0.6), layout="constrained")
    axes = fig.subplots(n_layers, n_heads, squeeze=False)
    for layer in range(n_layers):
        for head in range(n_heads):
            ax = axes[layer][head]
            image = ax.imshow(weights[layer, head], cmap=colours, vmin=0.0, vmax=1.0)
            if blocked is not None:
                _hatch(ax, blocked[layer, head])
            ax.set_title(f"layer {layer} head {head}", fontsize=8)
            bottom, left = layer == n_layers - 1, head == 0
            ax.set_xticks(ticks, [labels[i] for i in ticks] if bottom or not outer_only else [],
                          fontsize=6, rotation=90)
            ax.set_yticks(ticks, [labels[i] for i in ticks] if left or not outer_only else [],
                          fontsize=6)
            ax.tick_params(length=0)
    fig.colorbar(image, ax=axes, shrink=0.6, label="attention weight (hatched grey: blocked)"
                 if blocked is not None else "attention weight")
    heading = "\n".join(part for part in (title, note) if part)
    if heading:
        fig.suptitle(heading, fontsize=10)
    return save_figure(fig, path, dpi=100)


def figure_path(path: str | Path) -> Path:
    """The file a figure named `path` is written to: `path` itself, or with `.png` added when it
    has no suffix (PNG is the format then, as matplotlib does)."""
    path = Path(path)
    return path if path.suffix else path.with_name(f"{path.name}.png")


def save_figure(figure, path: str | Path, **savefig_options: Any) -> Path:
    """Render `figure` in memory in the format `figure_path(path)`'s suffix names, then write it
    atomically: a crash or a full disk leaves the previous picture or the new one, never a torn
    file. Returns the path written."""
    path = figure_path(path)
    rendered = io.BytesIO()
    figure.savefig(rendered, format=path.suffix[1:].lower(), **savefig_options)
    write_atomic(path, rendered.getvalue())
    return path


def _hatch(ax, blocked: Tensor) -> None:
    """Hatch the blocked cells `(i j)` of one panel, so they read as blocked even in grey print:
    one rectangle per run of blocked keys in a row, all in one collection (a cell per patch made
    a 144-head grid take minutes)."""
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Rectangle

    runs = []
    for i, row in enumerate(blocked.tolist()):
        j = 0
        for is_blocked, group in itertools.groupby(row):
            n = len(list(group))
            if is_blocked:
                runs.append(Rectangle((j - 0.5, i - 0.5), n, 1))
            j += n
    ax.add_collection(PatchCollection(runs, facecolor="none", edgecolor="#888888", hatch="///",
                                      linewidth=0))


def plot_loss_curve(records: Iterable[dict[str, Any]], path: str | Path) -> Path:
    """Save train and validation loss against step to `path` (PNG, SVG...).

    `records` are a run's metrics, one dict per step with `step` and `train_loss`, and `val_loss`
    on the steps where the model was evaluated.
    """
    from matplotlib.figure import Figure

    records = list(records)
    train = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig = Figure(figsize=(6, 3.5), dpi=100)
    axes = fig.subplots()
    if train:
        axes.plot(*zip(*train), label="train", linewidth=0.8, alpha=0.7)
    if val:
        axes.plot(*zip(*val), label="validation", marker="o", markersize=3)
    axes.set_xlabel("step")
    axes.set_ylabel("loss (nats/token)")
    if train or val:
        axes.legend()
    axes.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def attention_html(patterns: Tensor, tokens: list[str], title: str = "TinyGPT attention",
                   blocked: Tensor | None = None, note: str | None = None) -> str:
    """One self-contained HTML page (data and script inline, nothing fetched) for exploring
    `patterns (l h i j)`: two panels, each with its own layer and head, side by side; hovering a
    token in either panel shows, in both, the weights with which it attends to every key.

    Cells in `blocked (l h i j)` are shown in their own colour with a "blocked" tooltip, apart
    from weights near zero; `note` (e.g. `mask_note(model)`) is shown under the title."""
    _check(patterns, tokens, blocked)
    if not torch.isfinite(patterns).all():
        raise ValueError(
            "the attention weights hold NaN or infinite values (are the model's weights or "
            "adapters finite?); refusing to write a page whose data would not be valid JSON."
        )
    n_layers, n_heads, t, _ = patterns.shape
    # Only the causal lower triangle: row i holds the weights on keys 0..i.
    rows = [[[[round(w, 6) for w in patterns[layer, head, i, :i + 1].tolist()] for i in range(t)]
             for head in range(n_heads)] for layer in range(n_layers)]
    data = {"tokens": [display_token(tok) for tok in tokens], "patterns": rows, "note": note or ""}
    if blocked is not None:  # the same lower triangle, 1 where the mask blocked the key
        data["blocked"] = [[[[int(b) for b in blocked[layer, head, i, :i + 1].tolist()]
                             for i in range(t)] for head in range(n_heads)]
                           for layer in range(n_layers)]
    # "</" must not appear inside the inline script, whatever the tokens are.
    payload = json.dumps(data, ensure_ascii=False, allow_nan=False).replace("</", "<\\/")
    return _PAGE.replace("__TITLE__", html.escape(title)).replace("__DATA__", payload)


def save_attention_html(patterns: Tensor, tokens: list[str], path: str | Path,
                        title: str = "TinyGPT attention", blocked: Tensor | None = None,
                        note: str | None = None) -> Path:
    """Write `attention_html`'s page to `path`, atomically (the old page or the new, never a
    torn one)."""
    path = Path(path)
    write_atomic(path, attention_html(patterns, tokens, title, blocked, note).encode("utf-8"))
    return path


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>__TITLE__</title>
<style>
  body { font-family: sans-serif; margin: 1.5em; color: #222; background: #fff; }
  .panels { display: flex; gap: 2em; flex-wrap: wrap; }
  .panel { border: 1px solid #ccc; border-radius: 6px; padding: 1em; flex: 1; min-width: 22em; }
  .tokens { display: flex; flex-wrap: wrap; gap: 3px; margin: 0.8em 0; font-family: monospace; }
  .tok { display: inline-flex; flex-direction: column; align-items: center; min-width: 1.8em;
         padding: 2px 3px; border: 1px solid #ddd; border-radius: 3px; cursor: default; }
  .tok .w { font-size: 0.65em; color: #555; min-height: 1.1em; }
  .tok.query { outline: 2px solid #d62728; }
  .tok.future { color: #bbb; }
  .tok.blocked { background: repeating-linear-gradient(45deg, #ddd 0 3px, #bbb 3px 6px); }
  canvas { border: 1px solid #ddd; image-rendering: pixelated; }
  .hint { color: #666; font-size: 0.9em; }
</style>
</head>
<body>
<h1>__TITLE__</h1>
<p class="hint" id="note"></p>
<p class="hint">Pick a layer and a head in each panel. Hover a token: every earlier token is
shaded by the weight with which the hovered token attends to it, in both panels at once.</p>
<div class="panels" id="panels"></div>
<script id="attention-data" type="application/json">__DATA__</script>
<script>
"use strict";
const DATA = JSON.parse(document.getElementById("attention-data").textContent);
const T = DATA.tokens.length;
const BLOCKED = "#bbbbbb";  // a blocked cell: not a weight, so not on the white-to-blue scale
document.getElementById("note").textContent = DATA.note;
function isBlocked(layer, head, i, j) {
  return Boolean(DATA.blocked && DATA.blocked[layer][head][i][j]);
}
const panels = [];
let query = T - 1;

function option(value, text) {
  const o = document.createElement("option");
  o.value = String(value); o.textContent = text; return o;
}

function makePanel(name, layer, head) {
  const root = document.createElement("div");
  root.className = "panel"; root.id = "panel-" + name;
  const layerSel = document.createElement("select"); layerSel.id = "layer-" + name;
  const headSel = document.createElement("select"); headSel.id = "head-" + name;
  DATA.patterns.forEach((_, l) => layerSel.appendChild(option(l, "layer " + l)));
  DATA.patterns[0].forEach((_, h) => headSel.appendChild(option(h, "head " + h)));
  layerSel.value = String(layer); headSel.value = String(head);
  const label = document.createElement("div");
  label.append("Panel " + name.toUpperCase() + ": ", layerSel, " ", headSel);
  const row = document.createElement("div"); row.className = "tokens";
  const cells = DATA.tokens.map((text, i) => {
    const cell = document.createElement("span");
    cell.className = "tok"; cell.dataset.i = String(i);
    const t = document.createElement("span"); t.className = "t"; t.textContent = text;
    const w = document.createElement("span"); w.className = "w";
    cell.append(t, w);
    cell.addEventListener("mouseenter", () => { query = i; renderAll(); });
    row.appendChild(cell);
    return cell;
  });
  const canvas = document.createElement("canvas");
  const scale = Math.max(4, Math.min(24, Math.floor(320 / T)));
  canvas.width = T * scale; canvas.height = T * scale;
  const heading = document.createElement("div"); heading.className = "hint";
  heading.textContent = "whole pattern: query down, key across";
  root.append(label, row, heading, canvas);
  const panel = { root, layerSel, headSel, cells, canvas, scale };
  layerSel.addEventListener("change", renderAll);
  headSel.addEventListener("change", renderAll);
  panels.push(panel);
  return root;
}

function color(w) {  // white -> dark blue; the square root keeps diffuse rows visible
  w = Math.sqrt(w);
  const r = Math.round(255 - 230 * w), g = Math.round(255 - 180 * w), b = Math.round(255 - 60 * w);
  return "rgb(" + r + "," + g + "," + b + ")";
}

function render(panel) {
  const layer = Number(panel.layerSel.value), head = Number(panel.headSel.value);
  const rows = DATA.patterns[layer][head];
  const weights = rows[query];
  panel.cells.forEach((cell, j) => {
    const w = cell.querySelector(".w");
    const blocked = j <= query && isBlocked(layer, head, query, j);
    cell.classList.toggle("query", j === query);
    cell.classList.toggle("future", j > query);
    cell.classList.toggle("blocked", blocked);
    cell.title = blocked ? "blocked by the mask" : "";
    if (blocked) {
      cell.style.background = ""; cell.style.color = "";
      delete cell.dataset.weight; w.textContent = "×";  // as narrow as a weight: no reflow
    } else if (j <= query) {
      cell.style.background = color(weights[j]);
      cell.style.color = weights[j] > 0.3 ? "#fff" : "";
      cell.dataset.weight = String(weights[j]);
      w.textContent = weights[j].toFixed(3);
    } else {
      cell.style.background = ""; cell.style.color = "";
      delete cell.dataset.weight; w.textContent = "";
    }
  });
  const ctx = panel.canvas.getContext("2d"), s = panel.scale;
  ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, panel.canvas.width, panel.canvas.height);
  rows.forEach((row, i) => row.forEach((w, j) => {
    ctx.fillStyle = isBlocked(layer, head, i, j) ? BLOCKED : color(w);
    ctx.fillRect(j * s, i * s, s, s);
  }));
  ctx.strokeStyle = "#d62728"; ctx.strokeRect(0.5, query * s + 0.5, T * s - 1, s - 1);
}

function renderAll() { panels.forEach(render); }

const container = document.getElementById("panels");
const nHeads = DATA.patterns[0].length;
container.appendChild(makePanel("a", 0, 0));
container.appendChild(makePanel("b", DATA.patterns.length - 1, nHeads > 1 ? 1 : 0));
renderAll();
</script>
</body>
</html>
"""
