"""`make bench`: the --quick run is complete and well-formed (never its times), and the pieces it
trusts (agreement check, FLOP count, CPU peak memory, the fused variant) do what they claim."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.bench import QUICK, check_targets, devices
from benchmarks.flops import attention_flops
from benchmarks.harness import paired_ratio, peak_memory
from benchmarks.implementations import (
    IMPLEMENTATIONS,
    FusedAttention,
    check_attention_agreement,
    fused_twin,
)
from tinygpt.attention import MultiHeadAttention, causal_mask

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("## Attention, cpu float32", "## Targets", "## Context sweep, cpu float32",
            "## Training step of the whole model, cpu float32", "## Positions: training step",
            "## Generation")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--threads", "1", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # Progress lines only: the profiler's own chatter (kineto's USDT lines) is silenced.
    assert "[" in done.stderr and "USDT" not in done.stderr, done.stderr[-3000:]
    return done.stdout, json.loads((out / "bench.json").read_text()), out


def test_quick_table_has_every_section_and_row(quick_run):
    stdout, results, out = quick_run
    assert stdout.strip() == (out / "bench.md").read_text().strip()
    for section in SECTIONS:
        assert section in stdout
    assert "CUDA: " in stdout and "Dense matmul roof, cpu float32" in stdout
    attention_lines = [line for line in stdout.splitlines()
                       if line.startswith("| seed (2, 8, 16, 2) |")]
    assert len(attention_lines) == len(IMPLEMENTATIONS) * 2  # forward, forward+backward
    for label in IMPLEMENTATIONS.values():
        assert sum(label in line for line in attention_lines) == 2
    assert "nan" not in stdout.lower().replace("nanosec", "")


def test_quick_json_is_complete(quick_run):
    _, results, _ = quick_run
    assert results["quick"] is True
    assert results["machine"]["cpu"] and results["machine"]["torch"] == torch.__version__
    assert results["machine"]["threads"] == 1 and results["machine"]["malloc"]
    groups = [("cpu", "float32")] + ([("cuda", "float32"), ("cuda", "bfloat16")]
                                     if torch.cuda.is_available() else [])
    assert [(m["device"], m["dtype"]) for m in results["matmul"]] == groups
    assert all(m["flops_per_s"] > 0 for m in results["matmul"])

    attention = results["attention"]
    assert len(attention) == len(groups) * len(QUICK.shapes) * len(IMPLEMENTATIONS) * 2
    for row in attention:
        assert row["median_s"] > 0 and row["iqr_s"] >= 0 and row["blocks"] >= 1
        assert row["flops"] == attention_flops(row["batch"], row["context"], row["d_model"],
                                               backward=row["pass"] == "forward+backward")
        assert math.isfinite(row["fraction_of_matmul"]) and row["fraction_of_matmul"] > 0
        assert math.isfinite(row["ratio_vs_mha"]) and row["max_abs_diff_vs_mha"] < 1e-3
        assert row["ratio_q1"] <= row["ratio_vs_mha"] <= row["ratio_q3"]
        assert len(row["round_medians_s"]) == QUICK.budget.rounds
        assert row["min_s"] <= row["median_s"]
        if row["impl"] == "mha":
            assert row["ratio_vs_mha"] == row["ratio_q1"] == row["ratio_q3"] == 1.0

    sweep = results["sweep"]
    assert len(sweep) == len(groups) * len(QUICK.sweep_contexts) * len(IMPLEMENTATIONS)
    assert {row["context"] for row in sweep} == set(QUICK.sweep_contexts)
    assert all(isinstance(row["peak_bytes"], int) and row["peak_bytes"] > 0 for row in sweep)

    model = results["model"]
    assert len(model) == len(groups) * len(QUICK.model_configs) * len(IMPLEMENTATIONS)
    assert all(row["tokens_per_s"] > 0 for row in model)

    positions = results["positions"]
    assert [row["position"] for row in positions] == ["learned", "alibi", "rope"] * (
        1 + torch.cuda.is_available())
    assert all(row["ratio_vs_learned"] > 0 and isinstance(row["met"], bool) for row in positions)
    assert all(row["ratio_vs_learned"] == 1.0 for row in positions if row["position"] == "learned")

    generation = results["generation"]
    n_devices = 1 + torch.cuda.is_available()
    assert [row["use_cache"] for row in generation] == [False, True] * n_devices
    assert all(row["tokens_per_s"] > 0 for row in generation)

    assert len(results["targets"]) == 2 * len(QUICK.shapes) * (1 + torch.cuda.is_available())
    assert all(isinstance(t["met"], bool) and t["ratio"] > 0 for t in results["targets"])


def test_a_gpu_adds_float32_and_bfloat16_cuda_columns_to_the_cpu_one(monkeypatch):
    # No GPU here: pretend one, to check which runs the same command would make on a GPU machine.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "Imaginary GPU")
    runs, line = devices()
    assert [(device.type, dtype) for device, dtype in runs] == [
        ("cpu", torch.float32), ("cuda", torch.float32), ("cuda", torch.bfloat16)]
    assert "Imaginary GPU" in line
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    runs, line = devices()
    assert [(device.type, dtype) for device, dtype in runs] == [("cpu", torch.float32)]
    assert line.startswith("CUDA: absent")


def test_quick_plot_is_a_png(quick_run):
    _, _, out = quick_run
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_paired_ratio_cancels_load_that_hits_both_sides_of_a_round():
    # Rounds 2 and 4 ran under load that doubled both times: each pair still says 0.9.
    reference = [1.0, 2.0, 1.0, 2.0, 1.0]
    faster = [0.9, 1.8, 0.9, 1.8, 0.9]
    ratio = paired_ratio(faster, reference)
    assert ratio.median == pytest.approx(0.9) and ratio.q1 == pytest.approx(0.9)
    assert ratio.q3 == pytest.approx(0.9)
    # A burst during one side's rounds only shows up as spread, not as a shifted median.
    ratio = paired_ratio([0.9, 0.9, 3.0, 0.9, 0.9], [1.0] * 5)
    assert ratio.median == pytest.approx(0.9) and ratio.q3 == pytest.approx(0.9)
    with pytest.raises(ValueError):
        paired_ratio([1.0, 2.0], [1.0])  # rounds that do not pair up are a bug, not a ratio


def test_targets_are_judged_on_paired_ratios():
    # Load doubled both sides in rounds 3-4, and a burst hit only the compiled side in round 5.
    # Overall medians say compiled is 1.9x the fused kernel; every round but one says 0.95.
    def row(impl, rounds):
        return {"impl": impl, "pass": "forward+backward", "dtype": "float32", "name": "baby",
                "device": "cpu", "median_s": sorted(rounds)[2], "round_medians_s": rounds}

    rows = [row("hand", [0.9, 0.9, 1.8, 1.8, 0.9]), row("mha", [1.0, 1.0, 2.0, 2.0, 1.0]),
            row("compiled", [0.95, 0.95, 1.9, 1.9, 5.0]), row("sdpa", [1.0, 1.0, 2.0, 2.0, 1.0])]
    assert rows[2]["median_s"] / rows[3]["median_s"] == pytest.approx(1.9)  # unpaired: a false no
    results = {(t["impl"], t["against"]): t for t in check_targets(rows)}
    assert set(results) == {("hand", "mha"), ("compiled", "sdpa")}
    assert results["hand", "mha"]["ratio"] == pytest.approx(0.9) and results["hand", "mha"]["met"]
    compiled = results["compiled", "sdpa"]
    assert compiled["ratio"] == pytest.approx(0.95) and compiled["met"]
    assert compiled["ratio_q3"] == pytest.approx(0.95)  # the burst is one round of five


def test_attention_flops_formula():
    # b=2, t=3, E=4: 8·2·3·16 + 4·2·9·4 = 768 + 288
    assert attention_flops(2, 3, 4, backward=False) == 1056
    assert attention_flops(2, 3, 4, backward=True) == 3 * 1056


def test_cpu_peak_memory_sees_torch_allocations():
    def allocate_and_free():
        big = torch.ones(1 << 20)  # 4 MiB, freed on return
        return float(big[0])

    peak = peak_memory(allocate_and_free, torch.device("cpu"))
    assert 4 * 2**20 <= peak < 5 * 2**20
    assert peak_memory(lambda: None, torch.device("cpu")) == 0


def test_fused_variant_matches_hand_written_and_refuses_a_boolean_mask():
    torch.manual_seed(0)
    hand = MultiHeadAttention(12, 3).double()
    fused = fused_twin(hand)
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    mask = causal_mask(5).double()
    torch.testing.assert_close(fused(x, attn_mask=mask)[0], hand(x, attn_mask=mask)[0],
                               rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="additive float mask"):
        fused(x, attn_mask=torch.isinf(mask))
    assert isinstance(fused, FusedAttention)


def test_agreement_check_catches_a_leaky_implementation():
    torch.manual_seed(0)
    hand = MultiHeadAttention(8, 2)
    fused = fused_twin(hand)
    implementations = {
        "mha": lambda x, mask: fused(x, attn_mask=mask)[0],
        "hand": lambda x, mask: hand(x, attn_mask=mask)[0],
        "leaky": lambda x, mask: hand(x)[0],  # forgot the mask: sees the future
    }
    with pytest.raises(RuntimeError, match="leaky disagrees with mha"):
        check_attention_agreement(implementations, torch.randn(2, 6, 8), dtype=torch.float32)
    del implementations["leaky"]
    assert check_attention_agreement(implementations, torch.randn(2, 6, 8),
                                     dtype=torch.float32)["hand"] < 1e-5


def test_rolling_cost_rows_are_one_per_window_and_a_ratio_for_each_policy():
    """The shape of the rows only: timings are not asserted on a shared machine."""
    from benchmarks.generation import _format, rolling_cost

    with torch.inference_mode():
        rows = rolling_cost(quick=True)
    assert [row["measure"] for row in rows] == [
        "rolling ms/token, tokens 1-8", "rolling ms/token, tokens 9-16",
        "rolling ms/token, tokens 17-24", "rolling cost, last / first window",
        "exact ms/token, tokens 1-8", "exact ms/token, tokens 9-16",
        "exact ms/token, tokens 17-24", "exact cost, last / first window"]
    assert [row["model"] for row in rows] == ["small alibi (random)"] * 4 + [
        "small learned (random)"] * 4
    assert all(row["value"] > 0 and math.isfinite(row["value"]) for row in rows)
    assert all(_format(row) for row in rows)


def test_extrapolation_plot_has_one_line_per_position_in_length_order(tmp_path):
    import matplotlib.image

    from benchmarks.extrapolation import DOCUMENTED, loss_curves, plot_extrapolation

    shuffled = {**DOCUMENTED, "rows": list(reversed(DOCUMENTED["rows"]))}
    curves = loss_curves(shuffled)
    assert list(curves) == ["none", "rope", "alibi", "learned"]
    assert curves["learned"] == ([64], [2.191])
    assert curves["alibi"] == ([64, 128, 256, 512], [2.127, 2.112, 2.094, 2.117])
    assert curves["rope"][1] == [2.024, 2.106, 2.385, 2.756]
    image = matplotlib.image.imread(plot_extrapolation(shuffled, tmp_path / "x" / "e.png"))
    assert image.shape[:2] == (418, 660) and image[..., :3].std() > 0.05
