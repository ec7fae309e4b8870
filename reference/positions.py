"""RoPE written the paper's way, sharing no code with `tinygpt.positions`: each pair of features
is a complex number, and a position m multiplies it by e^(i m theta_k).

Pairs follow tinygpt's rotate-half convention: feature k is the real part and feature k + d/2 the
imaginary part of the k-th complex number (the paper pairs neighbours 2k and 2k + 1 instead:
`rope_interleaved` below, the same rotation of permuted features).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _rotations(positions: Tensor, half: int, base: float) -> Tensor:
    """e^(i m theta_k) `(... t k)`, complex128, theta_k = base^(-2k/d) with d = 2 half."""
    theta = 1.0 / base ** (torch.arange(half, dtype=torch.float64) * 2.0 / (2 * half))
    angle = positions.to(torch.float64)[..., None] * theta
    return torch.polar(torch.ones_like(angle), angle)


def _turn(pairs: Tensor, positions: Tensor, base: float) -> Tensor:
    """Complex-multiply `pairs (b h t k 2)` (real, imaginary) by the rotations of `positions`."""
    z = torch.view_as_complex(pairs.contiguous())
    rotation = _rotations(positions, z.shape[-1], base).to(z.dtype)
    if rotation.ndim == 3:  # (b t k): one set of positions per batch row
        rotation = rotation[:, None]
    return torch.view_as_real(z * rotation)


def rope_complex(x: Tensor, positions: Tensor, base: float = 10_000.0) -> Tensor:
    """x `(b h t d)` rotated by positions `(t)` or `(b t)`, rotate-half pairing."""
    half = x.shape[-1] // 2
    turned = _turn(torch.stack([x[..., :half], x[..., half:]], dim=-1), positions, base)
    return torch.cat([turned[..., 0], turned[..., 1]], dim=-1)


def rope_interleaved(x: Tensor, positions: Tensor, base: float = 10_000.0) -> Tensor:
    """The paper's (and GPT-J's) pairing: features 2k and 2k + 1 form the k-th complex number."""
    pairs = x.reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    return _turn(pairs, positions, base).flatten(-2)
