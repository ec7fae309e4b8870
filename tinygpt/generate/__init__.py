"""Autoregressive decoding from a TinyDecoderModel, one module per concern.

`sampling` (filters over logits and the `Sampling` options), `cache` (no cache, the eager growing
cache, or the compiled step's fixed-size cache, behind one interface), `compiled` (that step),
`decoder` (the loop: prefill, then one token at a time, over ragged prompts), `text` (prompts and
stop strings), `streaming` (text as it is drawn) and `beam` (beam search).
"""

from tinygpt.generate.beam import Beam, beam_search
from tinygpt.generate.decoder import POLICIES, Step, generate, generate_steps
from tinygpt.generate.sampling import (
    Sampling,
    check_sampling,
    sample_next,
    top_k_filter,
    top_p_filter,
)
from tinygpt.generate.streaming import complete, stream
from tinygpt.generate.text import encode_prompt, find_stop, unknown_characters

__all__ = [
    "POLICIES",
    "Beam",
    "Sampling",
    "Step",
    "beam_search",
    "check_sampling",
    "complete",
    "encode_prompt",
    "find_stop",
    "generate",
    "generate_steps",
    "sample_next",
    "stream",
    "top_k_filter",
    "top_p_filter",
    "unknown_characters",
]
