"""LoRA fine-tuning of a TinyDecoderModel with `peft`: wrap, train the adapters, save, load, merge.

Only the hand-written model's `nn.Linear` layers are adapted (`W x + B A x · alpha/r`, B starting at
zero, so the adapted model starts out equal to the base). `peft` is imported inside the functions:
it takes seconds to import, and only this module needs it.
"""

from __future__ import annotations

import copy
import math
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from tinygpt.config import is_int_at_least
from tinygpt.data import random_windows
from tinygpt.files import (
    DiskFullError,
    exclusive_lock,
    follow_umask,
    fsync_dir,
    is_disk_full,
    make_temp_dir,
    replace_dir,
)
from tinygpt.model import TinyDecoderModel, next_token_loss
from tinygpt.train import NonFiniteLossError

# Module-name suffixes peft matches against `named_modules()`, e.g. "blocks.0.mlp.fc_in".
LORA_TARGETS = ("in_proj", "out_proj", "mlp.fc_in", "mlp.fc_out", "lm_head")


@dataclass(frozen=True)
class LoraSettings:
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("in_proj", "out_proj")

    def __post_init__(self) -> None:
        if not is_int_at_least(self.rank, 1):
            raise ValueError(f"LoRA rank must be a positive integer, got {self.rank!r}.")
        # alpha/r scales the adapters' output: 0 would leave the model unchanged whatever the
        # training, and NaN or inf would make the first loss NaN.
        alpha = self.alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (
                math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"LoRA alpha must be a finite number > 0, got {alpha!r}.")
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

    check_lora_targets(model, settings.targets)
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha,
                        target_modules=list(settings.targets), lora_dropout=0.0, bias="none")
    return get_peft_model(copy.deepcopy(model), config)


def check_lora_targets(model: TinyDecoderModel, targets: Sequence[str],
                       adapters: Path | None = None) -> None:
    """Refuse a target the model has no layer for (peft's own error names none of ours, and
    loading drops such adapters without a word), and the LM head of a model whose head is its
    token embedding: merging `W + B A` into that one tensor would change the embedding too, so
    the merged model would differ from the adapted one. `adapters`: the directory they come from,
    when loading."""
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    for target in targets:
        what = (f"the adapters in {adapters} adapt {target!r}, which" if adapters is not None
                else f"LoRA target {target!r}")
        if not any(name == target or name.endswith(f".{target}") for name in names):
            hint = ("; they were made for another model" if adapters is not None
                    else " (an attention-only model has no MLP)" if target.startswith("mlp.")
                    else "")
            raise ValueError(f"{what} is no layer of this model{hint}.")
        if target == "lm_head" and model.config.tie_embeddings:
            raise ValueError(f"{what} cannot be merged into this model: its LM head is its token "
                             f"embedding (tie_embeddings), so both would change.")


def check_adapter_directory(directory: str | Path) -> Path:
    """Refuse to write adapters where something else is: `save_lora` replaces the directory
    whole, so a file or a directory of other files (a run, say) would be lost."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"adapter directory {str(directory)!r} is a file; give a directory.")
    if (directory.is_dir() and any(directory.iterdir())
            and not (directory / "adapter_config.json").is_file()):
        raise ValueError(f"{str(directory)!r} holds files that are not LoRA adapters; give a new "
                         f"or empty directory for the adapters.")
    return directory


def lora_parameters(peft_model: nn.Module) -> dict[str, Tensor]:
    """The adapter parameters, by name."""
    return {name: p for name, p in peft_model.named_parameters() if "lora_" in name}


def finetune(peft_model: nn.Module, ids: Sequence[int] | np.ndarray | Tensor, *, steps: int,
             batch_size: int = 16, lr: float = 1e-3, seed: int = 0,
             should_stop: Callable[[], bool] | None = None) -> list[float]:
    """Train the adapters on random windows of the token stream `ids`; returns the loss per step.

    Only the windows of each batch are read, so `ids` may be a memory-mapped stream of any size;
    every window that fits is drawn with the same chance, the last one included. A non-finite
    loss raises `NonFiniteLossError` before the step that would spread it into the adapters.
    `should_stop`, asked after every step, ends the fine-tuning early (a signal, say): the losses
    then cover the steps done.
    """
    _check_settings(steps, batch_size, lr)
    max_seq = _base(peft_model).config.max_seq
    if len(ids) < max_seq + 1:
        raise ValueError(f"the corpus has {len(ids)} tokens; at least {max_seq + 1} are needed.")
    generator = torch.Generator().manual_seed(seed)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    device = next(peft_model.parameters()).device
    peft_model.train()
    losses = []
    for step in range(1, steps + 1):
        rows = random_windows(ids, batch_size, max_seq, generator).to(device)  # b (t+1)
        loss = next_token_loss(peft_model(rows[:, :-1]), rows[:, 1:])
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            raise NonFiniteLossError(
                f"loss became {losses[-1]} at fine-tuning step {step}; stopped without writing "
                f"adapters (any saved before are kept). Try a lower --lr."
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if should_stop is not None and should_stop():
            break
    peft_model.eval()
    return losses


def _check_settings(steps: int, batch_size: int, lr: float) -> None:
    for name, value, low in (("steps", steps, 0), ("batch_size", batch_size, 1)):
        if not is_int_at_least(value, low):
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}.")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (
            math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}.")


@contextmanager
def adapter_lock(directory: str | Path) -> Iterator[None]:
    """Hold the exclusive lock on the adapter directory `directory` (a lock file beside it), or
    raise `LockedError` naming the holder: two fine-tunings would overwrite each other's
    adapters."""
    directory = Path(directory)
    with exclusive_lock(directory.parent / f".{directory.name}.lock",
                        f"adapter directory {str(directory)!r}"):
        yield


def save_lora(peft_model: nn.Module, directory: str | Path) -> Path:
    """Write the adapters (adapter_model.safetensors + adapter_config.json) to `directory`.

    Non-finite adapters are refused. The files are written and fsynced in a temporary directory
    beside `directory`, which then replaces it, so adapters that load are never replaced by a
    partial write; a full disk raises `DiskFullError` and leaves `directory` as it was.
    """
    directory = check_adapter_directory(directory)
    for name, p in lora_parameters(peft_model).items():
        if not torch.isfinite(p).all():
            raise NonFiniteLossError(
                f"adapter {name} holds non-finite values; refusing to write it to {directory}.")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(directory.parent, f".tmp-{directory.name}-")
    try:
        peft_model.save_pretrained(str(tmp), safe_serialization=True)
        for file in tmp.iterdir():  # safetensors writes 0600 whatever the umask: reset it
            follow_umask(file)
            with open(file, "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(tmp)
        replace_dir(tmp, directory)
    except BaseException as error:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(error):
            raise DiskFullError(
                f"cannot write adapters to {str(directory)!r}: no space left on the device; the "
                f"directory was left as it was."
            ) from error
        raise
    return directory


def load_lora(model: TinyDecoderModel, directory: str | Path) -> nn.Module:
    """A copy of the base `model` with the adapters saved in `directory`, ready for inference."""
    from peft import PeftModel

    directory = Path(directory)
    if not (directory / "adapter_model.safetensors").is_file():
        raise FileNotFoundError(f"no adapter_model.safetensors in {directory}.")
    check_lora_targets(model, _saved_targets(directory), directory)
    try:
        return PeftModel.from_pretrained(copy.deepcopy(model), str(directory)).eval()
    except RuntimeError as error:  # load_state_dict's "size mismatch for ..."
        if "size mismatch" not in str(error):
            raise
        raise ValueError(f"the adapters in {directory} were fine-tuned from a model of other "
                         f"sizes than this checkpoint; give adapters made from it.") from None


def _saved_targets(directory: Path) -> list[str]:
    """The `target_modules` that adapter_config.json records (peft writes a list)."""
    import json

    try:
        config = json.loads((directory / "adapter_config.json").read_text(encoding="utf-8"))
        targets = config["target_modules"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ValueError(f"{directory} has no readable adapter_config.json naming the adapted "
                         f"layers.") from None
    return [targets] if isinstance(targets, str) else list(targets)


def merge_lora(peft_model: nn.Module) -> TinyDecoderModel:
    """A plain TinyDecoderModel whose weights are W + B A · alpha/r; `peft_model` is left intact."""
    return copy.deepcopy(peft_model).merge_and_unload().eval()


def _base(peft_model: nn.Module) -> TinyDecoderModel:
    return peft_model.get_base_model()
