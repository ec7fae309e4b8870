"""The oracle: TinyGPT's model rebuilt on `torch.nn.MultiheadAttention`, sharing no attention
code."""

from reference.model import ReferenceDecoderBlock, ReferenceDecoderModel
from reference.weights import copy_weights, reference_key

__all__ = ["ReferenceDecoderBlock", "ReferenceDecoderModel", "copy_weights", "reference_key"]
