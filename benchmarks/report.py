"""The run's results as a markdown table (stdout, bench.md) and a PNG plot (bench.png).

The plot is a matplotlib `Figure` saved to a file, never drawn through `pyplot`: importing this
module or plotting must not switch the caller's backend or leave figures in pyplot's list.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure


def _table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g}"


def _ratio(median: float, q1: float, q3: float) -> str:
    return f"{median:.2f} [{q1:.2f}, {q3:.2f}]"


def _groups(rows: list[dict]) -> list[tuple[str, str]]:
    """(device, dtype) pairs in the order they were measured."""
    return list(dict.fromkeys((row["device"], row["dtype"]) for row in rows))


def markdown_report(results: dict) -> str:
    """Every table of the run. Ratios are medians over the nn.MultiheadAttention median of the
    same group in the same run: below 1 is faster than the reference."""
    out = _preamble(results)
    out += _attention_tables(results)
    out += _target_table(results)
    out += _sweep_tables(results)
    out += _model_tables(results)
    out += _position_table(results)
    out += _generation_table(results)
    out += _variant_tables(results)
    out += ["", f"Run took {results['elapsed_s']:.0f} s.", ""]
    return "\n".join(out)


def _preamble(results: dict) -> list[str]:
    """Title, machine, compile options, how to read the tables, and the matmul roofs."""
    machine = results["machine"]
    out = ["# TinyGPT benchmark" + (" (--quick: tiny sizes, timings meaningless)"
                                    if results["quick"] else ""), ""]
    out.append(f"CPU: {machine['cpu']} ({machine['cpu_capability']}), torch threads: "
               f"{machine['threads']}; torch {machine['torch']}; Python {machine['python']}; "
               f"GPU: {machine['gpu'] or 'none'}; malloc: {machine['malloc']}.  ")
    out.append(results["cuda"] + "  ")
    options = ", ".join(f"{k}={v}" for k, v in results["compile_options"].items())
    out.append(f"torch.compile({options}); the context sweep adds dynamic=True.")
    out.append("")
    out.append("Times are medians of torch.utils.benchmark blocks, measured in interleaved rounds "
               "(IQR = spread between quartiles). "
               "`x MHA` = time / nn.MultiheadAttention's time, paired round by round in the same "
               "run: the median of the per-round ratios, [their quartiles] (< 1 is faster). "
               "`% roof` = achieved FLOP/s (8btE² + 4bt²E per forward, 3x that with backward) over "
               "the dense matmul FLOP/s measured in the same run (its fastest block).")
    for roof in results["matmul"]:
        out.append(f"\nDense matmul roof, {roof['device']} {roof['dtype']}: "
                   f"{roof['flops_per_s'] / 1e9:.1f} GFLOP/s (torch.mm, n={roof['n']}).")
    return out


def _attention_tables(results: dict) -> list[str]:
    names, out = results["implementations"], []
    for device, dtype in _groups(results["attention"]):
        out += ["", f"## Attention, {device} {dtype}", ""]
        rows = [r for r in results["attention"] if (r["device"], r["dtype"]) == (device, dtype)]
        out.append(_table(
            ["size (b, t, d_model, h)", "pass", "implementation", "median ms", "IQR ms", "x MHA",
             "GFLOP/s", "% roof"],
            [[f"{r['name']} ({r['batch']}, {r['context']}, {r['d_model']}, {r['n_heads']})",
              r["pass"], names[r["impl"]], _ms(r["median_s"]), _ms(r["iqr_s"]),
              _ratio(r["ratio_vs_mha"], r["ratio_q1"], r["ratio_q3"]),
              f"{r['flops_per_s'] / 1e9:.2f}",
              f"{100 * r['fraction_of_matmul']:.1f}"] for r in rows]))
    return out


def _target_table(results: dict) -> list[str]:
    if not results["targets"]:
        return []
    out = ["", "## Targets (float32, forward+backward, paired ratios from this run)", ""]
    out.append(_table(
        ["target", "device", "size", "ratio [quartiles]", "limit", "met"],
        [[t["text"], t["device"], t["name"], _ratio(t["ratio"], t["ratio_q1"], t["ratio_q3"]),
          f"{t['limit']:.2f}",
          "yes" if t["met"] else "**no**"] for t in results["targets"]]))
    return out


def _sweep_tables(results: dict) -> list[str]:
    names, out = results["implementations"], []
    for device, dtype in _groups(results["sweep"]):
        rows = [r for r in results["sweep"] if (r["device"], r["dtype"]) == (device, dtype)]
        impls = list(dict.fromkeys(r["impl"] for r in rows))
        first = rows[0]
        out += ["", f"## Context sweep, {device} {dtype} (batch 1, d_model {first['d_model']}, "
                f"{first['n_heads']} heads, forward+backward)", ""]
        out.append("Peak MiB: bytes torch allocated above the starting level during one call "
                   "(CUDA max_memory_allocated; CPU the peak of the profiler's allocation log).")
        out.append("")
        out.append("Contexts from 4,096 on: one timed call per pass, and no torch.compile.")
        by_context = {}
        for r in rows:
            by_context.setdefault(r["context"], {})[r["impl"]] = r
        for label, time_key, peak_key in (("forward+backward", "median_s", "peak_bytes"),
                                          ("forward", "forward_median_s", "forward_peak_bytes")):
            out += ["", f"{label}:", ""]
            out.append(_table(
                ["context"] + [f"{names[i]} ms" for i in impls]
                + [f"{names[i]} peak MiB" for i in impls],
                [[str(c)] + [_ms(by_impl[i][time_key]) if i in by_impl else "-" for i in impls]
                 + [f"{by_impl[i][peak_key] / 2**20:.1f}" if i in by_impl else "-" for i in impls]
                 for c, by_impl in by_context.items()]))
    return out + _tiled_tables(results)


def _tiled_tables(results: dict) -> list[str]:
    """The tiled core's time and memory over the SDPA core's and the dense one's, per context."""
    out = []
    for device, dtype in _groups(results.get("tiled", [])):
        rows = [r for r in results["tiled"] if (r["device"], r["dtype"]) == (device, dtype)]
        out += ["", f"## Tiled (FlashAttention by hand) against the SDPA core and the dense "
                f"hand-written, {device} {dtype}", ""]
        out.append("Time: paired ratio from this run; memory: ratio of peaks (< 1 is better).")
        out.append("")
        out.append(_table(
            ["context", "pass", "time / SDPA core", "time / dense", "memory / SDPA core",
             "memory / dense"],
            [[str(r["context"]), r["pass"], f"{r['time_vs_sdpa']:.2f}", f"{r['time_vs_hand']:.2f}",
              f"{r['memory_vs_sdpa']:.2f}", f"{r['memory_vs_hand']:.2f}"] for r in rows]))
    return out


def _model_tables(results: dict) -> list[str]:
    names, out = results["implementations"], []
    for device, dtype in _groups(results["model"]):
        rows = [r for r in results["model"] if (r["device"], r["dtype"]) == (device, dtype)]
        out += ["", f"## Training step of the whole model, {device} {dtype} "
                "(forward, loss, backward, AdamW)", ""]
        out.append(_table(
            ["model (b, t)", "attention", "median ms", "IQR ms", "tokens/s", "x MHA"],
            [[f"{r['config']} ({r['batch']}, {r['context']})", names[r["impl"]], _ms(r["median_s"]),
              _ms(r["iqr_s"]), f"{r['tokens_per_s']:,.0f}",
              _ratio(r["ratio_vs_mha"], r["ratio_q1"], r["ratio_q3"])]
             for r in rows]))
    return out


def _position_table(results: dict) -> list[str]:
    rows = results.get("positions", [])
    if not rows:
        return []
    out = ["", "## Positions: training step of the hand-written model, paired against learned "
           "positions (target: ALiBi and RoPE <= 1.15x)", ""]
    out.append(_table(
        ["device", "model (b)", "position", "median ms", "IQR ms", "x learned", "target met"],
        [[f"{r['device']} {r['dtype']}", f"{r['config']} ({r['batch']})", r["position"],
          _ms(r["median_s"]), _ms(r["iqr_s"]),
          _ratio(r["ratio_vs_learned"], r["ratio_q1"], r["ratio_q3"]),
          "yes" if r["met"] else "no"] for r in rows]))
    return out


def _generation_table(results: dict) -> list[str]:
    if not results["generation"]:
        return []
    out = ["", "## Generation (greedy, batch 1, hand-written attention)", ""]
    out.append(_table(
        ["device", "model", "prompt + new tokens", "KV cache", "median ms", "tokens/s"],
        [[r["device"], r["config"], f"{r['prompt']} + {r['new_tokens']}",
          "yes" if r["use_cache"] else "no", _ms(r["median_s"]), f"{r['tokens_per_s']:,.0f}"]
         for r in results["generation"]]))
    return out


def _variant_tables(results: dict) -> list[str]:
    """One table per (device, dtype): every variant, size and pass, each implementation's median
    and its paired ratio to nn.MultiheadAttention given the same float mask."""
    names, out = results.get("variant_implementations", {}), []
    for device, dtype in _groups(results.get("variants", [])):
        rows = [r for r in results["variants"] if (r["device"], r["dtype"]) == (device, dtype)]
        out += ["", f"## Attention variants, {device} {dtype} (same mask in every implementation)",
                ""]
        out.append(_table(
            ["variant", "size (b, t, d_model, h)", "pass", "implementation", "median ms",
             "x MHA"],
            [[results["variant_names"][r["variant"]],
              f"{r['name']} ({r['batch']}, {r['context']}, {r['d_model']}, {r['n_heads']})",
              r["pass"], names[r["impl"]], _ms(r["median_s"]),
              _ratio(r["ratio_vs_mha"], r["ratio_q1"], r["ratio_q3"])] for r in rows]))
    return out


def plot_results(results: dict, path: Path) -> None:
    """Three panels: fwd+bwd ratio to MHA per size, then sweep time and peak memory vs context."""
    names = results["implementations"]
    figure = Figure(figsize=(16, 4.8))
    ratios, times, memory = figure.subplots(1, 3)
    fwd_bwd = [r for r in results["attention"]
               if r["pass"] == "forward+backward" and r["device"] == "cpu"]
    sizes = list(dict.fromkeys(r["name"] for r in fwd_bwd))
    impls = list(dict.fromkeys(r["impl"] for r in fwd_bwd))
    width = 0.8 / max(len(impls), 1)
    for n, impl in enumerate(impls):
        mine = [next(r for r in fwd_bwd if r["name"] == s and r["impl"] == impl) for s in sizes]
        values = [r["ratio_vs_mha"] for r in mine]
        spread = [[r["ratio_vs_mha"] - r["ratio_q1"] for r in mine],
                  [r["ratio_q3"] - r["ratio_vs_mha"] for r in mine]]
        ratios.bar([i + n * width for i in range(len(sizes))], values, width, yerr=spread,
                   capsize=3, label=names[impl])
    ratios.axhline(1.0, color="black", linewidth=0.8)
    ratios.set_xticks([i + width * (len(impls) - 1) / 2 for i in range(len(sizes))], sizes)
    ratios.set_ylabel("time / nn.MultiheadAttention (paired rounds; quartiles)")
    ratios.set_title("attention fwd+bwd, cpu float32 (lower is faster)")
    tallest = max((r["ratio_q3"] for r in fwd_bwd), default=1.0)
    ratios.set_ylim(0, 1.45 * max(tallest, 1.0))  # headroom above the bars for the legend
    ratios.legend(fontsize=8, loc="upper left", ncol=2)
    for device, dtype in _groups(results["sweep"]):
        rows = [r for r in results["sweep"] if (r["device"], r["dtype"]) == (device, dtype)]
        for impl in dict.fromkeys(r["impl"] for r in rows):
            mine = [r for r in rows if r["impl"] == impl]
            label = f"{names[impl]} ({device} {dtype})"
            times.plot([r["context"] for r in mine], [r["median_s"] * 1e3 for r in mine], "o-",
                       label=label)
            memory.plot([r["context"] for r in mine], [r["peak_bytes"] / 2**20 for r in mine],
                        "o-", label=label)
    for axis, ylabel, title in ((times, "median ms", "fwd+bwd time vs context"),
                                (memory, "peak MiB", "fwd+bwd peak memory vs context")):
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("context length (batch 1)")
        axis.set_ylabel(ylabel)
        axis.set_title(title)
        axis.legend(fontsize=8)
    figure.suptitle(f"TinyGPT attention on {results['machine']['cpu']}, torch threads: "
                    f"{results['machine']['threads']}, torch {results['machine']['torch']}"
                    + (" (--quick)" if results["quick"] else ""))
    figure.tight_layout()
    figure.savefig(path, dpi=100)
