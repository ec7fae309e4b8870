"""A one-token decode step with fixed shapes, so that `torch.compile` builds its graph once.

Eager decoding is bound by per-op overhead, not arithmetic: at the `shakespeare-cpu` size a
one-token step spends most of its time in Python and dispatch (module calls, einops, masks, the
growing `torch.cat` of the cache). Compiling removes that overhead, but only pays if every step
reuses one graph, and the eager step changes shape every token. Here nothing does:

- each layer's keys and values live in preallocated buffers `(b h j d)` with `j = max_seq`; the
  new position is written in place at column `index` (a tensor, not a Python int);
- the columns not written yet are hidden by a key-padding mask built inside the step from
  `index`, together with each row's left padding.

The step is the model's own forward (and so its own attention): only the cache is swapped.
`tinygpt.generate.cache.StaticCache` owns the buffers and calls the compiled step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

from tinygpt.model import TinyDecoderModel


class StaticKVCache:
    """One layer's keys and values `(b h j d)` in fixed buffers; `append` writes one position.

    It stands in for `KVCache` inside the attention: `append` returns the whole buffers, unwritten
    columns included, and the step's key-padding mask hides those. Its `length`, the columns
    written before this step, is the tensor `index`, so that every step traces to the same graph.
    """

    def __init__(self, k: Tensor, v: Tensor, index: Tensor):
        self.k, self.v, self.index = k, v, index

    @property
    def length(self) -> Tensor:
        return self.index

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k and v `(b h 1 d)` at column `index`; return all keys and values `(b h j d)`."""
        self.k.index_copy_(2, self.index, k)
        self.v.index_copy_(2, self.index, v)
        return self.k, self.v


def decode_step(model: TinyDecoderModel, idx: Tensor, positions: Tensor, index: Tensor,
                is_pad: Tensor, keys: list[Tensor], values: list[Tensor]) -> Tensor:
    """Logits `(b v)` of one new token per row, writing its keys and values into the buffers.

    idx and positions `(b 1)`; index `(1)` is the column the new token takes; is_pad `(b j)` marks
    each row's left padding; keys and values hold one `(b h j d)` buffer per block. It is the
    model's own forward, given the buffers as its cache and a key-padding mask that hides both the
    padding and the columns not written yet.
    """
    columns = torch.arange(is_pad.shape[1], device=is_pad.device)
    is_blocked = is_pad | (columns > index)  # b j: padding, and the columns not yet written
    cache = [StaticKVCache(k, v, index) for k, v in zip(keys, values)]
    return model(idx, cache=cache, positions=positions, key_padding_mask=is_blocked)[:, -1]


@functools.cache
def compiled_step(backend: str | Callable = "inductor") -> Callable:
    """`decode_step` under `torch.compile`, built once per backend and shared by every call.

    `fullgraph` makes a graph break an error rather than a silent slowdown; `dynamic=False` keeps
    the shapes static (a new batch size or model size compiles a graph of its own). Inductor's C++
    wrapper calls the kernels from C++ rather than Python: about a fifth less time per step here.
    """
    options = {"cpp_wrapper": True} if backend == "inductor" else None
    return torch.compile(decode_step, backend=backend, fullgraph=True, dynamic=False,
                         options=options)
