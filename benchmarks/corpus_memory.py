"""Peak memory of the corpus pipeline on a large corpus: `python -m benchmarks.corpus_memory`.

Writes a synthetic corpus of `--megabytes` MB (default 200) of English-like words, then runs, each
in a fresh process, the commands that read it: `prepare` (describe the corpus), `train` for a few
steps (its first run encodes the token cache; the second reuses it) and `heads` on the run just
trained. Each command's peak resident memory is read with `resource.getrusage(RUSAGE_CHILDREN)`
in a small parent process of its own, so one command's peak never hides another's. Every command
also runs on a 1 MB corpus: that peak is the process's own floor (Python, torch, the model), and
the difference is what the corpus costs. The corpus is read in pieces and its tokens are
memory-mapped, so that difference stays a few tens of MB, far below the corpus size.

Two floors that no TinyGPT code touches are measured in the same run, so the figures can be read
against them: `import torch`, and one AdamW step on a 2 x 2 Linear. The second is what any
training loop costs under torch 2.13: constructing a `torch.optim` optimizer imports
`torch._dynamo` (its methods are wrapped to keep the compiler out, and the wrapper imports the
compiler on first call), about 70 MB resident for the rest of the process.

It measures memory, not time, and is not part of the test suite.
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import tempfile
from pathlib import Path

TARGET_MB = 300.0
WORDS = ("the of and to in that is was he for it with as his on be at by had not are but from or "
         "have an they which one you were her all she there would their we him been has when who "
         "will more no if out so said what up its about into than them can only other new some "
         "could time these two may then do first any my now such like our over man me even most "
         "made after also did many before must through back years where much your way well down "
         "ROMEO JULIET thou thee thy doth hath wherefore café naïve").split()

# The floors: torch imported, and torch's smallest training step (an optimizer constructed).
FLOORS = {
    "floor: import torch": "import torch",
    "floor: one AdamW step on a 2 x 2 Linear": (
        "import torch; m = torch.nn.Linear(2, 2); o = torch.optim.AdamW(m.parameters()); "
        "m(torch.ones(2)).sum().backward(); o.step()"),
}

# The parent of each measured command: run it, then print the peak RSS of its children in kB.
MEASURE = ("import resource, subprocess, sys; done = subprocess.run(sys.argv[1:]); "
           "print(done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def write_corpus(path: Path, megabytes: float, seed: int = 0) -> int:
    """Lines of random words until the file holds `megabytes` MB; written line by line."""
    rng = random.Random(seed)
    target, written = int(megabytes * 1e6), 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            line = " ".join(rng.choices(WORDS, k=12)) + ".\n"
            f.write(line)
            written += len(line.encode("utf-8"))
    return written


def peak_mb(command: list[str]) -> float:
    """The peak resident memory of `command` in MB, measured in a parent process of its own."""
    done = subprocess.run([sys.executable, "-c", MEASURE, *command], capture_output=True,
                          text=True, check=True)
    code, kilobytes = done.stdout.split()[-2:]
    if code != "0":
        raise SystemExit(f"{' '.join(command)} failed with exit code {code}")
    return int(kilobytes) / 1024


def commands(root: Path, corpus: Path, tag: str) -> dict[str, list[str]]:
    """The measured command lines on `corpus`, their files under `root`, runs named after `tag`."""
    tinygpt = [sys.executable, "-m", "tinygpt"]
    corpus_args = ["--corpus", str(corpus), "--data-dir", str(root / f"cache-{tag}")]
    train = [*tinygpt, "train", *corpus_args, "--runs-dir", str(root / "runs"), "--config",
             "seed", "--steps", "3", "--batch-size", "4", "--eval-every", "3",
             "--eval-batches", "1", "--save-every", "3", "--device", "cpu"]
    return {
        "prepare": [*tinygpt, "prepare", *corpus_args],
        "train, first run (encodes the cache)": [*train, "--name", f"{tag}-first"],
        "train, cached re-run": [*train, "--name", f"{tag}-second"],
        "heads on the trained run": [*tinygpt, "heads", *corpus_args, "--checkpoint",
                                     str(root / "runs" / f"{tag}-first"), "--windows", "8",
                                     "--device", "cpu"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=float, default=200.0)
    parser.add_argument("--keep", default=None, metavar="DIR",
                        help="work in DIR and keep it (default: a temporary directory)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="corpus-memory-") as scratch:
        root = Path(args.keep or scratch)
        root.mkdir(parents=True, exist_ok=True)
        size = write_corpus(root / "big.txt", args.megabytes)
        write_corpus(root / "small.txt", 1.0)
        big = commands(root, root / "big.txt", "big")
        small = commands(root, root / "small.txt", "small")
        print(f"peak RSS in MB of each command on a {size / 1e6:.0f} MB corpus, beside the same "
              f"command on a 1 MB corpus\n(the process's own floor: Python, torch, the model); "
              f"target: <= {TARGET_MB:.0f} MB")
        print(f"{'command':<40} {'big':>8} {'1 MB':>8} {'corpus':>8}")
        over = []
        for name in big:
            floor, peak = peak_mb(small[name]), peak_mb(big[name])
            if peak > TARGET_MB:
                over.append(name)
            print(f"{name:<40} {peak:8.1f} {floor:8.1f} {peak - floor:+8.1f}")
        for name, code in FLOORS.items():
            print(f"{name:<40} {peak_mb([sys.executable, '-c', code]):8.1f}")
    print(f"over the {TARGET_MB:.0f} MB target: {', '.join(over) if over else 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
