"""Checkpoints that survive a crash at any instant, and load only data, never code.

A run is a directory `runs/NAME/`. Each checkpoint is a sub-directory `ckpt-STEP/` holding
`model.safetensors` (weights), `config.json` (ModelConfig), `tokenizer.json`, `meta.json` (step and
training settings), `state.pt` (optimizer and RNG state, read with `torch.load(weights_only=True)`)
and, written last, `manifest.json` with the sha256 of every other file.

A checkpoint is built in a hidden temporary directory beside the others, fsynced, then renamed into
place in one atomic step (`write_checkpoint`); older checkpoints are renamed away before being
deleted (`prune_checkpoints`). So at any instant a `ckpt-*` directory is complete, and a file
missing or altered afterwards is caught by the manifest. `tinygpt.rundir.RunDir` is the trainer's
view of a whole run directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from tinygpt.config import ModelConfig
from tinygpt.model import TinyDecoderModel
from tinygpt.tokenizer import Tokenizer, TokenizerError, tokenizer_from_dict

FORMAT_VERSION = 1
_CKPT = re.compile(r"^ckpt-(\d+)$")
_FILES = ("model.safetensors", "config.json", "tokenizer.json", "meta.json", "state.pt")
_TMP_PREFIX = ".tmp-ckpt-"  # checkpoints being written, or renamed away to be deleted


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete, altered, unsafe or does not fit."""


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model (eval mode), its tokenizer and config, and the step."""

    model: TinyDecoderModel
    tokenizer: Tokenizer
    config: ModelConfig
    step: int
    path: Path
    meta: dict[str, Any] = field(default_factory=dict)


def checkpoint_dirs(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary and trashed ones are ignored)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir()
             if (m := _CKPT.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def save_checkpoint(run_dir: str | os.PathLike, *, model: nn.Module, tokenizer: Tokenizer,
                    step: int, state: dict[str, Any] | None = None,
                    meta: dict[str, Any] | None = None, keep: int = 1) -> Path:
    """Write `run_dir/ckpt-STEP/` atomically, then keep only the newest `keep` checkpoints.

    `state` (optimizer, RNG, ...) may hold only tensors and plain Python containers, so that it
    loads with `weights_only=True`. Returns the checkpoint's directory.
    """
    final = write_checkpoint(run_dir, model=model, tokenizer=tokenizer, step=step, state=state,
                             meta=meta)
    prune_checkpoints(run_dir, keep)
    return final


def write_checkpoint(run_dir: str | os.PathLike, *, model: nn.Module, tokenizer: Tokenizer,
                     step: int, state: dict[str, Any] | None = None,
                     meta: dict[str, Any] | None = None) -> Path:
    """Write `run_dir/ckpt-STEP/` so that it appears complete or not at all, and return it.

    Every file goes into a hidden temporary directory and is fsynced; the manifest (the sha256 of
    every other file) is written last; one rename then puts the directory in place. A process
    killed at any instant leaves either no `ckpt-STEP` or a complete one.
    """
    config: ModelConfig = model.config
    if tokenizer.vocab_size != config.vocab_size:
        raise CheckpointError(
            f"tokenizer vocab_size {tokenizer.vocab_size} does not match the model's "
            f"vocab_size {config.vocab_size}."
        )
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / f"ckpt-{step:08d}"
    if final.exists():  # a step is saved once (e.g. Ctrl-C right after a periodic save)
        return final
    tmp = Path(tempfile.mkdtemp(dir=run_dir, prefix=_TMP_PREFIX))
    try:
        weights = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        save_file(weights, tmp / "model.safetensors", metadata={"format": str(FORMAT_VERSION)})
        _write_json(tmp / "config.json", config.to_dict())
        _write_json(tmp / "tokenizer.json", tokenizer.to_dict())
        _write_json(tmp / "meta.json", {"format": FORMAT_VERSION, "step": step, **(meta or {})})
        torch.save(state or {}, tmp / "state.pt")
        for name in _FILES:
            _fsync_file(tmp / name)
        _write_json(tmp / "manifest.json", {name: _sha256(tmp / name) for name in _FILES})
        _fsync_dir(tmp)
        os.rename(tmp, final)
        _fsync_dir(run_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def prune_checkpoints(run_dir: str | os.PathLike, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints, and what a writer killed mid-write left.

    Each old checkpoint is renamed away before it is deleted, so no half-deleted `ckpt-*`
    directory is ever visible to a reader.
    """
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep must be a positive integer, got {keep!r}.")
    run_dir = Path(run_dir)
    for old in checkpoint_dirs(run_dir)[:-keep]:
        _discard(old)
    for leftover in run_dir.glob(_TMP_PREFIX + "*"):
        shutil.rmtree(leftover, ignore_errors=True)


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory itself, or the newest checkpoint of a run directory."""
    path = Path(path)
    if (path / "manifest.json").exists() or _CKPT.match(path.name):
        return path
    if not path.is_dir():
        raise CheckpointError(f"run directory {str(path)!r} does not exist.")
    found = checkpoint_dirs(path)
    if not found:
        raise CheckpointError(f"run directory {str(path)!r} holds no checkpoint.")
    return found[-1]


def load_checkpoint(run_dir: str | os.PathLike, device: str | torch.device = "cpu") -> Checkpoint:
    """Load the newest checkpoint of `run_dir` (or the checkpoint directory given) for use.

    Safe while a trainer writes to the run: a checkpoint pruned under our feet (its directory
    gone) sends us to the newer one that replaced it.
    """
    for _ in range(5):
        path = resolve_checkpoint(run_dir)
        try:
            return _load(path, device)
        except CheckpointError:
            if path.exists():
                raise
    return _load(resolve_checkpoint(run_dir), device)


def _load(path: Path, device: str | torch.device) -> Checkpoint:
    _verify(path)
    config = _read_config(path)
    try:
        tokenizer = tokenizer_from_dict(_read_json(path / "tokenizer.json"))
    except TokenizerError as error:
        raise CheckpointError(f"{path / 'tokenizer.json'}: {error}") from None
    if tokenizer.vocab_size != config.vocab_size:
        raise CheckpointError(
            f"checkpoint {str(path)!r}: tokenizer vocab_size {tokenizer.vocab_size} does not match "
            f"the model's vocab_size {config.vocab_size}."
        )
    model = TinyDecoderModel(config)
    try:
        weights = load_file(path / "model.safetensors")
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"cannot read {path / 'model.safetensors'}: {error}") from None
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as error:
        raise CheckpointError(
            f"weights in {str(path)!r} do not fit its config: {str(error).splitlines()[0]}"
        ) from None
    meta = _read_json(path / "meta.json")
    model.to(device).eval()
    return Checkpoint(model=model, tokenizer=tokenizer, config=config, step=int(meta["step"]),
                      path=path, meta=meta)


def load_state(checkpoint_dir: str | os.PathLike) -> dict[str, Any]:
    """The optimizer/RNG state of a verified checkpoint, refusing anything but plain data.

    `torch.load(weights_only=True)` unpickles only tensors and plain containers, so a pickle that
    would run code (through `__reduce__`) is rejected before anything runs.
    """
    path = Path(checkpoint_dir)
    _verify(path)
    try:
        return torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{path / 'state.pt'} holds something other than tensors and plain data; refusing to "
            f"load it ({str(error).splitlines()[0]})"
        ) from None
    except (RuntimeError, EOFError) as error:
        raise CheckpointError(f"cannot read {path / 'state.pt'}: {error}") from None


def latest_run(runs_dir: str | os.PathLike = "runs") -> Path:
    """The run directory whose newest checkpoint was written last."""
    runs_dir = Path(runs_dir)
    candidates = runs_dir.iterdir() if runs_dir.is_dir() else []
    runs = [(found[-1].stat().st_mtime_ns, run) for run in candidates
            if run.is_dir() and (found := checkpoint_dirs(run))]
    if not runs:
        raise CheckpointError(f"no run with a checkpoint under {str(runs_dir)!r}; train one first.")
    return max(runs)[1]


def _verify(path: Path) -> None:
    """Every file is there and has the hash the manifest recorded when it was written."""
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {str(path)!r} does not exist.")
    manifest = _read_json(path / "manifest.json")
    for name in _FILES:
        file = path / name
        if not file.exists():
            raise CheckpointError(f"checkpoint {str(path)!r} is missing {name}.")
        if manifest.get(name) != _sha256(file):
            raise CheckpointError(f"checkpoint file {str(file)!r} was altered (sha256 mismatch).")


def _read_config(path: Path) -> ModelConfig:
    try:
        return ModelConfig.from_dict(_read_json(path / "config.json"))
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{path / 'config.json'}: {error}") from None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {str(path)!r} is missing.") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(
            f"checkpoint file {str(path)!r} is not valid JSON: {error}."
        ) from None


def _write_json(path: Path, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _discard(path: Path) -> None:
    """Rename away first (atomic), so no half-deleted `ckpt-*` directory is ever visible."""
    trash = path.with_name(f"{_TMP_PREFIX}trash-{path.name}-{os.getpid()}")
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)
