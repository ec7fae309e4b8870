"""TinyGPT: a tiny decoder-only GPT whose hand-written attention is proven equal to PyTorch's."""

from tinygpt.attention import (
    MultiHeadAttention,
    additive_mask,
    causal_mask,
    combine_masks,
    padding_mask,
    scaled_dot_product,
)
from tinygpt.config import PRESETS, ModelConfig
from tinygpt.model import TinyDecoderModel, next_token_loss, parameter_table

__all__ = [
    "PRESETS",
    "ModelConfig",
    "MultiHeadAttention",
    "TinyDecoderModel",
    "additive_mask",
    "causal_mask",
    "combine_masks",
    "next_token_loss",
    "padding_mask",
    "parameter_table",
    "scaled_dot_product",
]
