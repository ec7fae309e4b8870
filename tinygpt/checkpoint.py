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
import io
import json
import os
import pickle
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from tinygpt.config import ModelConfig, is_int_at_least
from tinygpt.files import DiskFullError, fsync_dir, is_disk_full, make_temp_dir, write_file
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

    Every file is serialised in memory first, so the disk is touched only by plain writes (whose
    errors name their cause), then written into a hidden temporary directory and fsynced; the
    manifest (the sha256 of every other file) is written last; one rename then puts the
    directory in place. A process killed at any instant leaves either no `ckpt-STEP` or a
    complete one; a full disk raises `DiskFullError` and leaves the run as it was. Files and
    directory get the permissions the umask gives any other file.
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
    blobs = _serialise(model, tokenizer, step, state, meta)
    tmp = None
    try:
        tmp = make_temp_dir(run_dir, _TMP_PREFIX)
        for name in _FILES:
            _write_bytes(tmp / name, blobs[name])
        manifest = {name: hashlib.sha256(blobs[name]).hexdigest() for name in _FILES}
        _write_json(tmp / "manifest.json", manifest)
        _fsync_dir(tmp)
        os.rename(tmp, final)
        _fsync_dir(run_dir)
    except BaseException as error:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(error):
            raise DiskFullError(_disk_full_message(run_dir, final)) from error
        raise
    return final


def _serialise(model: nn.Module, tokenizer: Tokenizer, step: int, state: dict[str, Any] | None,
               meta: dict[str, Any] | None) -> dict[str, bytes]:
    """The bytes of every checkpoint file but the manifest, by name."""
    weights = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    buffer = io.BytesIO()
    torch.save(state or {}, buffer)
    return {
        "model.safetensors": save_safetensors(weights, metadata={"format": str(FORMAT_VERSION)}),
        "config.json": _json_bytes(model.config.to_dict()),
        "tokenizer.json": _json_bytes(tokenizer.to_dict()),
        "meta.json": _json_bytes({"format": FORMAT_VERSION, "step": step, **(meta or {})}),
        "state.pt": buffer.getvalue(),
    }


def _disk_full_message(run_dir: Path, final: Path) -> str:
    if final.exists():  # only the fsync of the run directory, after the rename, failed
        return (f"checkpoint {str(final)!r} was written, but syncing {str(run_dir)!r} failed: no "
                f"space left on the device; the checkpoint is complete but may not survive a "
                f"power cut.")
    kept = checkpoint_dirs(run_dir)
    previous = (f"the previous checkpoint {str(kept[-1])!r} is intact" if kept
                else "no earlier checkpoint exists")
    return (f"cannot write checkpoint {str(final)!r}: no space left on the device; the partial "
            f"copy was removed and {previous}.")


def prune_checkpoints(run_dir: str | os.PathLike, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints, and what a writer killed mid-write left.

    Each old checkpoint is renamed away before it is deleted, so no half-deleted `ckpt-*`
    directory is ever visible to a reader.
    """
    if not is_int_at_least(keep, 1):
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

    Safe while a trainer writes to the run: every file is read once, its hash checked on the
    bytes read and the model built from those same bytes, so a checkpoint pruned after it was
    read does not matter; one pruned while it was being read (its directory gone) sends us to the
    newer one that replaced it.
    """
    return _load_newest(run_dir, lambda path, files: _build(path, files, device))


def load_checkpoint_and_state(path: str | os.PathLike) -> tuple[Checkpoint, dict[str, Any]]:
    """A checkpoint (on the CPU) and its optimizer/RNG state, from one verified read of its files,
    so the two always belong to the same checkpoint."""
    return _load_newest(path, lambda found, files: (_build(found, files, "cpu"),
                                                    _state(found, files)))


def load_state(checkpoint_dir: str | os.PathLike) -> dict[str, Any]:
    """The optimizer/RNG state of a verified checkpoint, refusing anything but plain data."""
    path = Path(checkpoint_dir)
    return _state(path, _read_verified(path))


def _load_newest(run_dir: str | os.PathLike, build):
    """`build(path, files)` on the verified files of the newest checkpoint of `run_dir`; a
    checkpoint whose directory vanished while it was read (pruned by a trainer) is retried."""
    for _ in range(5):
        path = resolve_checkpoint(run_dir)
        try:
            return build(path, _read_verified(path))
        except CheckpointError:
            if path.exists():
                raise
    path = resolve_checkpoint(run_dir)
    return build(path, _read_verified(path))


def _read_verified(path: Path) -> dict[str, bytes]:
    """The bytes of every file of the checkpoint `path`, each read once and checked against the
    sha256 that the manifest recorded when it was written."""
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {str(path)!r} does not exist.")
    manifest = _parse_json(path / "manifest.json", _read_bytes(path / "manifest.json"))
    if not isinstance(manifest, dict):
        raise CheckpointError(
            f"checkpoint file {str(path / 'manifest.json')!r} is not a JSON object of file hashes."
        )
    files = {}
    for name in _FILES:
        try:
            blob = _read_bytes(path / name)
        except CheckpointError:
            raise CheckpointError(f"checkpoint {str(path)!r} is missing {name}.") from None
        if manifest.get(name) != hashlib.sha256(blob).hexdigest():
            raise CheckpointError(
                f"checkpoint file {str(path / name)!r} was altered (sha256 mismatch).")
        files[name] = blob
    return files


def _build(path: Path, files: dict[str, bytes], device: str | torch.device) -> Checkpoint:
    """The model, tokenizer, config and step from a checkpoint's verified bytes."""
    try:
        config = ModelConfig.from_dict(_parse_json(path / "config.json", files["config.json"]))
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{path / 'config.json'}: {error}") from None
    try:
        tokenizer = tokenizer_from_dict(_parse_json(path / "tokenizer.json",
                                                    files["tokenizer.json"]))
    except TokenizerError as error:
        raise CheckpointError(f"{path / 'tokenizer.json'}: {error}") from None
    if tokenizer.vocab_size != config.vocab_size:
        raise CheckpointError(
            f"checkpoint {str(path)!r}: tokenizer vocab_size {tokenizer.vocab_size} does not match "
            f"the model's vocab_size {config.vocab_size}."
        )
    model = TinyDecoderModel(config)
    try:
        weights = load_safetensors(files["model.safetensors"])
    except SafetensorError as error:
        raise CheckpointError(f"cannot read {path / 'model.safetensors'}: {error}") from None
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as error:
        raise CheckpointError(
            f"weights in {str(path)!r} do not fit its config: {str(error).splitlines()[0]}"
        ) from None
    meta = _parse_json(path / "meta.json", files["meta.json"])
    step = meta.get("step") if isinstance(meta, dict) else None
    if not is_int_at_least(step, 0):
        raise CheckpointError(f"{path / 'meta.json'} must record the step as an integer >= 0, got "
                              f"{step!r}.")
    model.to(device).eval()
    return Checkpoint(model=model, tokenizer=tokenizer, config=config, step=step, path=path,
                      meta=meta)


def _state(path: Path, files: dict[str, bytes]) -> dict[str, Any]:
    """The optimizer/RNG state from verified bytes, refusing anything but plain data.

    `torch.load(weights_only=True)` unpickles only tensors and plain containers, so a pickle that
    would run code (through `__reduce__`) is rejected before anything runs.
    """
    try:
        return torch.load(io.BytesIO(files["state.pt"]), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch's own message suggests weights_only=False: never say that of a refused file.
        raise CheckpointError(
            f"{path / 'state.pt'} holds something other than tensors and plain data; refusing to "
            f"load it, as unpickling it could run code."
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


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {str(path)!r} is missing.") from None
    except OSError as error:
        raise CheckpointError(f"cannot read checkpoint file {str(path)!r}: {error}.") from None


def _parse_json(path: Path, blob: bytes) -> Any:
    try:
        return json.loads(blob.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(
            f"checkpoint file {str(path)!r} is not valid JSON: {error}."
        ) from None


def _json_bytes(data: Any) -> bytes:
    return json.dumps(data, ensure_ascii=False, indent=1).encode("utf-8")


def _write_bytes(path: Path, data: bytes) -> None:
    """Create, write and fsync one checkpoint file (its mode follows the umask)."""
    write_file(path, data)


def _write_json(path: Path, data: Any) -> None:
    _write_bytes(path, _json_bytes(data))


def _fsync_dir(path: Path) -> None:
    fsync_dir(path)


def _discard(path: Path) -> None:
    """Rename away first (atomic), so no half-deleted `ckpt-*` directory is ever visible."""
    trash = path.with_name(f"{_TMP_PREFIX}trash-{path.name}-{os.getpid()}")
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)
