"""Inspection refuses what it cannot mean: negative head indices, a threshold that no score can
be compared with, no windows at all; and it reads a memory-mapped stream window by window."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from tinygpt import ModelConfig, TinyDecoderModel
from tinygpt.inspection import (
    classify_heads,
    eval_windows,
    run_with_interventions,
    zero_heads,
)

CONFIG = ModelConfig.preset("seed", vocab_size=11, max_seq=8)


@pytest.mark.parametrize("bad", [-1, -4, 1.0, True])
def test_zero_heads_refuses_a_head_that_is_not_a_count_from_0(bad):
    with pytest.raises(ValueError, match=f"a head index must be an integer >= 0, got {bad!r}"):
        zero_heads(bad)


def test_zero_heads_refuses_a_head_past_the_last():
    torch.manual_seed(0)
    model = TinyDecoderModel(CONFIG).eval()
    idx = torch.tensor([[1, 2, 3, 4]])
    with pytest.raises(ValueError, match=r"head 4 is outside 0\.\.3\."):
        run_with_interventions(model, idx, {"blocks.0.attention.hook_z": zero_heads(4)})
    last = run_with_interventions(model, idx, {"blocks.0.attention.hook_z": zero_heads(3)})
    assert not torch.equal(last, model(idx))


@pytest.mark.parametrize("bad", [float("nan"), -0.1, 1.5, float("inf")])
def test_classify_heads_refuses_a_threshold_outside_0_to_1(bad):
    model = TinyDecoderModel(CONFIG).eval()
    with pytest.raises(ValueError, match="threshold must be a number in \\[0, 1\\]"):
        classify_heads(model, torch.tensor([[1, 2, 3, 4]]), threshold=bad)


@pytest.mark.parametrize("bad", [0, -3, 2.0, True])
def test_eval_windows_refuses_no_windows(bad):
    with pytest.raises(ValueError, match=f"the number of windows must be an integer >= 1, got "
                                         f"{bad!r}"):
        eval_windows(list(range(100)), 8, bad)


def test_eval_windows_read_only_their_windows_of_a_memory_mapped_stream(tmp_path):
    ids = np.arange(1000, dtype=np.uint16) % 97
    ids.tofile(tmp_path / "tokens.bin")
    stream = np.memmap(tmp_path / "tokens.bin", dtype=np.uint16, mode="r")
    for source in (stream, ids.tolist(), torch.as_tensor(ids.astype(np.int64))):
        x, y = eval_windows(source, 8, 5)
        assert x.dtype == y.dtype == torch.long and x.shape == (5, 8)
        assert torch.equal(x, eval_windows(ids.tolist(), 8, 5)[0])
    touched = []

    class Spy(np.ndarray):
        def __getitem__(self, key):
            touched.append(key)
            return super().__getitem__(key)

    eval_windows(ids.view(Spy), 8, 5)
    assert len(touched) == 5 and all(k.stop - k.start == 9 for k in touched)


def test_eval_windows_copies_out_of_a_read_only_int64_map_without_a_warning(tmp_path):
    """An int64 map would be shared, not copied, by `torch.as_tensor`, and torch warns (once per
    process, so in a fresh one) that writing to such a tensor is undefined."""
    (np.arange(100, dtype=np.int64) % 7).tofile(tmp_path / "tokens.bin")
    code = ("import numpy as np, sys; from tinygpt.inspection import eval_windows; "
            "x, _ = eval_windows(np.memmap(sys.argv[1], dtype=np.int64, mode='r'), 8, 3); "
            "x += 1")
    done = subprocess.run([sys.executable, "-W", "error", "-c", code, str(tmp_path / "tokens.bin")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
