"""The run directory: which checkpoints count and in what order, pruning, resume choice, and the
metrics file cut back to the resumed step."""

import json
import os
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch

from tinygpt.checkpoint import CheckpointError
from tinygpt.config import ModelConfig
from tinygpt.files import LockedError
from tinygpt.model import TinyDecoderModel
from tinygpt.rundir import RunDir, check_run_name
from tinygpt.tokenizer import CharTokenizer

TOKENIZER = CharTokenizer.from_text("abcdefg \n")
CONFIG = ModelConfig.preset("seed", vocab_size=TOKENIZER.vocab_size, max_seq=8)
_ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


def _save(run, step):
    torch.manual_seed(step)
    return run.save(model=TinyDecoderModel(CONFIG), tokenizer=TOKENIZER, step=step,
                    state={"step": step}, meta={})


def _names(paths):
    return [p.name for p in paths]


def test_listing_ignores_temporaries_and_lookalikes(tmp_path):
    run = RunDir(tmp_path)
    _save(run, 2)
    for name in (".tmp-ckpt-x1y2", ".tmp-ckpt-trash-ckpt-00000001-4242", "ckpt-00000003.tmp",
                 "ckpt-final", "old-ckpt-00000004"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"\0" * 8)
    (tmp_path / "ckpt-00000005").write_text("a file, not a checkpoint directory")
    assert _names(run.checkpoints()) == ["ckpt-00000002"] and run.latest().name == "ckpt-00000002"
    checkpoint, state = run.load(run.latest())
    assert checkpoint.step == 2 and state == {"step": 2}


def test_newest_is_by_step_not_by_name(tmp_path):
    """Past 8 digits, `ckpt-100000000` sorts before `ckpt-99999999` as a string."""
    run = RunDir(tmp_path, keep=2)
    for step in (99_999_999, 100_000_000):
        _save(run, step)
    assert _names(run.checkpoints()) == ["ckpt-99999999", "ckpt-100000000"]
    assert run.load(run.latest())[0].step == 100_000_000


def test_pruning_keeps_the_newest_n(tmp_path):
    run = RunDir(tmp_path, keep=2)
    (tmp_path / ".tmp-ckpt-killed").mkdir(parents=True)  # left by a writer killed mid-write
    for step in (1, 2, 3, 4):
        _save(run, step)
    assert _names(run.checkpoints()) == ["ckpt-00000003", "ckpt-00000004"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-00000003", "ckpt-00000004"]
    with pytest.raises(ValueError, match="keep must be a positive integer, got 0"):
        _save(RunDir(tmp_path / "other", keep=0), 1)


def test_resume_from_picks_the_newest_or_refuses_a_fresh_start_over_a_run(tmp_path):
    run = RunDir(tmp_path / "r")
    assert run.resume_from(resume=False) is None
    # A mistyped --name with --resume must not start a new run silently.
    with pytest.raises(CheckpointError, match=r"cannot resume: run directory .*r' holds no "
                                              r"checkpoint; check --name, or drop --resume"):
        run.resume_from(resume=True)
    _save(run, 7)
    assert run.resume_from(resume=True).name == "ckpt-00000007"
    with pytest.raises(CheckpointError, match="already has checkpoints; pass --resume"):
        run.resume_from(resume=False)


def test_metrics_are_cut_back_to_the_resumed_step(tmp_path):
    """Steps logged after the checkpoint (and a line cut short by a kill) are dropped: they will
    be trained and logged again. The kept lines are the original bytes."""
    run = RunDir(tmp_path)
    run.truncate_metrics(3)  # no file yet: nothing to do
    assert not run.metrics_path.exists()
    for step in range(1, 7):
        run.append_metrics({"step": step, "train_loss": 1.0 / step, "lr": 0.1})
    original = run.metrics_path.read_text().splitlines(keepends=True)
    with open(run.metrics_path, "a") as f:
        f.write('{"step": 7, "train_lo')
    run.truncate_metrics(4)
    assert run.metrics_path.read_text() == "".join(original[:4])
    assert [r["step"] for r in run.read_metrics()] == [1, 2, 3, 4]
    run.append_metrics({"step": 5, "train_loss": 0.5, "lr": 0.1})
    assert [json.loads(line)["step"] for line in run.metrics_path.read_text().splitlines()] == \
        [1, 2, 3, 4, 5]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # no temporary left


def test_loss_curve_is_drawn_from_the_metrics(tmp_path):
    run = RunDir(tmp_path)
    for step in range(1, 11):
        run.append_metrics({"step": step, "train_loss": 2.0 / step, "val_loss": 2.5 / step})
    assert run.plot_loss_curve() == tmp_path / "loss_curve.png"
    assert run.loss_curve_path.stat().st_size > 1000


@pytest.mark.parametrize("name", ["a/b", "", ".", "..", "../x", "/abs", "a\0b"])
def test_run_names_must_be_one_plain_directory_name(name):
    with pytest.raises(ValueError, match="must be one plain directory name"):
        check_run_name(name)


@pytest.mark.parametrize("name", ["r", "gpt2-20260101", "a.b", "..x", "ünï"])
def test_plain_run_names_pass(name):
    assert check_run_name(name) == name


def test_metrics_refuse_numbers_json_cannot_hold(tmp_path):
    run = RunDir(tmp_path)
    with pytest.raises(ValueError, match="not JSON compliant"):
        run.append_metrics({"step": 1, "lr": float("inf")})
    assert not run.metrics_path.exists() or run.metrics_path.read_text() == ""


def test_a_fresh_start_empties_the_metrics(tmp_path):
    run = RunDir(tmp_path)
    run.append_metrics({"step": 1, "train_loss": 3.0})
    run.truncate_metrics(0)
    assert run.read_metrics() == [] and run.metrics_path.read_text() == ""


def _holder(path):
    """A separate process that takes the run's lock, says so, and waits on its stdin."""
    code = ("import sys; from tinygpt.rundir import RunDir\n"
            f"with RunDir({str(path)!r}).lock():\n"
            "    print('locked', flush=True); sys.stdin.read()\n")
    process = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True, env=_ENV)
    assert process.stdout.readline() == "locked\n"
    return process


def test_the_lock_names_its_holder_and_dies_with_it(tmp_path):
    """A second process is refused with the holder's pid; once the holder is killed (SIGKILL:
    no clean-up runs) the kernel has dropped the lock and the run can be taken."""
    holder = _holder(tmp_path)
    try:
        with pytest.raises(LockedError, match=rf"run directory '{tmp_path}' is in use by process "
                                              rf"{holder.pid} \(lock '{tmp_path / '.lock'}'\)"):
            with RunDir(tmp_path).lock():
                pass
    finally:
        holder.kill()
        holder.wait()
    with RunDir(tmp_path).lock():
        assert (tmp_path / ".lock").read_text() == f"{os.getpid()}\n"
    holder = _holder(tmp_path)  # released on a clean exit too, and the file deleted
    holder.communicate("")
    assert not (tmp_path / ".lock").exists()
    with RunDir(tmp_path).lock():
        pass


def test_a_lock_file_deleted_under_a_contender_is_not_taken_for_the_lock(tmp_path, monkeypatch):
    """A contender opens the lock file just as its holder finishes and deletes it, and a third
    process locks the new file: the contender's flock on the deleted file succeeds, but it must
    see that the path now names another file, and be refused by the third process's lock."""
    import fcntl

    import tinygpt.files as files

    path = tmp_path / ".lock"
    path.write_text("")  # the file of a holder that is about to finish
    real, third, started = fcntl.flock, ExitStack(), []

    def flock(fd, operation):
        if not started:  # once only: the third process's own flock is the real one
            started.append(True)
            path.unlink()  # the holder finishes
            third.enter_context(files.exclusive_lock(path, "the run"))  # the third one starts
        return real(fd, operation)

    monkeypatch.setattr(files.fcntl, "flock", flock)
    with third, pytest.raises(LockedError, match=f"the run is in use by process {os.getpid()} "):
        with files.exclusive_lock(path, "the run"):
            pass


def test_a_full_disk_while_logging_names_the_metrics_file(tmp_path, monkeypatch):
    import builtins
    import errno

    from tinygpt.files import DiskFullError

    run = RunDir(tmp_path)
    run.append_metrics({"step": 1, "train_loss": 1.0})
    real_open = builtins.open

    def full(file, mode="r", *args, **kwargs):
        if str(file).startswith(str(tmp_path)) and mode in ("a", "w"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", full)
    with pytest.raises(DiskFullError, match=rf"^cannot append to '{run.metrics_path}': no space "
                                            rf"left on the device\.$"):
        run.append_metrics({"step": 2, "train_loss": 0.5})
    with pytest.raises(DiskFullError, match=rf"^cannot rewrite '{run.metrics_path}': no space "
                                            rf"left on the device; the file was left as it was\.$"):
        run.truncate_metrics(0)
    monkeypatch.undo()
    assert run.read_metrics() == [{"step": 1, "train_loss": 1.0}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
