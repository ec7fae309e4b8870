"""LoRA fine-tuning of a TinyDecoderModel with `peft`: wrap, train the adapters, save, load, merge.

Only the hand-written model's `nn.Linear` layers are adapted (`W x + B A x · alpha/r`, B starting at
zero, so the adapted model starts out equal to the base). `peft` is imported inside the functions:
it takes seconds to import, and only this module needs it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from tinygpt.model import TinyDecoderModel, next_token_loss

# Module-name suffixes peft matches against `named_modules()`, e.g. "blocks.0.mlp.fc_in".
LORA_TARGETS = ("in_proj", "out_proj", "mlp.fc_in", "mlp.fc_out", "lm_head")


@dataclass(frozen=True)
class LoraSettings:
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("in_proj", "out_proj")

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoRA rank must be a positive integer, got {self.rank!r}.")
        if not self.targets:
            raise ValueError(f"choose at least one LoRA target from {', '.join(LORA_TARGETS)}.")
        for target in self.targets:
            if target not in LORA_TARGETS:
                raise ValueError(
                    f"unknown LoRA target {target!r}; choose from {', '.join(LORA_TARGETS)}.")


def add_lora(model: TinyDecoderModel, settings: LoraSettings) -> nn.Module:
    """A peft model around a *copy* of `model` (the caller's model is never modified) whose only
    trainable parameters are the adapters."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha,
                        target_modules=list(settings.targets), lora_dropout=0.0, bias="none")
    return get_peft_model(copy.deepcopy(model), config)


def lora_parameters(peft_model: nn.Module) -> dict[str, Tensor]:
    """The adapter parameters, by name."""
    return {name: p for name, p in peft_model.named_parameters() if "lora_" in name}


def finetune(peft_model: nn.Module, ids: Tensor, *, steps: int, batch_size: int = 16,
             lr: float = 1e-3, seed: int = 0) -> list[float]:
    """Train the adapters on random windows of the token stream `ids`; returns the loss per step."""
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}.")
    max_seq = _base(peft_model).config.max_seq
    ids = torch.as_tensor(ids, dtype=torch.long)
    if len(ids) < max_seq + 2:
        raise ValueError(f"the corpus has {len(ids)} tokens; at least {max_seq + 2} are needed.")
    generator = torch.Generator().manual_seed(seed)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    offsets = torch.arange(max_seq + 1)
    device = next(peft_model.parameters()).device
    peft_model.train()
    losses = []
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - max_seq - 1, (batch_size, 1), generator=generator)
        rows = ids[starts + offsets].to(device)  # b (t+1)
        loss = next_token_loss(peft_model(rows[:, :-1]), rows[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    peft_model.eval()
    return losses


def save_lora(peft_model: nn.Module, directory: str | Path) -> Path:
    """Write the adapters (adapter_model.safetensors + adapter_config.json) to `directory`."""
    directory = Path(directory)
    peft_model.save_pretrained(str(directory), safe_serialization=True)
    return directory


def load_lora(model: TinyDecoderModel, directory: str | Path) -> nn.Module:
    """A copy of the base `model` with the adapters saved in `directory`, ready for inference."""
    from peft import PeftModel

    directory = Path(directory)
    if not (directory / "adapter_model.safetensors").is_file():
        raise FileNotFoundError(f"no adapter_model.safetensors in {directory}.")
    return PeftModel.from_pretrained(copy.deepcopy(model), str(directory)).eval()


def merge_lora(peft_model: nn.Module) -> TinyDecoderModel:
    """A plain TinyDecoderModel whose weights are W + B A · alpha/r; `peft_model` is left intact."""
    return copy.deepcopy(peft_model).merge_and_unload().eval()


def _base(peft_model: nn.Module) -> TinyDecoderModel:
    return peft_model.get_base_model()
