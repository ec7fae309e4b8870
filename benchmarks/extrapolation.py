"""Length extrapolation: train one small model per position kind at one context, then measure its
validation loss on longer windows than it ever saw.

    python -m benchmarks.extrapolation --corpus PATH [--steps N] [--out DIR]

Every model has the same sizes, data, seed and schedule; only `position` differs (learned,
alibi, rope, none). Evaluation windows are the same for every model: fixed offsets into the
validation split, each `L + 1` tokens long, the loss averaged over all L positions and, separately,
over the last 64 (the positions furthest beyond the training context). A learned table has no row
past the training context, so that model is measured at the training context only.
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.extrapolation",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, required=True, help="a text file")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--windows", type=int, default=64, help="evaluation windows per length")
    parser.add_argument("--out", type=Path, default=Path("runs/extrapolation"))
    args = parser.parse_args(argv)
    results = run(args.corpus, args.out, args.steps, args.windows,
                  log=lambda line: print(line, file=sys.stderr, flush=True))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "extrapolation.json").write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results["rows"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
