"""`tinygpt finetune`: fine-tune LoRA adapters (through peft) on a corpus, beside the base run."""

from __future__ import annotations

import argparse
from pathlib import Path

from tinygpt.cli import options


def register(commands) -> None:
    from tinygpt.lora import LORA_TARGETS, LoraSettings

    defaults = LoraSettings()
    parser = commands.add_parser("finetune", help="fine-tune LoRA adapters on a corpus (peft)")
    options.add_checkpoint(parser)
    options.add_corpus(parser)
    group = parser.add_argument_group("LoRA")
    group.add_argument("--lora-rank", type=int, default=defaults.rank,
                       help=f"adapter rank r (default: {defaults.rank})")
    group.add_argument("--lora-alpha", type=float, default=defaults.alpha,
                       help=f"scale alpha (default: {defaults.alpha:g})")
    group.add_argument("--lora-targets", nargs="+", default=list(defaults.targets),
                       metavar="TARGET",
                       help=f"linear layers to adapt, from: {' '.join(LORA_TARGETS)} "
                            f"(default: {' '.join(defaults.targets)})")
    options.add_optimizer(parser)
    parser.add_argument("--out", default=None,
                        help="adapter directory (default: RUN/lora, beside the base checkpoints)")
    parser.set_defaults(func=handle)


def handle(args: argparse.Namespace) -> None:
    from tinygpt.data import cached_tokens, unknown_share
    from tinygpt.inspection import loss_ends
    from tinygpt.lora import (
        LoraSettings,
        adapter_lock,
        add_lora,
        check_adapter_directory,
        finetune,
        save_lora,
    )
    from tinygpt.train import StopSignals

    settings = LoraSettings(rank=args.lora_rank, alpha=args.lora_alpha,
                            targets=tuple(args.lora_targets))
    corpus = options.corpus_file(args)
    run, ckpt = options.load_selected_checkpoint(args)
    tokens = cached_tokens(corpus, ckpt.tokenizer, args.data_dir)  # memory-mapped, not read whole
    options.note_repaired(tokens)
    options.note_unknown(unknown_share(tokens.tokens, ckpt.tokenizer), "the corpus")
    out = Path(args.out) if args.out is not None else Path(run) / "lora"
    check_adapter_directory(options.writable_below(out, "--out"))  # they replace what is there
    # Locked before training: a second fine-tuning into the same directory is refused at once.
    with StopSignals() as stop, adapter_lock(out):
        adapted = add_lora(ckpt.model, settings)
        losses = finetune(adapted, tokens.tokens, steps=args.steps, batch_size=args.batch_size,
                          lr=args.lr, seed=args.seed,
                          should_stop=lambda: stop.received is not None)
        save_lora(adapted, out)
    if losses:
        first, last, k = loss_ends(losses)
        print(f"LoRA rank {settings.rank} on {', '.join(settings.targets)}: mean loss "
              f"{first:.4f} (first {k} steps) -> {last:.4f} (last {k}) in {len(losses)} steps")
    print(f"wrote adapters to {out}")
    options.exit_if_interrupted(stop.received, f"saved the adapters of step {len(losses)} to {out}")
