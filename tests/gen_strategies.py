"""Hypothesis strategies and small builders shared by the generation and KV-cache tests."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from tinygpt import ModelConfig, TinyDecoderModel

DTYPES = (torch.float32, torch.float64)
# Tolerances for cached against uncached logits: float32 rounding, and float64 far below it.
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-10)}


@st.composite
def small_configs(draw, max_seq=st.integers(1, 10)) -> ModelConfig:
    """Tiny decoders of every kind the model supports: heads built, not filtered, from h and d."""
    n_heads = draw(st.sampled_from([1, 2, 3, 4]))
    d_head = draw(st.integers(1, 6))
    norm_first = draw(st.booleans())
    return ModelConfig(
        vocab_size=draw(st.integers(2, 12)),
        d_model=n_heads * d_head,
        n_heads=n_heads,
        n_layers=draw(st.integers(1, 3)),
        d_ff=draw(st.integers(1, 24)),
        max_seq=draw(max_seq),
        norm_first=norm_first,
        activation=draw(st.sampled_from(["relu", "gelu"])),
        seed_input_scale=draw(st.booleans()) and not norm_first,
    )


seeds = st.integers(0, 2**32 - 1)
policies = st.sampled_from(["exact", "fast"])
dtypes = st.sampled_from(DTYPES)


def build_model(config: ModelConfig, seed: int, dtype: torch.dtype = torch.float64,
                spread: float = 1.0) -> TinyDecoderModel:
    """A model in eval mode with seeded weights, scaled by `spread` so its logits are not flat."""
    torch.manual_seed(seed)
    model = TinyDecoderModel(config).to(dtype).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(spread)
    return model


def random_prompt(length: int, vocab_size: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(vocab_size, (length,), generator=generator)
