"""Length extrapolation: train one small model per position kind at one context, then measure its
validation loss on longer windows than it ever saw.

    python -m benchmarks.extrapolation --corpus PATH [--steps N] [--out DIR]

Every model has the same sizes, data, seed and schedule; only `position` differs (learned,
alibi, rope, none). Evaluation windows are the same for every model: fixed offsets into the
validation split, each `L + 1` tokens long, the loss averaged over all L positions and, separately,
over the last 64 (the positions furthest beyond the training context). A learned table has no row
past the training context, so that model is measured at the training context only.

The run also draws validation loss against evaluation length, one line per position kind, to
`--plot` (default `OUT/extrapolation.png`). `--plot-documented PATH` draws the same plot, without
training, from the run whose table docs/variants.md gives (`DOCUMENTED`): that is how
docs/extrapolation.png is made.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from tinygpt.checkpoint import load_checkpoint
from tinygpt.config import ModelConfig
from tinygpt.data import TokenData, cached_tokens
from tinygpt.model import TinyDecoderModel
from tinygpt.tokenizer import CharTokenizer
from tinygpt.train import TrainConfig, train

POSITIONS = ("learned", "alibi", "rope", "none")
EVAL_LENGTHS = (64, 128, 256, 512)
TAIL = 64

# The run in docs/variants.md (600 steps, 48 windows, seed 1337): loss over all positions.
DOCUMENTED = {"train_context": 64, "steps": 600, "rows": [
    {"position": position, "length": length, "loss": loss}
    for position, losses in (("learned", (2.191,)), ("alibi", (2.127, 2.112, 2.094, 2.117)),
                             ("rope", (2.024, 2.106, 2.385, 2.756)),
                             ("none", (2.378, 2.405, 2.457, 2.553)))
    for length, loss in zip(EVAL_LENGTHS, losses)]}


@torch.no_grad()
def window_losses(model: TinyDecoderModel, val: np.ndarray, length: int, n_windows: int,
                  seed: int = 0) -> tuple[float, float]:
    """(mean loss over all positions, mean over the last TAIL) on n_windows fixed windows."""
    generator = torch.Generator().manual_seed(seed)
    offsets = torch.randint(len(val) - length - 1, (n_windows,), generator=generator)
    windows = torch.from_numpy(np.stack([val[o:o + length + 1] for o in offsets.tolist()])
                               .astype(np.int64))
    losses = []
    for row in windows.split(4):
        logits = model(row[:, :-1])
        losses.append(torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), row[:, 1:], reduction="none"))
    loss = torch.cat(losses)  # b t
    return loss.mean().item(), loss[:, -TAIL:].mean().item()


def run(corpus: Path, out: Path, steps: int, n_windows: int, log=print) -> dict:
    text = corpus.read_text(encoding="utf-8")
    tokenizer = CharTokenizer.from_text(text)
    data: TokenData = cached_tokens(corpus, tokenizer, out / "cache")
    base = ModelConfig.preset("shakespeare-cpu", vocab_size=tokenizer.vocab_size, max_seq=64,
                              n_layers=2)
    schedule = TrainConfig(steps=steps, batch_size=12, eval_every=steps, eval_batches=10,
                           save_every=steps, warmup_steps=min(100, steps // 10))
    results = {"corpus": str(corpus), "steps": steps, "train_context": base.max_seq,
               "config": base.to_dict(), "windows": n_windows, "tail": TAIL, "rows": []}
    for position in POSITIONS:
        config = replace(base, position=position)
        log(f"training {position} ({steps} steps, context {config.max_seq})")
        result = train(out / "runs" / position, data, tokenizer, config, schedule)
        trained = load_checkpoint(result.checkpoint).model
        for length in EVAL_LENGTHS:
            if position == "learned" and length > config.max_seq:
                continue
            model = TinyDecoderModel(replace(config, max_seq=max(length, config.max_seq)))
            model.load_state_dict(trained.state_dict())
            mean, tail = window_losses(model.eval(), data.val, length, n_windows)
            log(f"  {position} at {length}: loss {mean:.4f} (last {TAIL}: {tail:.4f})")
            results["rows"].append({"position": position, "length": length, "loss": mean,
                                    "tail_loss": tail})
    return results


def loss_curves(results: dict) -> dict[str, tuple[list[int], list[float]]]:
    """`{position: (lengths, losses)}` from a results dict's rows, lengths ascending."""
    curves: dict[str, tuple[list[int], list[float]]] = {}
    for row in sorted(results["rows"], key=lambda row: row["length"]):
        lengths, losses = curves.setdefault(row["position"], ([], []))
        lengths.append(row["length"])
        losses.append(row["loss"])
    return curves


def plot_extrapolation(results: dict, path: Path) -> Path:
    """Validation loss against evaluation length, one line per position kind, saved to `path`."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.8), layout="constrained")
    ax = fig.subplots()
    for position, (lengths, losses) in loss_curves(results).items():
        ax.plot(lengths, losses, marker="o", label=position)
    ax.axvline(results["train_context"], color="grey", linestyle=":", linewidth=1)
    ax.annotate("training context", (results["train_context"], ax.get_ylim()[1]), fontsize=8,
                xytext=(4, -12), textcoords="offset points", color="grey")
    ax.set_xscale("log", base=2)
    ax.set_xticks(EVAL_LENGTHS, [str(n) for n in EVAL_LENGTHS])
    ax.set_xlabel("evaluation length (tokens)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(f"Length extrapolation, trained at {results['train_context']} tokens")
    ax.grid(alpha=0.3)
    ax.legend(title="position")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.extrapolation",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, help="a text file (required unless "
                        "--plot-documented)")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--windows", type=int, default=64, help="evaluation windows per length")
    parser.add_argument("--out", type=Path, default=Path("runs/extrapolation"))
    parser.add_argument("--plot", type=Path, help="the plot (default: OUT/extrapolation.png)")
    parser.add_argument("--plot-documented", type=Path, metavar="PATH",
                        help="only plot the run docs/variants.md gives, to PATH; no training")
    args = parser.parse_args(argv)
    if args.plot_documented is not None:
        print(f"wrote {plot_extrapolation(DOCUMENTED, args.plot_documented)}")
        return 0
    if args.corpus is None:
        parser.error("--corpus is required to train.")
    results = run(args.corpus, args.out, args.steps, args.windows,
                  log=lambda line: print(line, file=sys.stderr, flush=True))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "extrapolation.json").write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results["rows"], indent=1))
    print(f"wrote {plot_extrapolation(results, args.plot or args.out / 'extrapolation.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
