"""The induction-head detector's data and score: random tokens repeated, attention one period back.

An induction head (Elhage et al. 2021; Olsson et al. 2022) completes `[A][B] ... [A] -> [B]`: at
the second `[A]` it attends to the token that followed the first `[A]`. On a sequence whose second
half repeats its first half with period n, that token sits at key `i - n + 1` for every query `i`
of the second copy, so the score is the mean attention weight on that one key.

These are plain tensor functions (no model): `inspection.classify_heads` and `tinygpt.circuits`
run the model and hand the patterns here.
"""

from __future__ import annotations

import torch
from torch import Tensor


def repeated_tokens(vocab_size: int, batch: int, t: int,
                    generator: torch.Generator | None = None) -> Tensor:
    """`(b t)` rows of random tokens whose last `n = t // 2` tokens repeat the n before them.

    When t is odd one random token leads the row. A copy holds n distinct tokens when the vocabulary
    has that many, so the copy one period back is the only earlier occurrence of each token and the
    score measures induction alone; smaller vocabularies draw with replacement.
    """
    if t < 4:
        raise ValueError(f"a repeated sequence needs at least 4 tokens, got {t}.")
    n = t // 2
    if vocab_size >= n:
        copy = torch.rand(batch, vocab_size, generator=generator).argsort(dim=-1)[:, :n]
    else:
        copy = torch.randint(vocab_size, (batch, n), generator=generator)
    lead = torch.randint(vocab_size, (batch, t - 2 * n), generator=generator)
    return torch.cat([lead, copy, copy], dim=1)


def induction_pattern_scores(pattern: Tensor) -> Tensor:
    """pattern `(b h i j)` on `repeated_tokens` rows -> `(h)`: the mean weight each head puts on
    key `i - n + 1` over the queries `i` of the second copy (the last n = t // 2 positions).

    1.0 is a perfect induction head; a previous-token head scores about 0 (its key is `i - 1`).
    """
    t = pattern.shape[-1]
    if t < 4:
        raise ValueError(f"scoring induction needs at least 4 tokens, got {t}.")
    n = t // 2
    # Key i - n + 1 for query i is the diagonal at offset -(n - 1); its last n entries are the
    # queries i = t - n .. t - 1 of the second copy.
    onto_next = pattern.diagonal(offset=-(n - 1), dim1=-2, dim2=-1)[..., -n:]  # b h n
    return onto_next.mean(dim=(0, 2))


def previous_token_pattern_scores(pattern: Tensor) -> Tensor:
    """pattern `(b h i j)` -> `(h)`: the mean weight on key `i - 1` over every query `i >= 1`."""
    if pattern.shape[-1] < 2:
        raise ValueError(f"scoring previous-token heads needs at least 2 tokens, got "
                         f"{pattern.shape[-1]}.")
    return pattern.diagonal(offset=-1, dim1=-2, dim2=-1).mean(dim=(0, 2))
