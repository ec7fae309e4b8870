"""Crash-safe file writes, permissions that follow the umask, full-disk errors that say so, and an
exclusive lock on a directory, shared by checkpoints, runs, adapters, tokenizers and the corpus
cache."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# Errors that mean the disk (or the user's quota) has no room for what was being written.
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(OSError):
    """A write failed for lack of space; the message names the path and what was kept."""

    def __init__(self, message: str):
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return self.strerror


class LockedError(ValueError):
    """Another process holds the lock on a directory that this process was about to write."""


def is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in _NO_SPACE


def current_umask() -> int:
    """The process umask. POSIX can only read it by setting it, so it is set back at once."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: Path, *, directory: bool = False) -> None:
    """Give `path` the mode an ordinary `open` or `mkdir` would have given it (0666 or 0777 less
    the umask). `tempfile.mkstemp` and `mkdtemp` create 0600 and 0700, which would make a file
    written through a temporary unreadable to the collaborators the umask lets in."""
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


def make_temp_dir(parent: Path, prefix: str) -> Path:
    """A new, uniquely named directory in `parent` with the umask's permissions."""
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
    follow_umask(tmp, directory=True)
    return tmp


def replace_dir(new: Path, old: Path) -> None:
    """Put the finished directory `new` in the place of `old`. A directory cannot be renamed over
    a non-empty one, so an existing `old` is renamed away first (to a hidden, unique name beside
    it) and deleted last: a crash between the two renames leaves the old contents whole, never a
    mix of old and new. Raises OSError when `old` reappears between the two renames (another
    process put its own there)."""
    moved = None
    if old.exists():
        moved = old.with_name(f".{old.name}.{os.getpid()}.{secrets.token_hex(4)}.old")
        os.rename(old, moved)
    os.rename(new, old)
    fsync_dir(old.parent)
    if moved is not None:
        shutil.rmtree(moved, ignore_errors=True)


def write_file(path: Path, data: bytes) -> None:
    """Create `path` (it must not exist), write `data` and fsync it. The mode follows the umask."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make the directory's entries (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over `path`, so that a
    crash leaves either the old file or the new one, never a torn one. The file's mode follows
    the umask, as a plain `open` would; a full disk raises `DiskFullError` naming `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as error:  # named after the file asked for, not the temporary one
        raise OSError(error.errno, error.strerror, str(path)) from error
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        follow_umask(Path(tmp))
        os.replace(tmp, path)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        if is_disk_full(error):
            raise DiskFullError(
                f"cannot write {str(path)!r}: no space left on the device; the file was left as "
                f"it was."
            ) from error
        raise


@contextmanager
def exclusive_lock(lock_path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive `flock` on the file `lock_path` for the `with` block, or raise
    `LockedError` at once, naming the holder's pid (which the holder writes into the file).

    The kernel drops an flock when its holder's descriptor closes, and so when the process dies,
    even by SIGKILL: a crash never leaves a stale lock, only a stale file that the next holder
    reuses. A clean exit deletes the file while still holding the lock; a process that opened
    the old file in the meantime sees, once it gets the lock, that the path names another file
    (or none) and starts again on the new one, so two processes never both hold "the" lock.
    """
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = _lock_current_file(lock_path, what)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        yield
    finally:
        lock_path.unlink(missing_ok=True)
        os.close(fd)  # releases the lock


def _lock_current_file(lock_path: Path, what: str) -> int:
    """A descriptor of the file now at `lock_path`, exclusively flocked."""
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise LockedError(
                f"{what} is in use by process {holder} (lock {str(lock_path)!r}); wait for it to "
                f"finish or choose another name."
            ) from None
        try:
            ours = os.stat(lock_path)
            mine = os.fstat(fd)
            if (ours.st_dev, ours.st_ino) == (mine.st_dev, mine.st_ino):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # the holder deleted this file as it finished: lock the new one


def read_json(path: Path, *, missing: Exception,
              invalid: Callable[[Exception], Exception]) -> Any:
    """The JSON value in the UTF-8 file `path`. Raises `missing` when there is no such file, and
    `invalid(error)` when its bytes are not UTF-8 JSON: each caller names the file its own way."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise missing from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise invalid(error) from None
