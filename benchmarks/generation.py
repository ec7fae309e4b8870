"""Generation speed: the KV cache against recomputation, and tokens/s for each slide policy.

Two measurements, each taken in one run so that ratios compare like with like:

1. `baby` preset (context 256): 256 new tokens from a one-token prompt, with and without the
   cache (target: cache >= 4x faster), and the cached cost per token in each quarter of the window
   (target: flat, i.e. last quarter / first quarter close to 1).
2. `shakespeare-cpu` preset: 500 new tokens from a short prompt, tokens/s for each policy with and
   without the cache, and for the fast policy with the compiled decode step (`compile=True`):
   its one-off compile time, then its steady-state tokens/s (target: >= 1,200 tokens/s), and
   whether it drew the same tokens as the eager cached path from the same seed.
3. The rolling cache: a `shakespeare-cpu`-sized model with ALiBi positions generates 3 x max_seq
   tokens with the `rolling` policy, and the cost per token is reported for each window-length
   segment (first window, second, third). Once the window is full the cache drops its oldest
   position as it appends a new one, so the cost stays flat: one position per token, never a
   re-prefill. Beside it, the `exact` policy with learned positions, which must re-run the whole
   window for every token past max_seq.

Speed does not depend on the values of the weights, only on the sizes, so without a checkpoint the
models get random weights of the preset's size. `measure_generation()` returns the rows for the
overall benchmark; run this file to print them:

    .venv/bin/python benchmarks/generation.py [--checkpoint runs/NAME] [--threads 1] [--quick]

`--quick` runs only the third measurement, on a small model: a smoke test of the code path.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tinygpt import ModelConfig, TinyDecoderModel
from tinygpt.allocator import keep_freed_memory
from tinygpt.generate import POLICIES, generate, generate_steps

TARGET_CACHE_SPEEDUP = 4.0
TARGET_FAST_TOKENS_PER_S = 1200.0


def _random_model(preset: str) -> TinyDecoderModel:
    torch.manual_seed(0)
    return TinyDecoderModel(ModelConfig.preset(preset)).eval()


def _timed(model, prompt, n, **options) -> float:
    return _timed_tokens(model, prompt, n, **options)[0]


def _timed_tokens(model, prompt, n, **options) -> tuple[float, torch.Tensor]:
    """Seconds for `n` new tokens drawn with a generator seeded 0, and the tokens."""
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    out = generate(model, prompt, n, generator=generator, **options)
    seconds = time.perf_counter() - start
    assert out.shape[1] == prompt.shape[1] + n
    return seconds, out


def _step_times(model, prompt, n, policy: str = "exact") -> list[float]:
    """Seconds spent on each new token (cached)."""
    times, generator = [], torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for _ in generate_steps(model, prompt, n, generator=generator, policy=policy):
        now = time.perf_counter()
        times.append(now - start)
        start = now
    return times


def cache_speedup(model: TinyDecoderModel, n: int = 256, label: str = "baby") -> list[dict]:
    """Cache against no cache from a one-token prompt, and the cached cost per window quarter."""
    prompt = torch.zeros(1, 1, dtype=torch.long)
    _timed(model, prompt, 8)  # warm-up
    cached = _timed(model, prompt, n)
    uncached = _timed(model, prompt, n, use_cache=False)
    rows = [
        dict(model=label, measure="cache", tokens=n, seconds=cached, tokens_per_s=n / cached),
        dict(model=label, measure="no cache", tokens=n, seconds=uncached,
             tokens_per_s=n / uncached),
        dict(model=label, measure="cache speedup", value=uncached / cached,
             target=f">= {TARGET_CACHE_SPEEDUP:g}", met=uncached / cached >= TARGET_CACHE_SPEEDUP),
    ]
    times = _step_times(model, prompt, n)[1:]  # the first step is the prefill
    quarter = len(times) // 4
    medians = [statistics.median(times[k * quarter:(k + 1) * quarter]) for k in range(4)]
    for k, median in enumerate(medians):
        rows.append(dict(model=label, measure=f"cached ms/token, positions {k * quarter + 1}-"
                         f"{(k + 1) * quarter}", value=1e3 * median))
    rows.append(dict(model=label, measure="cached cost, last / first quarter",
                     value=medians[-1] / medians[0], target="about 1 (flat)"))
    return rows


def _window_medians(times: list[float], window: int, n_windows: int) -> list[float]:
    """Median seconds per token in each window-length segment; the first step (the prefill of
    the prompt) is left out of the first segment."""
    segments = [times[k * window:(k + 1) * window] for k in range(n_windows)]
    segments[0] = segments[0][1:]
    return [statistics.median(segment) for segment in segments]


def rolling_cost(quick: bool = False, n_windows: int = 3) -> list[dict]:
    """ms/token in each window-length segment of 3 x max_seq tokens: the rolling policy with ALiBi
    positions, and the exact policy with learned positions for contrast."""
    small = dict(d_model=32, n_heads=2, n_layers=1, d_ff=64, max_seq=8) if quick else {}
    rows = []
    for position, policy in (("alibi", "rolling"), ("learned", "exact")):
        torch.manual_seed(0)
        config = ModelConfig.preset("shakespeare-cpu", position=position, **small)
        model, window = TinyDecoderModel(config).eval(), config.max_seq
        label = f"{'small' if quick else 'shakespeare-cpu'} {position} (random)"
        prompt = torch.zeros(1, 1, dtype=torch.long)
        _step_times(model, prompt, 8, policy)  # warm-up
        medians = _window_medians(_step_times(model, prompt, n_windows * window, policy),
                                  window, n_windows)
        for k, median in enumerate(medians):
            rows.append(dict(model=label, measure=f"{policy} ms/token, tokens {k * window + 1}-"
                             f"{(k + 1) * window}", value=1e3 * median))
        rows.append(dict(model=label, measure=f"{policy} cost, last / first window",
                         value=medians[-1] / medians[0],
                         target="about 1 (flat)" if policy == "rolling" else "above 1"))
    return rows


def policy_speeds(model: TinyDecoderModel, prompt: torch.Tensor, n: int = 500,
                  label: str = "shakespeare-cpu") -> list[dict]:
    """tokens/s for each slide policy the model's positions allow (`rolling` needs relative ones:
    `rolling_cost` measures it), with and without the cache, then the compiled step."""
    _timed(model, prompt, 8)  # warm-up
    rows = []
    for policy in (p for p in POLICIES if p != "rolling" or model.config.position != "learned"):
        for use_cache in (True, False):
            seconds = _timed(model, prompt, n, policy=policy, use_cache=use_cache)
            rows.append(dict(model=label,
                             measure=f"{policy}, {'cache' if use_cache else 'no cache'}",
                             tokens=n, seconds=seconds, tokens_per_s=n / seconds))
    return rows + compiled_speed(model, prompt, n, label)


def compiled_speed(model: TinyDecoderModel, prompt: torch.Tensor, n: int = 500,
                   label: str = "shakespeare-cpu") -> list[dict]:
    """The fast policy with the compiled decode step: compile time, then steady-state tokens/s.

    Two tokens are one eager prefill and the first compiled step, so the first call's time is the
    compile (inductor reuses its on-disk cache across processes: a repeated run compiles faster).
    The timed run follows, as do the eager cached tokens from the same seed to compare with.
    """
    torch.compiler.reset()  # a compile of its own, not one left by an earlier call
    compile_seconds = _timed(model, prompt, 2, policy="fast", compile=True)
    seconds, compiled = _timed_tokens(model, prompt, n, policy="fast", compile=True)
    _, eager = _timed_tokens(model, prompt, n, policy="fast")
    return [
        dict(model=label, measure="fast, cache, compile (one-off)", value=compile_seconds,
             unit="s"),
        dict(model=label, measure="fast, cache, compiled step", tokens=n, seconds=seconds,
             tokens_per_s=n / seconds, target=f">= {TARGET_FAST_TOKENS_PER_S:g} tokens/s",
             met=n / seconds >= TARGET_FAST_TOKENS_PER_S),
        dict(model=label, measure="compiled tokens = eager cached tokens",
             value=torch.equal(compiled, eager), target="same tokens",
             met=torch.equal(compiled, eager)),
    ]


def measure_generation(checkpoint: str | None = None, baby_checkpoint: str | None = None,
                       threads: int | None = None) -> list[dict]:
    """Every row of this benchmark. Checkpoints (run directories) replace the random weights."""
    if threads is not None:
        torch.set_num_threads(threads)
    rows = []
    with torch.inference_mode():
        baby = _load_checkpoint(baby_checkpoint).model if baby_checkpoint else _random_model("baby")
        rows += cache_speedup(baby, label="baby" + ("" if baby_checkpoint else " (random)"))
        if checkpoint:
            loaded = _load_checkpoint(checkpoint)
            model, prompt = loaded.model, torch.tensor([loaded.tokenizer.encode("ROMEO:")])
            label = f"{loaded.path.parent.name} (step {loaded.step})"
        else:
            model, prompt = _random_model("shakespeare-cpu"), torch.arange(6)[None]
            label = "shakespeare-cpu (random)"
        rows += policy_speeds(model, prompt, label=label)
        rows += rolling_cost()
    for row in rows:
        row["threads"] = torch.get_num_threads()
    return rows


def _load_checkpoint(run: str):
    from tinygpt.checkpoint import load_checkpoint

    return load_checkpoint(run, device="cpu")


def _format(row: dict) -> str:
    if "tokens_per_s" in row:
        text = (f"{row['tokens']} tokens in {row['seconds']:.2f} s = "
                f"{row['tokens_per_s']:,.0f} tokens/s")
    elif isinstance(row["value"], bool):
        text = "yes" if row["value"] else "no"
    else:
        text = f"{row['value']:.2f}" + (f" {row['unit']}" if "unit" in row else "")
    if "target" in row:
        text += f"   (target {row['target']}" + (
            f": {'met' if row['met'] else 'NOT met'})" if "met" in row else ")")
    return f"{row['model']:<28} {row['measure']:<40} {text}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint",
                        help="trained shakespeare-cpu run (default: random weights)")
    parser.add_argument("--baby-checkpoint", help="trained baby run (default: random weights)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--quick", action="store_true",
                        help="only the rolling-cache cost, on a small model (a smoke test)")
    args = parser.parse_args()
    keep_freed_memory()  # as the tinygpt command does
    if args.quick:
        with torch.inference_mode():
            rows = rolling_cost(quick=True)
    else:
        rows = measure_generation(args.checkpoint, args.baby_checkpoint, args.threads)
    for row in rows:
        print(_format(row))


if __name__ == "__main__":
    main()
