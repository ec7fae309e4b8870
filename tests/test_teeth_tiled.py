"""Tile skipping the broader tiled tests leave open: rectangular tiles, and a cache offset."""

from __future__ import annotations

import pytest
import torch

from tinygpt.tiled import TileMask, tile_plan


def visible_pairs(mask: TileMask, n_queries: int, n_keys: int) -> torch.Tensor:
    """`(i j)` True where some batch row lets query i see key j, by the definition written out
    pair by pair (absolute query position `query_offset + i`)."""
    ids = None if mask.document_ids is None else mask.document_ids.tolist()
    return torch.tensor([[
        any(not (mask.causal and j > mask.query_offset + i)
            and not (mask.window is not None and mask.query_offset + i - j >= mask.window)
            and (ids is None or row[mask.query_offset + i] == row[j])
            for row in (ids or [None]))
        for j in range(n_keys)] for i in range(n_queries)])


@pytest.mark.parametrize("query_tile, key_tile", [(4, 3), (3, 5), (1, 7)])
@pytest.mark.parametrize("mask", [
    TileMask(causal=True),
    TileMask(causal=True, window=5),
    TileMask(causal=True, query_offset=6),
    TileMask(causal=True, document_ids=torch.tensor([[0] * 6 + [1] * 9 + [2] * 5])),
], ids=["causal", "window", "offset", "documents"])
def test_the_plan_computes_exactly_the_tiles_with_a_visible_pair(mask, query_tile, key_tile):
    """Query rows come in tiles of `query_tile` and keys in tiles of `key_tile` (each only as
    long as the memory a caller chose), and a tile is computed exactly when some pair in it is
    visible: nothing visible is skipped, nothing fully blocked is computed."""
    n_queries = 20 - mask.query_offset
    visible = visible_pairs(mask, n_queries, 20)
    plan = tile_plan(n_queries, 20, mask, query_tile=query_tile, key_tile=key_tile)
    assert [len(rows) for rows, _ in plan][:-1] == [query_tile] * (len(plan) - 1)
    for rows, key_tiles in plan:
        all_keys = [range(s, min(s + key_tile, 20)) for s in range(0, 20, key_tile)]
        wanted = [cols for cols in all_keys
                  if visible[rows.start:rows.stop, cols.start:cols.stop].any()]
        assert key_tiles == wanted, rows
