"""`make bench`: time the five attentions and the whole model, print a table, save JSON and a plot.

    python -m benchmarks [--quick] [--out DIR] [--threads N]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from benchmarks.flops import attention_flops, matmul_throughput
from benchmarks.harness import Budget, Timing, machine_facts, measure, paired_ratio, peak_memory
from benchmarks.implementations import (
    IMPLEMENTATIONS,
    REFERENCE,
    VARIANT_IMPLEMENTATIONS,
    VARIANTS,
    attention_implementations,
    check_attention_agreement,
    check_model_agreement,
    model_implementations,
    tolerances,
    variant_implementations,
)
from benchmarks.report import markdown_report, plot_results
from tinygpt.allocator import keep_freed_memory
from tinygpt.attention import causal_mask
from tinygpt.config import ModelConfig
from tinygpt.generate import generate
from tinygpt.model import TinyDecoderModel, next_token_loss

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Shape:
    """One attention call: x `(b t (h d))` with a causal mask `(t t)`."""

    name: str
    batch: int
    context: int
    d_model: int
    n_heads: int


@dataclass(frozen=True)
class Plan:
    """Everything a run measures: FULL is `make bench`, QUICK the same code on tiny sizes."""

    shapes: tuple[Shape, ...]
    sweep_contexts: tuple[int, ...]
    sweep_width: tuple[int, int]  # d_model, n_heads
    # From this context on, one timed call per pass (each takes seconds) and an agreement check
    # of the forward pass only; no torch.compile beyond `sweep_compiled_up_to` (its graph is the
    # dense one). So the whole run stays within about three minutes.
    sweep_single_from: int
    sweep_compiled_up_to: int
    model_configs: tuple[tuple[str, int, dict], ...]  # preset, batch, config overrides
    variant_shapes: tuple[str, ...]  # the shapes the attention variants are timed at
    generation: tuple[str, int, int]  # preset, prompt length, new tokens
    matmul_sizes: tuple[int, ...]
    budget: Budget
    slow_budget: Budget  # calls of up to a second: sweep, training step, generation
    compile_options: dict  # for torch.compile


# Batch sizes per preset (the presets fix context, width and heads): the sizes the project's
# targets were set at.
_BATCH = {"seed": 32, "shakespeare-cpu": 12, "baby": 8}


def _preset_shape(name: str) -> Shape:
    config = ModelConfig.preset(name)
    return Shape(name, _BATCH[name], config.max_seq, config.d_model, config.n_heads)


FULL = Plan(
    shapes=tuple(_preset_shape(name) for name in _BATCH),
    sweep_contexts=(64, 128, 256, 512, 1024, 2048, 8192),
    sweep_width=(384, 6),
    sweep_single_from=4096,
    sweep_compiled_up_to=2048,
    model_configs=(("seed", 32, {}), ("shakespeare-cpu", 12, {})),
    # The variants' targets are set at these two; the seed size would add 9 s to the run.
    variant_shapes=("shakespeare-cpu", "baby"),
    generation=("shakespeare-cpu", 8, 56),
    matmul_sizes=(512, 1024, 2048),
    budget=Budget(rounds=12, round_time=0.05),
    slow_budget=Budget(rounds=5, round_time=0.05),
    compile_options={"backend": "inductor"},
)
# Tiny sizes, one shared shape: seconds, and every code path of ours. torch.compile traces with
# dynamo and AOTAutograd as in the full run but skips inductor's C++ code generation, which alone
# would take about a minute on a cold cache. Its timings mean nothing.
QUICK = Plan(
    shapes=tuple(Shape(name, 2, 8, 16, 2) for name in _BATCH),
    sweep_contexts=(8, 16),
    sweep_width=(16, 2),
    sweep_single_from=16,
    sweep_compiled_up_to=16,
    model_configs=(("seed", 2, dict(d_model=16, n_heads=2, d_ff=32, max_seq=8)),),
    variant_shapes=tuple(_BATCH),
    generation=("seed", 2, 4),
    matmul_sizes=(64,),
    budget=Budget(rounds=2, round_time=0.001),
    slow_budget=Budget(rounds=2, round_time=0.001),
    compile_options={"backend": "aot_eager"},
)


def targets() -> list[dict]:
    """The project's targets, each a paired ratio measured in the same run (fp32, fwd+bwd)."""
    return [
        {"impl": "hand", "against": "mha", "limit": 1.0,
         "text": "hand-written no slower than nn.MultiheadAttention"},
        {"impl": "compiled", "against": "sdpa", "limit": 1.10,
         "text": "hand-written under torch.compile within 10% of the fused kernel"},
    ]


def devices() -> tuple[list[tuple[torch.device, torch.dtype]], str]:
    """CPU float32 always; CUDA float32 and bfloat16 with a GPU; and one line saying which."""
    runs = [(torch.device("cpu"), torch.float32)]
    if torch.cuda.is_available():
        cuda = torch.device("cuda")
        runs += [(cuda, torch.float32), (cuda, torch.bfloat16)]
        return runs, f"CUDA: {torch.cuda.get_device_name(0)} (float32 and bfloat16 columns)."
    return runs, "CUDA: absent (torch.cuda.is_available() is False), so CPU columns only."


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _input(batch, context, d_model, *, device, dtype, seed=0):
    """A fixed x `(b t (h d))`, drawn on the CPU so that every device gets the same numbers."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, context, d_model, generator=generator)
    return x.to(device=device, dtype=dtype)


def bench_attention(shape: Shape, device, dtype, *, threads, budget, peak, compile_options
                    ) -> list[dict]:
    """Forward (inference_mode) and forward + backward of each implementation at one shape."""
    implementations = attention_implementations(shape.d_model, shape.n_heads, device=device,
                                                dtype=dtype, compile_options=compile_options)
    x = _input(shape.batch, shape.context, shape.d_model, device=device, dtype=dtype)
    agreement = check_attention_agreement(implementations, x, dtype=dtype)
    forward, forward_backward = _passes(x, causal_mask(shape.context, device=device).to(dtype))
    rows = []
    for pass_name, step, backward in (("forward", forward, False),
                                      ("forward+backward", forward_backward, True)):
        timings = measure({name: partial(step, run) for name, run in implementations.items()},
                          threads=threads, budget=budget)
        flops = attention_flops(shape.batch, shape.context, shape.d_model, backward=backward)
        rows += [{
            **dataclasses.asdict(shape), "device": device.type, "dtype": _dtype_name(dtype),
            "impl": name, "pass": pass_name, **timing.to_dict(), "flops": flops,
            "flops_per_s": flops / timing.median_s,
            "fraction_of_matmul": flops / timing.median_s / peak,
            "max_abs_diff_vs_mha": agreement[name],
        } for name, timing in timings.items()]
    _add_ratios(rows, keys=("name", "device", "dtype", "pass"))
    return rows


def _passes(x: torch.Tensor, *args: torch.Tensor):
    """The two timed passes of an attention `run(x, *args)`: forward under inference_mode, and
    forward + backward of a fixed random gradient into x (which starts requiring grad here)."""
    x.requires_grad_(True)
    grad_out = torch.randn_like(x)

    def forward(run):
        with torch.inference_mode():
            run(x, *args)

    def forward_backward(run):
        run(x, *args).backward(grad_out)

    return forward, forward_backward


def bench_sweep(plan: Plan, device, dtype, *, threads) -> list[dict]:
    """Forward (inference_mode) and forward + backward time and peak memory against context
    length at one width (batch 1): one row per context and implementation, both passes in it.

    The compiled implementation is compiled once with a dynamic context length and serves every
    length (a static graph per length would cost a compilation each).
    """
    d_model, n_heads = plan.sweep_width
    implementations = attention_implementations(
        d_model, n_heads, device=device, dtype=dtype,
        compile_options={**plan.compile_options, "dynamic": True})
    rows = []
    for context in plan.sweep_contexts:
        running = {name: run for name, run in implementations.items()
                   if name != "compiled" or context <= plan.sweep_compiled_up_to}
        x = _input(1, context, d_model, device=device, dtype=dtype)
        agreement = check_attention_agreement(running, x, dtype=dtype,
                                              backward=context < plan.sweep_single_from)
        forward, forward_backward = _passes(x, causal_mask(context, device=device).to(dtype))
        passes = {}
        for pass_name, step in (("forward", forward), ("forward+backward", forward_backward)):
            steps = {name: partial(step, run) for name, run in running.items()}
            timings = (_time_once(steps) if context >= plan.sweep_single_from else
                       measure(steps, threads=threads, budget=plan.slow_budget, warmup=1))
            passes[pass_name] = {name: (timing, peak_memory(steps[name], device))
                                 for name, timing in timings.items()}
        rows += [{
            "context": context, "batch": 1, "d_model": d_model, "n_heads": n_heads,
            "device": device.type, "dtype": _dtype_name(dtype), "impl": name,
            "pass": "forward+backward", **timing.to_dict(), "peak_bytes": peak,
            "forward_median_s": passes["forward"][name][0].median_s,
            "forward_round_medians_s": passes["forward"][name][0].round_medians_s,
            "forward_peak_bytes": passes["forward"][name][1],
            "max_abs_diff_vs_mha": agreement[name],
        } for name, (timing, peak) in passes["forward+backward"].items()]
    _add_ratios(rows, keys=("context", "device", "dtype"))
    return rows


def _time_once(steps: dict) -> dict[str, Timing]:
    """One timed call of each step, for contexts where a call takes seconds: the timing of a
    single block (no spread), still taken one function after another in the same round."""
    timings = {}
    for name, step in steps.items():
        started = time.perf_counter()
        step()
        seconds = time.perf_counter() - started
        timings[name] = Timing(seconds, 0.0, seconds, 1, 1, (seconds,))
    return timings


def tiled_ratios(sweep_rows: list[dict]) -> list[dict]:
    """Per context and pass: the tiled core's time and peak memory over the SDPA core's and the
    dense hand-written one's, paired round by round (time) in the same run."""
    results = []
    for row in (r for r in sweep_rows if r["impl"] == "tiled"):
        same = {r["impl"]: r for r in sweep_rows if r["context"] == row["context"]
                and r["device"] == row["device"] and r["dtype"] == row["dtype"]}
        for pass_name, rounds, peak in (
                ("forward", "forward_round_medians_s", "forward_peak_bytes"),
                ("forward+backward", "round_medians_s", "peak_bytes")):
            result = {"context": row["context"], "device": row["device"], "dtype": row["dtype"],
                      "pass": pass_name}
            for against in ("sdpa", "hand"):
                other = same[against]
                result[f"time_vs_{against}"] = paired_ratio(row[rounds], other[rounds]).median
                result[f"memory_vs_{against}"] = row[peak] / max(other[peak], 1)
            results.append(result)
    return results


def bench_model(preset: str, batch: int, overrides: dict, device, dtype, *, threads, budget,
                compile_options) -> list[dict]:
    """Training-step tokens/s (forward, loss, backward, AdamW) of the model with each attention."""
    config = ModelConfig.preset(preset, **{**overrides, "dropout": 0.0})
    models = model_implementations(config, device=device, dtype=dtype,
                                   compile_options=compile_options)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(config.vocab_size, (batch, config.max_seq + 1), generator=generator)
    idx, targets = tokens[:, :-1].to(device), tokens[:, 1:].to(device)
    agreement = check_model_agreement(models, idx, dtype=dtype)

    def train_step(model, optimizer):
        optimizer.zero_grad(set_to_none=True)
        next_token_loss(model(idx), targets).backward()
        optimizer.step()

    steps = {name: partial(train_step, model, torch.optim.AdamW(model.parameters(), lr=1e-4))
             for name, model in models.items()}
    timings = measure(steps, threads=threads, budget=budget)
    rows = [{
        "config": preset, "batch": batch, "context": config.max_seq, "device": device.type,
        "dtype": _dtype_name(dtype), "impl": name, **timing.to_dict(),
        "tokens_per_s": batch * config.max_seq / timing.median_s,
        "max_abs_diff_vs_mha": agreement[name],
    } for name, timing in timings.items()]
    _add_ratios(rows, keys=("config", "device", "dtype"))
    return rows


POSITIONS = ("learned", "alibi", "rope")
POSITION_LIMIT = 1.15  # ALiBi's bias and RoPE's rotation may cost at most 15 % of a training step


def bench_positions(preset: str, batch: int, overrides: dict, device, dtype, *, threads,
                    budget) -> list[dict]:
    """Training step (forward, loss, backward, AdamW) of the hand-written model with each kind of
    position, in interleaved rounds; each row's paired ratio is over the learned-position model's
    round medians, and `met` says whether it is within `POSITION_LIMIT`."""
    generator = torch.Generator().manual_seed(0)
    steps = {}
    for position in POSITIONS:
        config = ModelConfig.preset(preset, **{**overrides, "dropout": 0.0, "position": position})
        torch.manual_seed(0)
        model = TinyDecoderModel(config).to(device=device, dtype=dtype)
        tokens = torch.randint(config.vocab_size, (batch, config.max_seq + 1), generator=generator)
        idx, targets = tokens[:, :-1].to(device), tokens[:, 1:].to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        steps[position] = partial(_train_step, model, optimizer, idx, targets)
    timings = measure(steps, threads=threads, budget=budget)
    learned = timings["learned"].round_medians_s
    rows = []
    for position, timing in timings.items():
        ratio = paired_ratio(timing.round_medians_s, learned)
        rows.append({"config": preset, "batch": batch, "device": device.type,
                     "dtype": _dtype_name(dtype), "position": position, **timing.to_dict(),
                     "ratio_vs_learned": ratio.median, "ratio_q1": ratio.q1, "ratio_q3": ratio.q3,
                     "met": ratio.median <= POSITION_LIMIT})
    return rows


def _train_step(model, optimizer, idx, targets) -> None:
    optimizer.zero_grad(set_to_none=True)
    next_token_loss(model(idx), targets).backward()
    optimizer.step()


def bench_generation(plan: Plan, device, *, threads, budget) -> list[dict]:
    """Greedy decoding tokens/s through `tinygpt.generate.generate`, with and without the KV cache.

    Random weights of the preset's size: speed depends on sizes only. `benchmarks/generation.py`
    goes further (per-policy speeds, cost per token along the window).
    """
    preset, prompt_length, new_tokens = plan.generation
    config = ModelConfig.preset(preset, dropout=0.0)
    torch.manual_seed(0)
    model = TinyDecoderModel(config).to(device).eval()
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(config.vocab_size, (1, prompt_length), generator=generator).to(device)
    timings = measure({use_cache: partial(generate, model, prompt, new_tokens, do_sample=False,
                                          use_cache=use_cache) for use_cache in (False, True)},
                      threads=threads, budget=budget, warmup=1)
    return [{"config": preset, "device": device.type, "dtype": "float32", "batch": 1,
             "prompt": prompt_length, "new_tokens": new_tokens, "use_cache": use_cache,
             **timing.to_dict(), "tokens_per_s": new_tokens / timing.median_s}
            for use_cache, timing in timings.items()]


def bench_variants(shape: Shape, device, dtype, *, threads, budget) -> list[dict]:
    """Each attention variant at one shape: the hand-written mask or bias, nn.MultiheadAttention
    given the same float mask, and FlexAttention run eagerly; forward (inference_mode) and
    forward + backward (FlexAttention has no CPU backward, so not there). Outputs agree first."""
    rows = []
    for variant in VARIANTS:
        runs = variant_implementations(variant, shape.batch, shape.context, shape.d_model,
                                       shape.n_heads, device=device, dtype=dtype)
        x = _input(shape.batch, shape.context, shape.d_model, device=device, dtype=dtype)
        with torch.inference_mode():
            outputs = {name: run(x) for name, run in runs.items()}
        for name, out in outputs.items():
            torch.testing.assert_close(out, outputs[REFERENCE], **tolerances(dtype),
                                       msg=lambda m, name=name: f"{variant} {name}: {m}")
        forward, forward_backward = _passes(x)
        for pass_name, step in (("forward", forward), ("forward+backward", forward_backward)):
            chosen = {name: partial(step, run) for name, run in runs.items()
                      if not (name == "flex" and pass_name != "forward" and device.type == "cpu")}
            timings = measure(chosen, threads=threads, budget=budget, warmup=1)
            rows += [{**dataclasses.asdict(shape), "variant": variant, "device": device.type,
                      "dtype": _dtype_name(dtype), "impl": name, "pass": pass_name,
                      **timing.to_dict()} for name, timing in timings.items()]
    _add_ratios(rows, keys=("name", "variant", "device", "dtype", "pass"))
    return rows


def _add_ratios(rows: list[dict], keys: tuple[str, ...]) -> None:
    """Each row's time over the reference's in the same group, paired round by round (same run):
    `ratio_vs_mha` is the median of the per-round ratios, `ratio_q1`/`ratio_q3` their quartiles."""
    reference = {tuple(r[k] for k in keys): r["round_medians_s"] for r in rows
                 if r["impl"] == REFERENCE}
    for row in rows:
        ratio = paired_ratio(row["round_medians_s"], reference[tuple(row[k] for k in keys)])
        row.update(ratio_vs_mha=ratio.median, ratio_q1=ratio.q1, ratio_q3=ratio.q3)


def check_targets(attention_rows: list[dict]) -> list[dict]:
    """Evaluate each target on every fp32 fwd+bwd shape: the paired ratio of the implementation's
    round medians over `against`'s, met when its median is within the limit."""
    results = []
    for target in targets():
        for row in attention_rows:
            if (row["impl"] != target["impl"] or row["pass"] != "forward+backward"
                    or row["dtype"] != "float32"):
                continue
            against = next(r for r in attention_rows if r["impl"] == target["against"]
                           and r["pass"] == row["pass"] and r["name"] == row["name"]
                           and r["device"] == row["device"] and r["dtype"] == row["dtype"])
            ratio = paired_ratio(row["round_medians_s"], against["round_medians_s"])
            results.append({**{k: target[k] for k in ("impl", "against", "limit", "text")},
                            "name": row["name"], "device": row["device"], "ratio": ratio.median,
                            "ratio_q1": ratio.q1, "ratio_q3": ratio.q3,
                            "met": ratio.median <= target["limit"]})
    return results


def run(plan: Plan, *, quick: bool, threads: int, malloc: str, log=print) -> dict:
    """Every measurement of one run, as a JSON-ready dict. `malloc` says how memory was managed."""
    started = time.perf_counter()
    runs, cuda_line = devices()
    log(cuda_line)
    results = {"quick": quick, "machine": {**machine_facts(threads), "malloc": malloc},
               "cuda": cuda_line, "implementations": IMPLEMENTATIONS, "reference": REFERENCE,
               "compile_options": plan.compile_options, "matmul": [],
               "attention": [], "sweep": [], "tiled": [], "model": [], "positions": [],
               "generation": [],
               "variants": [], "variant_implementations": VARIANT_IMPLEMENTATIONS,
               "variant_names": VARIANTS}
    for device, dtype in runs:
        label = f"{device.type} {_dtype_name(dtype)}"
        log(f"{label}: dense matmul throughput")
        roof = matmul_throughput(plan.matmul_sizes, device=device, dtype=dtype, threads=threads,
                                 budget=plan.budget)
        results["matmul"].append({"device": device.type, "dtype": _dtype_name(dtype), **roof})
        for shape in plan.shapes:
            log(f"{label}: attention at {shape.name} (b={shape.batch} t={shape.context} "
                f"d_model={shape.d_model} h={shape.n_heads})")
            results["attention"] += bench_attention(shape, device, dtype, threads=threads,
                                                    budget=plan.budget, peak=roof["flops_per_s"],
                                                    compile_options=plan.compile_options)
        log(f"{label}: context sweep {plan.sweep_contexts[0]}..{plan.sweep_contexts[-1]}")
        results["sweep"] += bench_sweep(plan, device, dtype, threads=threads)
        results["tiled"] = tiled_ratios(results["sweep"])
        for preset, batch, overrides in plan.model_configs:
            log(f"{label}: training step, {preset} model")
            results["model"] += bench_model(preset, batch, overrides, device, dtype,
                                            threads=threads, budget=plan.slow_budget,
                                            compile_options=plan.compile_options)
        if dtype == torch.float32:
            preset, batch, overrides = plan.model_configs[-1]
            log(f"{label}: training step with learned, ALiBi and RoPE positions, {preset} model")
            results["positions"] += bench_positions(preset, batch, overrides, device, dtype,
                                                    threads=threads, budget=plan.slow_budget)
            for shape in (s for s in plan.shapes if s.name in plan.variant_shapes):
                log(f"{label}: attention variants at {shape.name}")
                results["variants"] += bench_variants(shape, device, dtype, threads=threads,
                                                      budget=plan.slow_budget)
            log(f"{label}: generation")
            results["generation"] += bench_generation(plan, device, threads=threads,
                                                      budget=plan.slow_budget)
    results["targets"] = check_targets(results["attention"])
    results["elapsed_s"] = time.perf_counter() - started
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="every code path on tiny sizes, in seconds (timings meaningless)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR,
                        help="where bench.json, bench.png and bench.md go (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads for every measurement (default: %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads < 1:
        print(f"bench: error: --threads must be at least 1, got {args.threads}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    malloc = ("glibc, freed buffers kept (tinygpt.allocator)" if keep_freed_memory()
              else "the platform's default")
    started = time.perf_counter()

    def log(line: str) -> None:  # progress on stderr, so stdout is the table alone
        print(f"[{time.perf_counter() - started:6.1f} s] {line}", file=sys.stderr, flush=True)

    try:
        plan = QUICK if args.quick else FULL
        results = run(plan, quick=args.quick, threads=args.threads, malloc=malloc, log=log)
        args.out.mkdir(parents=True, exist_ok=True)
        table = markdown_report(results)
        (args.out / "bench.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
        (args.out / "bench.md").write_text(table, encoding="utf-8")
        plot_results(results, args.out / "bench.png")
    except (RuntimeError, ValueError, OSError) as error:
        print(f"bench: error: {str(error).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    print(table)
    log(f"wrote {args.out / 'bench.json'}, {args.out / 'bench.png'} and {args.out / 'bench.md'} "
        f"in {results['elapsed_s']:.0f} s")
    return 0
