"""LoRA on the oracle, written out by hand: each adapted weight becomes W + B A · alpha/r.

`peft`'s wrapper for `nn.MultiheadAttention` applies the output-projection update twice (in the
versions current when this was written), so it cannot serve as an oracle. Instead the adapters
that `tinygpt.lora` trained on the hand-written model are read and added to the reference's
weights here; the tests check that both models then compute the same function.
"""

from __future__ import annotations

import torch
from torch import nn

from reference.model import ReferenceDecoderModel
from reference.weights import reference_key

_PEFT_PREFIX = "base_model.model."


@torch.no_grad()
def add_lora_to_reference(reference: ReferenceDecoderModel, peft_model: nn.Module,
                          adapter: str = "default") -> list[str]:
    """Add every adapter of `peft_model` (a LoRA-wrapped TinyDecoderModel) to the matching weight
    of `reference`, which must already hold the base weights. Returns the reference names
    changed."""
    parameters = dict(reference.named_parameters())
    changed = []
    for name, module in peft_model.named_modules():
        if not hasattr(module, "lora_A") or adapter not in module.lora_A:
            continue
        a = module.lora_A[adapter].weight  # r in
        b = module.lora_B[adapter].weight  # out r
        key = reference_key(name.removeprefix(_PEFT_PREFIX) + ".weight")
        parameters[key].add_(b @ a * module.scaling[adapter])
        changed.append(key)
    if not changed:
        raise ValueError(f"the model has no LoRA adapter named {adapter!r}.")
    return changed
