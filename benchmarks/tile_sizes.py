"""How the tiled attention's speed depends on its tile sizes, against the fused SDPA kernel.

    python -m benchmarks.tile_sizes [--contexts 512 2048] [--threads 2] [--rounds 5]

The attention core alone (q, k, v `(1 h t d)` with 6 heads of width 64, the sweep's width),
causal, forward + backward, fp32. Each tile size is timed in the same interleaved rounds as
`F.scaled_dot_product_attention`, and reported as the paired ratio of the two (below 1 is faster
than the fused kernel), so that load on a shared machine cancels out of the comparison.
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
import torch.nn.functional as F

from benchmarks.harness import Budget, measure, paired_ratio
from tinygpt.tiled import TileMask, tiled_attention

SIZES = ((64, 256), (128, 128), (128, 256), (128, 512), (256, 256), (256, 512))


def _step(run, q, k, v, grad_out) -> None:
    run(q, k, v).backward(grad_out)


def tile_table(context: int, *, threads: int, rounds: int, sizes=SIZES) -> list[dict]:
    """One row per tile size: median ms and the paired ratio to SDPA, at one context length."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 6, context, 64, generator=generator).requires_grad_()
               for _ in range(3))
    grad_out = torch.randn(1, 6, context, 64, generator=generator)
    runs = {"sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)}
    for rows, cols in sizes:
        runs[f"{rows}x{cols}"] = partial(
            lambda q, k, v, rows, cols: tiled_attention(q, k, v, TileMask(causal=True),
                                                        query_tile=rows, key_tile=cols)[0],
            rows=rows, cols=cols)
    timings = measure({name: partial(_step, run, q, k, v, grad_out) for name, run in runs.items()},
                      threads=threads, budget=Budget(rounds=rounds, round_time=0.05), warmup=1)
    reference = timings["sdpa"].round_medians_s
    return [{"context": context, "tiles": name, "median_ms": timing.median_s * 1e3,
             "ratio_vs_sdpa": paired_ratio(timing.round_medians_s, reference).median}
            for name, timing in timings.items()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tile_sizes",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    print("| context | tiles (rows x keys) | median ms | x SDPA (paired) |")
    print("| --- | --- | --- | --- |")
    for context in args.contexts:
        for row in tile_table(context, threads=args.threads, rounds=args.rounds):
            print(f"| {row['context']} | {row['tiles']} | {row['median_ms']:.1f} | "
                  f"{row['ratio_vs_sdpa']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
