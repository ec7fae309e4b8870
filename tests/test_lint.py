"""`make lint` judges the code alone: folders the commands create beside it change nothing.

ruff sorts an import by where it finds the module. The tests import their helpers (`tests/runs.py`,
`tests/strategies.py`, ...) by bare name, and `tinygpt train` creates a `runs/` folder at the
project root; were `runs` classified by what is on disk, the same files would pass `make lint`
on a fresh clone and fail it after `make train`.
"""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Folders the documented commands create at the project root (runs, caches, exports).
MADE_BY_COMMANDS = ["runs", "exported", "gpt2-files"]


def ruff() -> str:
    """The ruff pinned in the dev extra: beside this interpreter, else on PATH."""
    beside = Path(sys.executable).parent / "ruff"
    found = str(beside) if beside.exists() else shutil.which("ruff")
    assert found, "ruff (pinned in the dev extra) is not installed"
    return found


def lint(project: Path) -> tuple[int, str]:
    done = subprocess.run([ruff(), "check", "--no-cache", "--output-format", "concise", "tests"],
                          cwd=project, capture_output=True, text=True, timeout=120)
    return done.returncode, done.stdout


def test_folders_made_by_commands_do_not_change_the_lint_verdict(tmp_path):
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    for folder in ROOT.iterdir():  # the project's own modules, which ruff finds on disk
        if folder.is_dir() and folder.name[0] not in "._" and folder.name not in MADE_BY_COMMANDS:
            shutil.copytree(folder, tmp_path / folder.name,
                            ignore=lambda _, names: [n for n in names if not n.endswith(".py")
                                                     and "." in n])
    clean = lint(tmp_path)
    for name in MADE_BY_COMMANDS:
        (tmp_path / name).mkdir()
    assert lint(tmp_path) == clean
