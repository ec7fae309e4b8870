"""Rotary position embedding (RoPE, Su et al. 2021): queries and keys rotated by their positions.

Each pair of features of a head is a point in a plane, turned by the angle position x theta_k,
with theta_k = base^(-2k/d) for k = 0 .. d/2 - 1 and base 10,000. A rotation preserves dot
products up to the angle between the two vectors, so q_m . k_n depends on m and n only through
m - n: the scores see relative positions, and no position table is learned.

Pairing convention: rotate-half (GPT-NeoX, and Llama as Hugging Face implements it): feature k
pairs with feature k + d/2, not with its neighbour k + 1 (the paper's and GPT-J's interleaved
pairing). The two are the same rotation up to a fixed permutation of the q and k features.
"""

from __future__ import annotations

import torch
from einops import einsum, rearrange
from torch import Tensor

ROPE_BASE = 10_000.0


def rope_angles(positions: Tensor, d_head: int, base: float = ROPE_BASE) -> Tensor:
    """Angles `(... t d/2)` in float64: position x theta_k for positions `(t)` or `(b t)`.

    Float64 because an angle of a few thousand radians in float32 keeps only about three
    decimals; its cosine and sine are then cast to the activations' dtype.
    """
    theta = base ** -(torch.arange(0, d_head, 2, dtype=torch.float64, device=positions.device)
                      / d_head)
    return einsum(positions.to(torch.float64), theta, "... t, f -> ... t f")


def apply_rope(x: Tensor, positions: Tensor, base: float = ROPE_BASE) -> Tensor:
    """x `(b h t d)` rotated by positions `(t)` or `(b t)`, rotate-half pairing; d must be even.

    (x1, x2) = (x[:d/2], x[d/2:]) turns into (x1 cos - x2 sin, x2 cos + x1 sin), per angle.
    """
    angles = rope_angles(positions, x.shape[-1], base)
    if angles.ndim == 3:
        angles = rearrange(angles, "b t f -> b 1 t f")
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = rearrange(x, "... (two f) -> two ... f", two=2)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
