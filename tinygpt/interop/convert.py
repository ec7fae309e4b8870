"""Whole conversions: a GPT-2 or nanoGPT checkpoint into a new TinyGPT run, a TinyGPT checkpoint
out to GPT-2's Hugging Face format."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from tinygpt.checkpoint import load_checkpoint, save_checkpoint
from tinygpt.interop.hf import export_hf, read_hf
from tinygpt.interop.layout import InteropError
from tinygpt.interop.nanogpt import read_nanogpt
from tinygpt.model import TinyDecoderModel
from tinygpt.tokenizer import Tokenizer

SOURCES = ("hf:DIR", "hf:NAME", "nanogpt:PATH")


@dataclass
class Imported:
    """What `import_checkpoint` wrote (`checkpoint`) and the model and tokenizer it holds."""

    checkpoint: Path
    model: TinyDecoderModel
    tokenizer: Tokenizer


def read_source(source: str, tokenizer: str | os.PathLike | None = None
                ) -> tuple[TinyDecoderModel, Tokenizer]:
    """The model (eval mode, in its file's dtype) and tokenizer that `source` names:
    `hf:DIR`, `hf:NAME` (downloaded from the Hugging Face Hub) or `nanogpt:PATH/ckpt.pt`."""
    kind, _, where = source.partition(":")
    if kind == "hf" and where:
        return read_hf(where, tokenizer)
    if kind == "nanogpt" and where:
        return read_nanogpt(where, tokenizer)
    raise InteropError(f"the source must be one of {', '.join(SOURCES)}, got {source!r}.")


def default_run_name(source: str) -> str:
    """A run name from the source: the model's name, or the directory that holds the file."""
    kind, _, where = source.partition(":")
    path = Path(where.rstrip("/\\"))
    name = path.parent.name if kind == "nanogpt" else path.name
    return name or kind


def import_checkpoint(source: str, run_dir: str | os.PathLike, *,
                      tokenizer: str | os.PathLike | None = None) -> Imported:
    """Read `source` (see `read_source`) and write it as step 0 of the new run `run_dir`.

    The checkpoint is an ordinary one (`tinygpt.checkpoint`), so every command that reads a run
    reads it. It holds no optimizer state (an import has none), so training resumes from it only
    through a fine-tune. Nothing is written unless everything was read and fits: a bad source
    leaves no run directory behind.
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise InteropError(f"run directory {str(run_dir)!r} already exists; choose another name.")
    model, vocab = read_source(source, tokenizer)
    created = not run_dir.exists()
    try:
        path = save_checkpoint(run_dir, model=model, tokenizer=vocab, step=0,
                               meta={"imported_from": source})
    except BaseException:
        if created:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    return Imported(checkpoint=path, model=model, tokenizer=vocab)


def export_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write the checkpoint (or a run's newest) as a GPT-2 directory that
    `transformers.GPT2LMHeadModel.from_pretrained(out)` loads (see `hf.export_hf`)."""
    loaded = load_checkpoint(checkpoint)
    return export_hf(loaded.model, loaded.tokenizer, out)
