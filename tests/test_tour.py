"""docs/tour.md cannot rot: its ```python blocks run here, in order, in one namespace."""

import re
from pathlib import Path

import torch

TOUR = Path(__file__).resolve().parent.parent / "docs" / "tour.md"


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", markdown, flags=re.S | re.M)


def test_python_blocks_are_found():
    blocks = python_blocks("text\n```python\na = 1\n```\n```bash\nls\n```\n```python\nb = a\n```\n")
    assert blocks == ["a = 1\n", "b = a\n"]


def test_every_snippet_of_the_tour_runs_in_order(tmp_path, monkeypatch):
    blocks = python_blocks(TOUR.read_text(encoding="utf-8"))
    assert len(blocks) >= 10
    monkeypatch.chdir(tmp_path)  # the tour writes its pictures to the working directory
    namespace: dict = {"__name__": "tour"}
    # The tour's matrices are tiny: one thread is barely slower on an idle machine and an order of
    # magnitude faster on a busy one, where two threads fight over the cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for number, block in enumerate(blocks, start=1):
            code = compile(block, f"docs/tour.md block {number}", "exec")
            exec(code, namespace)  # noqa: S102 - running the tour is the point of this test
    finally:
        torch.set_num_threads(threads)
    assert (tmp_path / "attn.png").is_file() and (tmp_path / "attn.html").is_file()
