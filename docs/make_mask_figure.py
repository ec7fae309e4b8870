"""Draw every attention mask TinyGPT builds, side by side: docs/masks.png for docs/tour.md.

    .venv/bin/python docs/make_mask_figure.py [--out docs/masks.png]

Each panel is read from the library's own builders (`tinygpt.masks`), so it shows what the code
blocks, not what it is meant to block. Blocked cells are dark; the last panel colours the ALiBi
bias one head adds to the causal mask (blocked cells stay dark).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

from tinygpt import masks

HERE = Path(__file__).resolve().parent
ALLOWED_BLOCKED = ListedColormap(["#5b8e7d", "#262626"])


def mask_panels(n: int, window: int, prefix: int, doc_lengths: tuple[int, ...]):
    """`(title, blocked (i j) bool)` for causal, window, prefix-LM and documents on n positions."""
    pos = masks.positions(n)
    ids = torch.repeat_interleave(torch.arange(len(doc_lengths)), torch.tensor(doc_lengths))
    return (
        ("causal", masks.causal(pos, pos)),
        (f"sliding window, W = {window}", masks.sliding_window(pos, pos, window)),
        (f"prefix-LM, prefix = {prefix}", masks.prefix_lm(pos, pos, torch.tensor([prefix]))[0]),
        (f"documents {'+'.join(map(str, doc_lengths))}", masks.document(pos, pos, ids[None])[0]),
    )


def draw(path: Path, n: int = 12, window: int = 4, prefix: int = 5,
         doc_lengths: tuple[int, ...] = (5, 4, 3), n_heads: int = 4, head: int = 0) -> None:
    fig = Figure(figsize=(15, 3.4), constrained_layout=True)
    axes = fig.subplots(1, 5)
    for ax, (title, blocked) in zip(axes, mask_panels(n, window, prefix, doc_lengths)):
        ax.imshow(blocked.numpy(), cmap=ALLOWED_BLOCKED, vmin=0, vmax=1)
        ax.set_title(title)
    pos = masks.positions(n)
    slope = masks.alibi_slopes(n_heads)[head]
    bias = masks.alibi_bias(masks.alibi_slopes(n_heads), pos, pos)[head].numpy()
    shown = np.ma.masked_where(masks.causal(pos, pos).numpy(), bias)
    axes[4].set_facecolor("#262626")
    image = axes[4].imshow(shown, cmap="viridis")
    axes[4].set_title(f"ALiBi bias, head {head} (slope {slope:.3g})")
    fig.colorbar(image, ax=axes[4], shrink=0.8, label="bias added to the score")
    for ax in axes:
        ax.set_xlabel("key j")
        ax.set_ylabel("query i")
        ax.set_xticks(range(0, n, 2))
        ax.set_yticks(range(0, n, 2))
    fig.suptitle("Blocked (dark) and allowed (green) keys for each query; "
                 f"{n} positions, built by tinygpt.masks")
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "masks.png")
    args = parser.parse_args()
    draw(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
