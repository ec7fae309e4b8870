"""The oracle's masks and ALiBi bias, built from torch's own constructions (tril, triu,
block_diag) and the closed form of the ALiBi paper's code, sharing no code with `tinygpt.masks`.

Everything here says *may attend* (True = allowed) until `float_mask` turns it into the
additive float mask `((b h) i j)` that `nn.MultiheadAttention` takes.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def paper_slopes(n: int) -> list[float]:
    """ALiBi's slopes as the paper's code computes them: a power of two n starts at
    2^(-2^-(log2 n - 3)) and multiplies by that start; other n take the nearest lower power of
    two's slopes, then every other slope of twice that power."""
    if math.log2(n).is_integer():
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**k for k in range(n)]
    closest = 2 ** math.floor(math.log2(n))
    return paper_slopes(closest) + paper_slopes(2 * closest)[0::2][: n - closest]


def allowed(batch: int, t: int, *, window: int | None = None,
            document_ids: Tensor | None = None, prefix_len: Tensor | None = None) -> Tensor:
    """`(b i j)` bool, True where query i may attend to key j."""
    ones = torch.ones(t, t, dtype=torch.bool)
    result = ones.tril().repeat(batch, 1, 1)
    if prefix_len is not None:
        for row, p in enumerate(prefix_len.tolist()):
            result[row, :p, :p] = True
    if document_ids is not None:
        for row, ids in enumerate(document_ids):
            lengths = torch.unique_consecutive(ids, return_counts=True)[1].tolist()
            result[row] &= torch.block_diag(*[torch.ones(n, n).tril() for n in lengths]).bool()
    if window is not None:
        result &= ones.triu(-(window - 1))
    return result


def float_mask(may_attend: Tensor, n_heads: int, dtype: torch.dtype, *,
               alibi: bool = False) -> Tensor:
    """MHA's 3-D float mask `((b h) i j)`: 0 / -inf from `may_attend (b i j)`, plus -m_h |i - j|
    with the paper's slopes when `alibi`."""
    b, t, _ = may_attend.shape
    mask = torch.zeros(b, 1, t, t, dtype=dtype).masked_fill(~may_attend[:, None], float("-inf"))
    if alibi:
        distance = (torch.arange(t)[:, None] - torch.arange(t)[None, :]).abs().to(dtype)
        slopes = torch.tensor(paper_slopes(n_heads), dtype=dtype)
        mask = mask - slopes[None, :, None, None] * distance
    return mask.expand(b, n_heads, t, t).reshape(b * n_heads, t, t)
