"""What decoding keeps between steps, behind one interface: no cache, the eager growing cache, or
the fixed-size cache of the compiled step.

Every kind answers the same two calls. `prefill` runs the model over a whole context (each row
padded on the left, the pads marked by `is_pad (b j)`, each token at its own position) and keeps
whatever the kind keeps; `decode_one_token` extends that context by one token per row and returns
the logits of the next. `choose_cache` picks the kind once, from `use_cache` and `compile`, so the
decoding loop never asks which one it holds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from tinygpt.attention import KVCache
from tinygpt.generate.compiled import compiled_step
from tinygpt.model import TinyDecoderModel

Backend = str | Callable  # a torch.compile backend: a name such as "inductor", or a callable


class DecodingCache(Protocol):
    def prefill(self, idx: Tensor, positions: Tensor | None, is_pad: Tensor | None) -> Tensor:
        """Logits `(b v)` of the token after the context idx `(b t)`; the cache now holds it.

        positions `(b t)` (None: 0..t-1 in every row) and is_pad `(b t)` (None: no padding).
        """

    def decode_one_token(self, idx: Tensor, positions: Tensor) -> Tensor:
        """Logits `(b v)` after appending the tokens idx `(b 1)` at positions `(b 1)`."""

    def reorder(self, rows: Tensor) -> None:
        """Keep rows `(b')` of the batch, in that order (repeats allowed): beam search's step."""


class Recompute:
    """No cache: every step runs the model over the whole context again.

    The definition the caches are tested against: it keeps only the context's tokens.
    """

    def __init__(self, model: TinyDecoderModel):
        self.model = model

    def prefill(self, idx: Tensor, positions: Tensor | None, is_pad: Tensor | None) -> Tensor:
        self.idx, self.positions, self.is_pad = idx, positions, is_pad
        return self.model(idx, positions=positions, key_padding_mask=is_pad)[:, -1]

    def decode_one_token(self, idx: Tensor, positions: Tensor) -> Tensor:
        self.idx = torch.cat([self.idx, idx], dim=1)
        if self.is_pad is not None:
            self.positions = torch.cat([self.positions, positions], dim=1)
            self.is_pad = F.pad(self.is_pad, (0, 1), value=False)
        return self.model(self.idx, positions=self.positions, key_padding_mask=self.is_pad)[:, -1]

    def reorder(self, rows: Tensor) -> None:
        self.idx = self.idx[rows]
        if self.is_pad is not None:
            self.positions, self.is_pad = self.positions[rows], self.is_pad[rows]


class GrowingCache:
    """The eager cache: each layer's keys and values `(b h j d)`, grown by one column a step."""

    def __init__(self, model: TinyDecoderModel):
        self.model = model

    def prefill(self, idx: Tensor, positions: Tensor | None, is_pad: Tensor | None) -> Tensor:
        self.layers, self.is_pad, self.rolled = self.model.new_cache(), is_pad, False
        logits = self.model(idx, cache=self.layers, positions=positions, key_padding_mask=is_pad)
        return logits[:, -1]

    def decode_one_token(self, idx: Tensor, positions: Tensor) -> Tensor:
        if self.is_pad is not None:
            self.is_pad = F.pad(self.is_pad, (0, 1), value=False)
        elif not self.rolled:
            positions = None  # with no padding every row's position follows the cache: the default
        logits = self.model(idx, cache=self.layers, positions=positions,
                            key_padding_mask=self.is_pad)
        return logits[:, -1]

    def roll(self, keep: int) -> None:
        """Drop the oldest columns until at most `keep` remain: the rolling policy's step, for
        models whose positions are relative (a kept key's position stays right)."""
        if self.layers[0].length <= keep:
            return
        self.rolled = True  # from now on positions run past the cache's length
        for layer in self.layers:
            layer.k, layer.v = layer.k[:, :, -keep:], layer.v[:, :, -keep:]
        if self.is_pad is not None:
            self.is_pad = self.is_pad[:, -keep:]

    def reorder(self, rows: Tensor) -> None:
        for layer in self.layers:
            layer.k, layer.v = layer.k[rows], layer.v[rows]
        if self.is_pad is not None:
            self.is_pad = self.is_pad[rows]


class StaticCache:
    """Fixed buffers `(b h max_seq d)` per layer, extended by the compiled one-token step.

    The prefill runs eagerly (its length changes with every prompt and slide) into a growing
    cache, whose keys and values are then copied into the buffers; from there every step has the
    same shapes, so the compiled step (`tinygpt.generate.compiled`) reuses one graph.
    """

    def __init__(self, model: TinyDecoderModel, backend: Backend = "inductor"):
        self.model, self.step = model, compiled_step(backend)

    def prefill(self, idx: Tensor, positions: Tensor | None, is_pad: Tensor | None) -> Tensor:
        layers = self.model.new_cache()
        logits = self.model(idx, cache=layers, positions=positions, key_padding_mask=is_pad)
        self._fill(layers, is_pad)
        return logits[:, -1]

    def _fill(self, layers: list[KVCache], is_pad: Tensor | None) -> None:
        b, h, width, d = layers[0].k.shape
        j = self.model.config.max_seq
        self.keys = [layer.k.new_zeros(b, h, j, d) for layer in layers]
        self.values = [layer.v.new_zeros(b, h, j, d) for layer in layers]
        for layer, k, v in zip(layers, self.keys, self.values):
            k[:, :, :width] = layer.k
            v[:, :, :width] = layer.v
        self.is_pad = torch.zeros(b, j, dtype=torch.bool, device=layers[0].k.device)
        if is_pad is not None:
            self.is_pad[:, :width] = is_pad
        self.index = torch.tensor([width], device=layers[0].k.device)  # 1: the next column

    def decode_one_token(self, idx: Tensor, positions: Tensor) -> Tensor:
        logits = self.step(self.model, idx, positions, self.index, self.is_pad, self.keys,
                           self.values)
        self.index = self.index + 1  # on the device: no copy from the host per step
        return logits

    def reorder(self, rows: Tensor) -> None:
        self.keys = [k[rows] for k in self.keys]
        self.values = [v[rows] for v in self.values]
        self.is_pad = self.is_pad[rows]


def choose_cache(model: TinyDecoderModel, use_cache: bool,
                 compile: bool | Backend = False) -> DecodingCache:
    """The cache kind for `use_cache` and `compile` (True, False or a torch.compile backend)."""
    if compile is False:
        return GrowingCache(model) if use_cache else Recompute(model)
    if not use_cache:
        raise ValueError("compile=True speeds up the cached decode step: it needs use_cache=True.")
    if model.config.attention_impl == "tiled":  # dynamo stops at the tile plan's Python branch
        raise ValueError("compiled decoding needs dense attention: the tiled core plans its tiles "
                         "from the cache length, which one compiled graph for every step cannot "
                         "follow; decode a tiled model without compiling.")
    if compile is True:
        return StaticCache(model, "inductor")
    if not (callable(compile) or isinstance(compile, str) and compile):
        raise ValueError(
            f"compile must be True, False or a torch.compile backend, got {compile!r}."
        )
    return StaticCache(model, compile)
