"""The laptop-CPU char-level recipe on Tiny Shakespeare, eager and compiled, in one run.

The recipe (nanoGPT's char-level Shakespeare settings for a laptop CPU): 4 layers, 4 heads,
d_model 128, context 64, batch 12, 2,000 iterations, peak learning rate 1e-3, dropout 0. Prints
ms/iteration and tokens/s for eager and torch.compile (and their ratio), the final validation loss,
and achieved FLOP/s as a fraction of a measured fp32 matmul peak. Targets: eager <= 60 ms/iter,
compiled >= 16,000 tokens/s, validation loss <= 1.80.

    make bench-train        # or:
    .venv/bin/python benchmarks/train_recipe.py --tinyshakespeare ../shared/data/tinyshakespeare.txt
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from tinygpt.allocator import keep_freed_memory
from tinygpt.config import ModelConfig
from tinygpt.data import TokenData, fetch_tinyshakespeare, prepare_tokens, read_text
from tinygpt.model import TinyDecoderModel
from tinygpt.tokenizer import CharTokenizer
from tinygpt.train import TrainConfig, train

REFERENCE_MS, REFERENCE_VAL = 60.0, 1.886


def matmul_peak(n: int = 1024, repeats: int = 20) -> float:
    """Best fp32 FLOP/s of an n x n matmul on this machine (after a burn-in)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def flops_per_token(config: ModelConfig) -> float:
    """Training FLOPs per token: 6 per parameter (forward + backward) plus the attention scores and
    mixing, 12 * layers * d_model * context (the PaLM / nanoGPT estimate)."""
    params = sum(p.numel() for p in TinyDecoderModel(config).parameters())
    return 6 * params + 12 * config.n_layers * config.d_model * config.max_seq


# The first steps are not timed: allocation warm-up, and compilation under --compile.
BURN_IN = 10


def run(label, token_dir, tokenizer, model_config, train_config, until=None, keep=None):
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(keep or tmp)
        started = time.perf_counter()
        result = train(run_dir, TokenData.open(token_dir), tokenizer, model_config, train_config,
                       until=until)
        wall = time.perf_counter() - started
        records = [
            json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        ]
    steps = [r["ms_per_step"] for r in records if "val_loss" not in r][BURN_IN:]  # and compile
    ms = statistics.median(steps)
    tokens = train_config.batch_size * model_config.max_seq
    val = "-" if result.val_loss is None else f"{result.val_loss:.4f}"
    print(
        f"{label:>8}: {ms:6.1f} ms/iter (median of {len(steps)}), "
        f"{1000 * tokens / ms:8,.0f} tokens/s, "
        f"wall {wall:6.1f} s, final val loss {val}",
        flush=True,
    )
    return ms, result.val_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tinyshakespeare", default=os.environ.get("TINYGPT_TINYSHAKESPEARE") or None
    )
    parser.add_argument("--data-dir", default="data/cache")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument(
        "--compile-steps",
        type=int,
        default=300,
        help="iterations timed with torch.compile (0 to skip)",
    )
    parser.add_argument("--eval-batches", type=int, default=200)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--keep-run",
        default=None,
        metavar="DIR",
        help="keep the eager run (checkpoint, metrics, loss curve) in this new directory",
    )
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="FIELD=VALUE",
        help="override TrainConfig fields, e.g. warmup_steps=50 init=model",
    )
    args = parser.parse_args()
    # Every timed step past the burn-in: fewer would leave nothing to report.
    if args.steps <= BURN_IN:
        parser.error(f"--steps must be more than {BURN_IN} (the burn-in steps left untimed).")
    if 0 < args.compile_steps <= BURN_IN:
        parser.error(f"--compile-steps must be 0 (skip) or more than {BURN_IN} (the burn-in "
                     f"steps left untimed).")
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as the tinygpt command does

    path = fetch_tinyshakespeare(Path(args.data_dir), path=args.tinyshakespeare)
    text = read_text(path)
    tokenizer = CharTokenizer.from_text(text)
    token_dir = prepare_tokens(
        text, tokenizer, Path(args.data_dir) / "tokens" / "bench-tinyshakespeare"
    )
    model_config = ModelConfig.preset(
        "shakespeare-cpu", vocab_size=tokenizer.vocab_size, dropout=0.0
    )
    assert (
        model_config.n_layers,
        model_config.n_heads,
        model_config.d_model,
        model_config.max_seq,
    ) == (4, 4, 128, 64)
    overrides = {}
    for item in args.set:
        name, _, value = item.partition("=")
        default = getattr(TrainConfig(), name)
        overrides[name] = value if isinstance(default, str) else type(default)(value)
    train_config = TrainConfig(
        steps=args.steps,
        batch_size=12,
        lr=1e-3,
        eval_every=args.steps,
        eval_batches=args.eval_batches,
        save_every=args.steps,
        **overrides,
    )
    print(f"torch {torch.__version__}, {args.threads} threads, {train_config}", flush=True)

    peak = matmul_peak()
    per_token = flops_per_token(model_config)
    print(
        f"fp32 matmul peak {peak / 1e9:.1f} GFLOP/s; {per_token / 1e6:.2f} MFLOP per token",
        flush=True,
    )
    eager_ms, val = run(
        "eager", token_dir, tokenizer, model_config, train_config, keep=args.keep_run
    )
    tokens = train_config.batch_size * model_config.max_seq
    print(
        f"eager: {1000 * tokens / eager_ms * per_token / 1e9:.2f} GFLOP/s = "
        f"{1000 * tokens / eager_ms * per_token / peak:.1%} of matmul peak"
    )
    if args.compile_steps:
        compiled_ms, _ = run(
            "compiled",
            token_dir,
            tokenizer,
            model_config,
            replace(train_config, compile=True),
            until=args.compile_steps,
        )
        print(
            f"compiled: {1000 * tokens / compiled_ms * per_token / peak:.1%} of matmul peak; "
            f"compiled/eager speed-up {eager_ms / compiled_ms:.2f}x"
        )
    verdict = lambda ok: "PASS" if ok else "FAIL"  # noqa: E731
    print(
        f"targets: eager <= {REFERENCE_MS:.0f} ms/iter {verdict(eager_ms <= REFERENCE_MS)}; "
        + (
            f"compiled >= 16,000 tokens/s {verdict(1000 * tokens / compiled_ms >= 16000)}; "
            if args.compile_steps
            else ""
        )
        + f"val loss <= 1.80 {verdict(val <= 1.80)} (reference recipe {REFERENCE_VAL})"
    )


if __name__ == "__main__":
    sys.exit(main())
