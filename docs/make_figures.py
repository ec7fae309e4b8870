"""Make the figures of the README and docs/tour.md, and print the head table quoted there.

    .venv/bin/python docs/make_figures.py                      # train a small model (~2-3 min)
    .venv/bin/python docs/make_figures.py --checkpoint runs/X  # or use a trained run

Without --checkpoint it trains a small character model on Tiny Shakespeare (the file named by
--corpus or $TINYGPT_TINYSHAKESPEARE, which `make` exports) with a fixed seed.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from matplotlib.figure import Figure

from tinygpt import ModelConfig, TinyDecoderModel, next_token_loss
from tinygpt.inspection import (
    classify_heads,
    eval_windows,
    head_importance,
    run_with_cache,
)
from tinygpt.pictures import attention_patterns, display_token, plot_attention_grid
from tinygpt.tokenizer import CharTokenizer

HERE = Path(__file__).resolve().parent
PROMPT = "ROMEO:\nBut soft, what light"


def train(text: str, steps: int, seed: int = 0):
    tokenizer = CharTokenizer.from_text(text)
    ids = torch.tensor(tokenizer.encode(text))
    split = int(0.9 * len(ids))
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, d_model=64, n_heads=4, n_layers=2,
                         d_ff=256, max_seq=64, norm_first=True, activation="gelu")
    model = TinyDecoderModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    generator = torch.Generator().manual_seed(seed)
    offsets = torch.arange(config.max_seq + 1)
    start = time.perf_counter()
    for step in range(steps):
        starts = torch.randint(0, split - config.max_seq - 1, (32, 1), generator=generator)
        rows = ids[starts + offsets]
        loss = next_token_loss(model(rows[:, :-1]), rows[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 250 == 0 or step == steps - 1:
            print(f"step {step:5d} loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)")
    return model.eval(), tokenizer, ids[split:].tolist()


def step_figure(model, tokenizer, path: Path, layer: int, head: int) -> None:
    """Scores, masked scores and weights of one head: the three steps of the tour side by side."""
    ids = tokenizer.encode(PROMPT)
    prefix = f"blocks.{layer}.attention.hook_"
    _, cache = run_with_cache(model, torch.tensor([ids]),
                              [prefix + n for n in ("scores", "masked_scores", "pattern")])
    labels = [display_token(tokenizer.decode([i])) for i in ids]
    fig = Figure(figsize=(12, 4.4), layout="constrained")
    axes = fig.subplots(1, 3)
    for ax, name, title in zip(axes, ("scores", "masked_scores", "pattern"),
                               ("scores q·kᵀ/√d", "+ causal mask (−inf above the diagonal)",
                                "softmax: attention weights")):
        values = cache[prefix + name][0, head].clone()
        values[torch.isinf(values)] = float("nan")  # drawn blank
        image = ax.imshow(values.numpy(), cmap="viridis")
        ax.set_title(f"layer {layer} head {head}: {title}", fontsize=9)
        ax.set_xticks(range(len(ids)), labels, fontsize=7)
        ax.set_yticks(range(len(ids)), labels, fontsize=7)
        fig.colorbar(image, ax=ax, shrink=0.7)
    fig.savefig(path, dpi=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="a trained run directory")
    parser.add_argument("--corpus", default=os.environ.get("TINYGPT_TINYSHAKESPEARE"))
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--out-dir", type=Path, default=HERE)
    parser.add_argument("--save-run", type=Path, default=None,
                        help="also save the trained model as a run, for the tinygpt commands")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a busy 2-core box two threads that "
                        "fight for the cores measured 10x slower than one)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.checkpoint:
        from tinygpt.checkpoint import load_checkpoint

        ckpt = load_checkpoint(args.checkpoint)
        model, tokenizer = ckpt.model, ckpt.tokenizer
        ids = tokenizer.encode(Path(args.corpus).read_text(encoding="utf-8"))
        held_out = ids[int(0.9 * len(ids)):]
    else:
        if not args.corpus:
            parser.error("give --corpus FILE (or set TINYGPT_TINYSHAKESPEARE) or --checkpoint RUN")
        text = Path(args.corpus).read_text(encoding="utf-8")
        model, tokenizer, held_out = train(text, args.steps)
        if args.save_run:
            from tinygpt.checkpoint import save_checkpoint

            print("saved", save_checkpoint(args.save_run, model=model, tokenizer=tokenizer,
                                           step=args.steps))

    ids = tokenizer.encode(PROMPT)[-model.config.max_seq:]
    tokens = [tokenizer.decode([i]) for i in ids]
    patterns = attention_patterns(model, torch.tensor([ids]))
    print("wrote", plot_attention_grid(patterns, tokens, args.out_dir / "attention.png",
                                       title="TinyGPT attention, layers by heads"))

    idx, targets = eval_windows(held_out, model.config.max_seq, 64)
    base, rise = head_importance(model, idx, targets)
    scores = classify_heads(model, idx)
    print(f"\nvalidation loss {base:.3f} on {idx.shape[0]} windows of {idx.shape[1]} characters\n")
    print("| layer | head | loss rise when ablated | previous-token | first-token | self | kind |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for s in scores:
        print(f"| {s.layer} | {s.head} | {rise[s.layer, s.head].item():+.3f} | "
              f"{s.previous_token:.2f} | {s.first_token:.2f} | {s.self_token:.2f} | {s.kind} |")
    best = max(scores, key=lambda s: s.previous_token)
    step_figure(model, tokenizer, args.out_dir / "tour-steps.png", best.layer, best.head)
    print("wrote", args.out_dir / "tour-steps.png")


if __name__ == "__main__":
    main()
