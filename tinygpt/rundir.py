"""A training run's directory, `runs/NAME/`: its checkpoints, its metrics and its loss curve.

    runs/NAME/
        ckpt-STEP/          the newest checkpoints (see `tinygpt.checkpoint` for the files)
        metrics.jsonl       one JSON object per step: step, train_loss, lr, ... (val_loss at times)
        loss_curve.png      train and validation loss against step

The trainer asks a `RunDir` which checkpoint to resume from, to save and prune, and to log a
step; it never lists or rewrites the files itself. Checkpoints are written through
`tinygpt.checkpoint`'s crash-safe protocol; the metrics file is appended to line by line and, on
resume, cut back to the resumed step in one atomic replace.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from tinygpt.checkpoint import (
    Checkpoint,
    CheckpointError,
    checkpoint_dirs,
    load_checkpoint,
    load_state,
    save_checkpoint,
)
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
        prune the older run's checkpoints.
        """
        latest = self.latest()
        if latest is not None and not resume:
            raise CheckpointError(
                f"run directory {str(self.path)!r} already has checkpoints; pass --resume or a "
                f"new --name."
            )
        return latest

    def load(self, path: Path) -> tuple[Checkpoint, dict[str, Any]]:
        """A checkpoint of this run (verified against its manifest) and its optimizer/RNG state."""
        checkpoint = load_checkpoint(path)
        return checkpoint, load_state(checkpoint.path)

    def save(self, *, model: nn.Module, tokenizer: Tokenizer, step: int,
             state: dict[str, Any], meta: dict[str, Any]) -> Path:
        """Write `ckpt-STEP` atomically, then prune to the newest `keep`; returns its path."""
        return save_checkpoint(self.path, model=model, tokenizer=tokenizer, step=step,
                               state=state, meta=meta, keep=self.keep)

    # --- metrics and the loss curve -----------------------------------------------------------

    def append_metrics(self, record: dict[str, Any]) -> None:
        """Add one step's record as a JSON line (a crash can cut only this last line short)."""
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        """Every complete record, in file order; a line cut short by a crash is skipped."""
        return [json.loads(line) for line in self._metric_lines()]

    def truncate_metrics(self, step: int) -> None:
        """Keep only the records up to `step`, the step resumed from: the steps after it will be
        trained, and logged, again. The file is replaced in one rename, so a crash here leaves
        the old file or the new one."""
        if not self.metrics_path.exists():
            return
        kept = [line for line in self._metric_lines() if _step_of(line) <= step]
        tmp = self.metrics_path.with_name(self.metrics_path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in kept))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.metrics_path)

    def plot_loss_curve(self) -> Path:
        """Draw `loss_curve.png` from the metrics file."""
        return plot_loss_curve(self.read_metrics(), self.loss_curve_path)

    def _metric_lines(self) -> list[str]:
        if not self.metrics_path.exists():
            return []
        lines = self.metrics_path.read_text(encoding="utf-8").splitlines()
        return [line for line in lines if _step_of(line) is not None]


def _step_of(line: str) -> int | None:
    """The step of a metrics line, or None for a line that is not a complete record."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None
