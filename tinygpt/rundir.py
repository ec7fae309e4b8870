"""A training run's directory, `runs/NAME/`: its checkpoints, its metrics and its loss curve.

    runs/NAME/
        ckpt-STEP/          the newest checkpoints (see `tinygpt.checkpoint` for the files)
        metrics.jsonl       one JSON object per step: step, train_loss, lr, ... (val_loss at times)
        loss_curve.png      train and validation loss against step
        .lock               while a process writes the run: locked by it (flock), its pid

The trainer asks a `RunDir` which checkpoint to resume from, to save and prune, and to log a
step; it never lists or rewrites the files itself. Checkpoints are written through
`tinygpt.checkpoint`'s crash-safe protocol; the metrics file is appended to line by line and, at
the start of a run, cut back to the step it starts from in one atomic replace. One process at a
time writes a run: `RunDir.lock` holds an exclusive lock on it for as long as the process does.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import nn

from tinygpt.checkpoint import (
    Checkpoint,
    CheckpointError,
    checkpoint_dirs,
    load_checkpoint_and_state,
    save_checkpoint,
)
from tinygpt.files import DiskFullError, exclusive_lock, is_disk_full
from tinygpt.pictures import plot_loss_curve
from tinygpt.tokenizer import Tokenizer


class RunDir:
    """The directory of one run. `keep` is how many of the newest checkpoints a save leaves."""

    def __init__(self, path: str | os.PathLike, keep: int = 1):
        self.path = Path(path)
        self.keep = keep
        self.metrics_path = self.path / "metrics.jsonl"
        self.loss_curve_path = self.path / "loss_curve.png"

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @contextmanager
    def lock(self) -> Iterator[RunDir]:
        """Hold the run's exclusive lock for the `with` block, or raise `LockedError` naming the
        process that holds it: two processes writing one run would prune each other's
        checkpoints and interleave their metrics. Released on exit, and by the kernel when the
        process dies, however it dies."""
        with exclusive_lock(self.path / ".lock", f"run directory {str(self.path)!r}"):
            yield self

    # --- checkpoints ------------------------------------------------------------------------

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first; directories being written or deleted are not."""
        return checkpoint_dirs(self.path)

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        found = self.checkpoints()
        return found[-1] if found else None

    def resume_from(self, resume: bool) -> Path | None:
        """The checkpoint a run starts from: the newest when resuming, else None (fresh weights).

        Starting afresh over existing checkpoints is refused: it would mix two runs' metrics and
        prune the older run's checkpoints. Resuming a run with no checkpoint is refused too: a
        mistyped name would otherwise start a new run silently.
        """
        latest = self.latest()
        if latest is not None and not resume:
            raise CheckpointError(
                f"run directory {str(self.path)!r} already has checkpoints; pass --resume or a "
                f"new --name."
            )
        if latest is None and resume:
            raise CheckpointError(
                f"cannot resume: run directory {str(self.path)!r} holds no checkpoint; check "
                f"--name, or drop --resume to start the run afresh."
            )
        return latest

    def load(self, path: Path) -> tuple[Checkpoint, dict[str, Any]]:
        """A checkpoint of this run and its optimizer/RNG state, from one verified read."""
        return load_checkpoint_and_state(path)

    def save(self, *, model: nn.Module, tokenizer: Tokenizer, step: int,
             state: dict[str, Any], meta: dict[str, Any]) -> Path:
        """Write `ckpt-STEP` atomically, then prune to the newest `keep`; returns its path."""
        return save_checkpoint(self.path, model=model, tokenizer=tokenizer, step=step,
                               state=state, meta=meta, keep=self.keep)

    # --- metrics and the loss curve -----------------------------------------------------------

    def append_metrics(self, record: dict[str, Any]) -> None:
        """Add one step's record as a JSON line (a crash can cut only this last line short).

        Numbers that JSON cannot hold (NaN, infinity) are refused, so the file stays valid JSON.
        """
        line = json.dumps(record, allow_nan=False) + "\n"
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            with open(self.metrics_path, "a", encoding="utf-8") as f:
                f.write(line)
        except OSError as error:
            if is_disk_full(error):
                raise DiskFullError(
                    f"cannot append to {str(self.metrics_path)!r}: no space left on the device."
                ) from error
            raise

    def read_metrics(self) -> list[dict[str, Any]]:
        """Every complete record, in file order; a line cut short by a crash is skipped."""
        return [json.loads(line) for line in self._metric_lines()]

    def truncate_metrics(self, step: int) -> None:
        """Keep only the records up to `step`, the step the run starts from (0 for fresh weights):
        the steps after it will be trained, and logged, again, and a failed earlier attempt's
        records must not stay. The file is replaced in one rename, so a crash here leaves the old
        file or the new one."""
        if not self.metrics_path.exists():
            return
        kept = [line for line in self._metric_lines() if _step_of(line) <= step]
        tmp = self.metrics_path.with_name(self.metrics_path.name + ".tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write("".join(line + "\n" for line in kept))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.metrics_path)
        except OSError as error:
            tmp.unlink(missing_ok=True)
            if is_disk_full(error):
                raise DiskFullError(
                    f"cannot rewrite {str(self.metrics_path)!r}: no space left on the device; the "
                    f"file was left as it was."
                ) from error
            raise

    def plot_loss_curve(self) -> Path:
        """Draw `loss_curve.png` from the metrics file."""
        return plot_loss_curve(self.read_metrics(), self.loss_curve_path)

    def _metric_lines(self) -> list[str]:
        if not self.metrics_path.exists():
            return []
        lines = self.metrics_path.read_text(encoding="utf-8").splitlines()
        return [line for line in lines if _step_of(line) is not None]


def check_run_name(name: str) -> str:
    """A run name is one plain directory name: a separator would put the run where the default
    lookup (`runs/NAME`, one level deep) never finds it, and `.` or `..` is not a run at all."""
    separators = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    if not name or name in (".", "..") or any(sep in name for sep in separators) or "\0" in name:
        raise ValueError(
            f"run name {name!r} must be one plain directory name: not empty, not '.' or '..', "
            f"and without '/'."
        )
    return name


def _step_of(line: str) -> int | None:
    """The step of a metrics line, or None for a line that is not a complete record."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None
