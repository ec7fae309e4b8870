"""Synthetic corpora whose best possible next-character loss is known, for the tests."""

from __future__ import annotations

import math
import random


def synthetic_text(kind: str, length: int, *, n_symbols: int = 8,
                   seed: int = 0) -> tuple[str, float]:
    """A corpus whose best possible next-character loss is known, for tests.

    `cycle`: one fixed random permutation of the symbols repeated; every next character is
    determined by the previous one, so the best loss is 0. `uniform`: independent uniform draws,
    best loss ln(n_symbols). Returns (text, best loss in nats).
    """
    rng = random.Random(seed)
    symbols = [chr(ord("a") + i) for i in range(n_symbols)]
    if kind == "cycle":
        rng.shuffle(symbols)
        return "".join(symbols[i % n_symbols] for i in range(length)), 0.0
    if kind == "uniform":
        return "".join(rng.choice(symbols) for _ in range(length)), math.log(n_symbols)
    raise ValueError(f"unknown synthetic corpus {kind!r}; choose cycle or uniform.")
