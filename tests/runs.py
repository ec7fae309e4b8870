"""Small run directories for the command-line tests: one checkpoint of an untrained model."""

from __future__ import annotations

from pathlib import Path

import torch

from tinygpt.checkpoint import save_checkpoint
from tinygpt.config import ModelConfig
from tinygpt.model import TinyDecoderModel
from tinygpt.tokenizer import CharTokenizer


def save_untrained_run(run_dir: Path, text: str, step: int, **config) -> Path:
    """`run_dir` with one checkpoint (at `step`) of a model seeded with 0, over the characters of
    `text`; `config` sets any ModelConfig field but the vocabulary."""
    tokenizer = CharTokenizer.from_text(text)
    torch.manual_seed(0)
    model = TinyDecoderModel(ModelConfig(vocab_size=tokenizer.vocab_size, **config))
    save_checkpoint(run_dir, model=model, tokenizer=tokenizer, step=step)
    return run_dir
