"""Autoregressive sampling from a TinyDecoderModel."""

from __future__ import annotations

import torch
from torch import Tensor

from tinygpt.model import TinyDecoderModel


@torch.inference_mode()
def generate(model: TinyDecoderModel, idx: Tensor, max_new_tokens: int, *,
             temperature: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
    """Extend idx `(b t)` by `max_new_tokens`, sampling each token with `temperature`.

    The full history is kept and returned; the model sees only the last `max_seq` tokens.
    Temperature 0 picks the most likely token (greedy).
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}.")
    for _ in range(max_new_tokens):
        logits = model(idx[:, -model.config.max_seq:])[:, -1]  # b v
        if temperature == 0:
            next_id = logits.argmax(dim=-1, keepdim=True)
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            next_id = torch.multinomial(probs, 1, generator=generator)
        idx = torch.cat([idx, next_id], dim=1)
    return idx
