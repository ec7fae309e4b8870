"""Draw which tiles the tiled attention computes, masks or skips: docs/tiles.png for docs/tour.md.

    .venv/bin/python docs/make_tile_figure.py [--out docs/tiles.png]

The picture is read from the library itself (`tile_plan`, `TileMask.is_open`), so it shows what
the code does, not what it is meant to do.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from tinygpt.tiled import TileMask, tile_plan, tiles  # noqa: E402

HERE = Path(__file__).resolve().parent
SKIPPED, MASKED, OPEN = 0, 1, 2
COLOURS = ("#f2f2f2", "#f4a259", "#5b8e7d")


def tile_states(mask: TileMask, n: int, tile: int) -> np.ndarray:
    """`(query tiles, key tiles)`: SKIPPED, MASKED (computed with a mask) or OPEN (no mask)."""
    states = np.full((len(tiles(n, tile)), len(tiles(n, tile))), SKIPPED)
    for r, (rows, computed) in enumerate(tile_plan(n, n, mask, query_tile=tile, key_tile=tile)):
        for cols in computed:
            states[r, cols.start // tile] = OPEN if mask.is_open(rows, cols) else MASKED
    return states


def draw(path: Path, n: int = 1024, tile: int = 128, window: int = 256) -> None:
    panels = ((f"causal, {n} positions", TileMask(causal=True)),
              (f"causal, sliding window of {window} keys", TileMask(causal=True, window=window)))
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.6), constrained_layout=True)
    for ax, (title, mask) in zip(axes, panels):
        states = tile_states(mask, n, tile)
        computed = int((states != SKIPPED).sum())
        ax.imshow(states, cmap=ListedColormap(COLOURS), vmin=0, vmax=2)
        ax.set_xticks(np.arange(-0.5, states.shape[1]), [])
        ax.set_yticks(np.arange(-0.5, states.shape[0]), [])
        ax.grid(color="white", linewidth=2)
        ax.set_xlabel(f"key tiles ({tile} keys each)")
        ax.set_ylabel(f"query tiles ({tile} queries each)")
        ax.set_title(f"{title}:\n{computed} of {states.size} tiles computed", fontsize=10)
    fig.legend(handles=[Patch(color=COLOURS[OPEN], label="computed, nothing masked"),
                        Patch(color=COLOURS[MASKED], label="computed with its mask tile"),
                        Patch(color=COLOURS[SKIPPED], label="skipped: fully blocked")],
               loc="lower center", ncol=3, fontsize=9, bbox_to_anchor=(0.5, -0.08))
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "tiles.png")
    args = parser.parse_args()
    draw(args.out)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
