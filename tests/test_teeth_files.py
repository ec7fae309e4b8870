"""Crash-safety the broader run-directory tests leave open: a lock given back when its block
fails, a stale holder's pid never read as ours, no temporary left by a failed write, the mode an
atomic write leaves, `write_file` never replacing a file, and a directory replaced whole or not
at all."""

from __future__ import annotations

import errno
import os

import pytest

import tinygpt.files as files
from tinygpt.files import DiskFullError, LockedError, write_atomic, write_file
from tinygpt.rundir import RunDir


def test_the_run_lock_is_given_back_when_its_block_raises(tmp_path):
    """An error inside `with run.lock()` (a failed training step) releases the lock and removes
    its file, so the next command can take the run at once."""
    run = RunDir(tmp_path)
    with pytest.raises(RuntimeError, match="step failed"):
        with run.lock():
            raise RuntimeError("step failed")
    assert not (tmp_path / ".lock").exists()
    with run.lock():
        assert (tmp_path / ".lock").read_text() == f"{os.getpid()}\n"


def test_a_stale_lock_file_with_a_longer_pid_is_overwritten_not_patched(tmp_path):
    """A holder killed by SIGKILL leaves its pid in the file; the next holder's pid replaces it
    whole, so a contender is told the right process (not the old digits after the new ones)."""
    lock = tmp_path / ".lock"
    lock.write_text("4194303999\n")  # a killed holder's pid, longer than ours
    with files.exclusive_lock(lock, "the run"):
        assert lock.read_text() == f"{os.getpid()}\n"
        with pytest.raises(LockedError, match=rf"in use by process {os.getpid()} \(lock"):
            with files.exclusive_lock(lock, "the run"):
                pass


def test_a_failed_atomic_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    """A full disk while writing leaves the old contents, says so, and leaves nothing beside the
    file: a temporary per failed save would fill the disk further on every retry."""
    path = tmp_path / "meta.json"
    path.write_bytes(b"old")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", full)
    with pytest.raises(DiskFullError, match="meta.json"):
        write_atomic(path, b"new contents")
    monkeypatch.undo()
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.json"]


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_an_atomic_write_gives_the_file_the_mode_a_plain_open_would(tmp_path, umask):
    """The temporary behind an atomic write is created 0600; the file it becomes must follow the
    umask like any other, or collaborators the umask lets in cannot read a saved run."""
    old = os.umask(umask)
    try:
        write_atomic(tmp_path / "atomic.json", b"{}")
        with open(tmp_path / "plain.json", "wb") as f:
            f.write(b"{}")
    finally:
        os.umask(old)
    mode = (tmp_path / "atomic.json").stat().st_mode & 0o777
    assert mode == (tmp_path / "plain.json").stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_full_disk_while_cutting_the_metrics_back_keeps_them_and_leaves_no_temporary(
        tmp_path, monkeypatch):
    """Resuming cuts metrics.jsonl back to the resumed step in one replace; when the disk is full
    the old file stays whole and its half-written replacement is removed."""
    run = RunDir(tmp_path)
    for step in range(4):
        run.append_metrics({"step": step, "train_loss": 1.0})
    before = run.metrics_path.read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", full)
    with pytest.raises(DiskFullError, match="metrics.jsonl"):
        run.truncate_metrics(1)
    monkeypatch.undo()
    assert run.metrics_path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_write_file_never_replaces_an_existing_file(tmp_path):
    """`write_file` creates a file in a checkpoint being built; finding one already there means
    two writers, and it refuses rather than overwrite the other's bytes."""
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"the other writer's")
    with pytest.raises(FileExistsError):
        write_file(path, b"ours")
    assert path.read_bytes() == b"the other writer's"


class _Crash(Exception):
    pass


def _contents(directory):
    return {p.name: p.read_text() for p in directory.iterdir()}


@pytest.mark.parametrize("cut", range(5))
def test_replacing_a_directory_cut_at_any_step_leaves_the_old_or_the_new_whole(
        tmp_path, monkeypatch, cut):
    """`replace_dir` (token caches, adapters, experiments) stopped before its `cut`-th file
    operation (4 means it finished): the place holds the old contents or the new ones whole,
    or, between the two renames, the old contents sit whole under their hidden name."""
    old, new = tmp_path / "adapters", tmp_path / ".new"
    for directory, files_in in ((old, {"a": "old", "b": "old"}), (new, {"a": "new"})):
        directory.mkdir()
        for name, text in files_in.items():
            (directory / name).write_text(text)
    calls = []

    def counted(operation):
        def run(*args, **kwargs):
            calls.append(operation.__name__)
            if len(calls) > cut:
                raise _Crash
            return operation(*args, **kwargs)
        return run

    monkeypatch.setattr(files.os, "rename", counted(os.rename))
    monkeypatch.setattr(files.shutil, "rmtree", counted(files.shutil.rmtree))
    monkeypatch.setattr(files, "fsync_dir", counted(files.fsync_dir))
    try:
        files.replace_dir(new, old)
    except _Crash:
        pass
    monkeypatch.undo()
    whole = [_contents(d) for d in tmp_path.iterdir() if d.is_dir()]
    if old.exists():
        assert _contents(old) in ({"a": "old", "b": "old"}, {"a": "new"})
    else:
        assert {"a": "old", "b": "old"} in whole and {"a": "new"} in whole
    if cut == 4:
        assert sorted(p.name for p in tmp_path.iterdir()) == ["adapters"]
        assert _contents(old) == {"a": "new"}
