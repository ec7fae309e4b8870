"""What the command line guarantees when things go wrong: a signal, a second process on the same
run, a full disk, a loss gone non-finite, settings that would train silently wrong.

One table of command -> exit code -> message. Cases with a signal or a lock run the real
`python -m tinygpt` in a fresh process (a signal must reach a real process; a lock must be held
by another one); the others call `main` in-process.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from corpora import synthetic_text

from tinygpt.checkpoint import load_checkpoint
from tinygpt.cli import main

TEXT, _ = synthetic_text("uniform", 3000, n_symbols=6, seed=2)
TINY = ["--config", "seed", "--d-model", "16", "--n-heads", "2", "--n-layers", "1", "--d-ff", "32",
        "--max-seq", "8", "--seed-input-scale", "false", "--batch-size", "4", "--eval-every", "2",
        "--eval-batches", "1"]
REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _train(*extra, name="r"):
    return ["train", "--corpus", "{dir}/corpus.txt", "--data-dir", "{dir}/cache",
            "--runs-dir", "{dir}/runs", "--name", name, *TINY, *extra]


def _finetune(*extra):
    return ["finetune", "--checkpoint", "{dir}/runs/r", "--corpus", "{dir}/corpus.txt",
            "--data-dir", "{dir}/cache", "--batch-size", "2", *extra]


@dataclass
class Case:
    argv: list[str]
    code: int
    message: str  # a pattern for the last line on stderr; "{dir}" is the test's directory
    fresh: bool = False  # run `python -m tinygpt` in a new process
    signal_after: str | None = None  # send SIGTERM once this path exists
    holder: str | None = None  # another process holds this lock while the command runs
    then: str | None = None  # a check of the files afterwards (see `_check_after`)
    patch: dict = field(default_factory=dict)


CASES = {
    "SIGTERM during train saves the step and exits 143": Case(
        _train("--steps", "100000", "--save-every", "100000", "--resume"), 143,
        r"tinygpt: stopped by SIGTERM; saved step (\d+) to {dir}/runs/r/ckpt-0*\1\.",
        fresh=True, signal_after="{dir}/runs/r/.lock", then="checkpoint moved on"),
    "SIGTERM during finetune saves the adapters and exits 143": Case(
        _finetune("--steps", "100000"), 143,
        r"tinygpt: stopped by SIGTERM; saved the adapters of step \d+ to {dir}/runs/r/lora\.",
        fresh=True, signal_after="{dir}/runs/r/.lora.lock", then="adapters load"),
    "a second train on a locked run is refused, naming the holder": Case(
        _train("--steps", "6", "--resume"), 2,
        r"tinygpt: error: run directory '{dir}/runs/r' is in use by process {pid} ",
        fresh=True, holder="run", then="checkpoint unchanged"),
    "a second finetune into locked adapters is refused, naming the holder": Case(
        _finetune("--steps", "2"), 2,
        r"tinygpt: error: adapter directory '{dir}/runs/r/lora' is in use by process {pid} ",
        fresh=True, holder="lora"),
    "a full disk at a save names the path and keeps the previous checkpoint": Case(
        _train("--steps", "6", "--resume"), 2,
        r"tinygpt: error: cannot write checkpoint '{dir}/runs/r/ckpt-00000006': no space left on "
        r"the device; the partial copy was removed and the previous checkpoint "
        r"'{dir}/runs/r/ckpt-00000004' is intact\.$",
        patch={"write": "no space"}, then="checkpoint unchanged"),
    "finetune stops on a NaN loss and keeps the adapters that load": Case(
        _finetune("--steps", "5", "--lr", "1e12"), 2,
        r"tinygpt: error: loss became nan at fine-tuning step \d; stopped without writing "
        r"adapters", then="adapters unchanged"),
    "finetune --batch-size 0": Case(
        _finetune("--steps", "2", "--batch-size", "0"), 2,
        r"tinygpt: error: batch_size must be an integer >= 1, got 0\.$"),
    "--grad-clip nan": Case(_train("--steps", "6", "--grad-clip", "nan", name="n"), 2,
                            r"tinygpt: error: grad_clip must be a finite number, got nan\.$"),
    "--weight-decay -1": Case(_train("--steps", "6", "--weight-decay", "-1", name="n"), 2,
                              r"tinygpt: error: weight_decay must be >= 0, got -1.0\.$"),
    "--lr inf": Case(_train("--steps", "6", "--lr", "inf", name="n"), 2,
                     r"tinygpt: error: lr must be a finite number, got inf\.$"),
    "--name a/b": Case(_train("--steps", "6", name="a/b"), 2,
                       r"tinygpt: error: run name 'a/b' must be one plain directory name"),
    "--name ..": Case(_train("--steps", "6", name=".."), 2,
                      r"tinygpt: error: run name '..' must be one plain directory name"),
    "--resume with a mistyped name": Case(
        _train("--steps", "6", "--resume", name="rr"), 2,
        r"tinygpt: error: cannot resume: run directory '{dir}/runs/rr' holds no checkpoint; "
        r"check --name, or drop --resume"),
    "inspect --html on NaN adapters refuses to write bad JSON": Case(
        ["inspect", "--checkpoint", "{dir}/runs/r", "--lora", "{dir}/nan-lora", "--prompt", "abc",
         "--html", "{dir}/page.html"], 2,
        r"tinygpt: error: the attention weights hold NaN or infinite values"),
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny 4-step run, good adapters beside it and NaN adapters elsewhere (written behind
    `save_lora`'s back, as a damaged or foreign directory would be)."""
    from tinygpt.lora import LoraSettings, add_lora, lora_parameters

    root = tmp_path_factory.mktemp("trained")
    (root / "corpus.txt").write_text(TEXT)
    assert main([a.format(dir=root) for a in _train("--steps", "4")]) == 0
    assert main([a.format(dir=root) for a in _finetune("--steps", "1")]) == 0
    adapted = add_lora(load_checkpoint(root / "runs" / "r").model, LoraSettings(rank=2))
    with torch.no_grad():
        for p in lora_parameters(adapted).values():
            p.fill_(float("nan"))
    adapted.save_pretrained(str(root / "nan-lora"))
    return root


@pytest.mark.parametrize("name", CASES)
def test_command_exit_code_and_message(name, trained, tmp_path, capsys, monkeypatch):
    case = CASES[name]
    shutil.copytree(trained, tmp_path, dirs_exist_ok=True)
    for lock in tmp_path.rglob(".*lock"):  # a command creates its lock file once it catches signals
        lock.unlink()
    before = _snapshot(tmp_path)
    argv = [a.format(dir=tmp_path) for a in case.argv]
    holder = _hold(case.holder, tmp_path) if case.holder else None
    try:
        if case.fresh:
            code, err = _run_fresh(argv, case.signal_after and case.signal_after.format(
                dir=tmp_path))
        else:
            _apply(case.patch, monkeypatch)
            capsys.readouterr()
            code, err = main(argv), capsys.readouterr().err
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()
    lines = [line for line in re.split(r"[\r\n]", err) if line.strip()]
    pattern = case.message.format(dir=re.escape(str(tmp_path)),
                                  pid=holder.pid if holder else None)
    assert code == case.code, err[-2000:]
    assert "Traceback" not in err and re.search(pattern, lines[-1]), err[-2000:]
    assert sum(line.startswith("tinygpt:") for line in lines) == 1, err[-2000:]
    _check_after(case.then, tmp_path, before)
    if case.holder == "run":  # the holder was killed: the kernel dropped its lock
        assert main([a.format(dir=tmp_path) for a in _train("--steps", "5", "--resume")]) == 0


def _snapshot(root: Path) -> dict[str, bytes]:
    files = sorted((root / "runs" / "r").rglob("*"))
    return {str(p.relative_to(root)): p.read_bytes()
            for p in files if p.is_file() and not p.name.endswith("lock")}


def _check_after(then: str | None, root: Path, before: dict[str, bytes]) -> None:
    run = root / "runs" / "r"
    if then == "checkpoint unchanged":
        assert {k: v for k, v in _snapshot(root).items() if "ckpt-" in k} == \
            {k: v for k, v in before.items() if "ckpt-" in k}
        assert not [p for p in run.iterdir() if p.name.startswith(".tmp")]
    elif then == "checkpoint moved on":
        assert load_checkpoint(run).step > 4
    elif then == "adapters unchanged":
        assert {k: v for k, v in _snapshot(root).items() if "lora" in k} == \
            {k: v for k, v in before.items() if "lora" in k}
    elif then == "adapters load":
        from tinygpt.lora import load_lora

        load_lora(load_checkpoint(run).model, run / "lora")
        assert not [p for p in run.iterdir() if p.name.startswith(".tmp")]


def _apply(patch: dict, monkeypatch) -> None:
    if patch.get("write") == "no space":
        import tinygpt.checkpoint as module

        def full(path, data):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))

        monkeypatch.setattr(module, "_write_bytes", full)


def _hold(which: str, root: Path) -> subprocess.Popen:
    """Another process holding the run's lock ("run") or its adapters' ("lora")."""
    lock = (f"RunDir({str(root / 'runs' / 'r')!r}).lock()" if which == "run"
            else f"adapter_lock({str(root / 'runs' / 'r' / 'lora')!r})")
    code = ("import sys\nfrom tinygpt.lora import adapter_lock\nfrom tinygpt.rundir import RunDir\n"
            f"with {lock}:\n    print('locked', flush=True)\n    sys.stdin.read()\n")
    process = subprocess.Popen([sys.executable, "-c", code], env=ENV, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline() == "locked\n"
    return process


def _run_fresh(argv: list[str], signal_after: str | None) -> tuple[int, str]:
    """Run `python -m tinygpt ARGV`; with `signal_after`, send SIGTERM once that path exists
    (the command creates it after it has started to catch signals)."""
    process = subprocess.Popen([sys.executable, "-m", "tinygpt", *argv], env=ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if signal_after is not None:
        deadline = time.monotonic() + 120
        while not Path(signal_after).exists():
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "timed out"
            time.sleep(0.02)
        process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=240)
    return process.returncode, err


def _can_mount_tmpfs() -> bool:
    """Whether this user may make a private mount namespace (unshare -rm) to mount a tmpfs in:
    many Linux hosts allow it unprivileged, some (AppArmor-restricted ones) do not."""
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode == 0
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="no unprivileged mount namespace to mount a "
                                                   "small tmpfs in (unshare -rm)")
@pytest.mark.parametrize("size_kib, message", [
    (128, r"tinygpt: error: cannot write checkpoint '{runs}/r/ckpt-00000002': no space left on "
          r"the device; the partial copy was removed and the previous checkpoint "
          r"'{runs}/r/ckpt-00000001' is intact\.$"),
    (48, r"tinygpt: error: cannot write checkpoint '{runs}/r/ckpt-00000001': no space left on "
         r"the device; the partial copy was removed and no earlier checkpoint exists\.$"),
])
def test_a_really_full_disk(tmp_path, size_kib, message):
    """The same guarantee on a real full file system: a tmpfs of `size_kib` KiB (one checkpoint
    of this model takes about 76 KiB there) as --runs-dir, mounted in a private namespace. What
    the run directory holds afterwards is listed from inside the namespace."""
    runs = tmp_path / "runs"
    runs.mkdir()
    (tmp_path / "corpus.txt").write_text(TEXT)
    argv = [a.format(dir=tmp_path) for a in _train("--steps", "3", "--save-every", "1")]
    listing = ("import sys; from pathlib import Path; "
               "from tinygpt.checkpoint import checkpoint_dirs, load_checkpoint; "
               "run = Path(sys.argv[1]) / 'r'; found = checkpoint_dirs(run); "
               "print(load_checkpoint(run).step if found else None, "
               "sorted(p.name for p in run.iterdir() if p.name.startswith('.tmp')))")
    script = (f'mount -t tmpfs -o size={size_kib}k tmpfs "$1" || exit 99\n'
              f'"$2" -m tinygpt "${{@:4}}" 2> "$3/err"; echo $? > "$3/code"\n'
              f'"$2" -c "{listing}" "$1" > "$3/after"\n')
    done = subprocess.run(["unshare", "-rm", "bash", "-c", script, "bash", str(runs),
                           sys.executable, str(tmp_path), *argv], env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    err = (tmp_path / "err").read_text()
    assert (tmp_path / "code").read_text() == "2\n", err[-2000:]
    assert "Traceback" not in err
    assert re.search(message.format(runs=re.escape(str(runs))), err.splitlines()[-1]), err[-2000:]
    step, temporaries = (tmp_path / "after").read_text().rsplit(" ", 1)
    assert (step, temporaries.strip()) == ("1" if size_kib == 128 else "None", "[]")
