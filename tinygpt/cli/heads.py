"""`tinygpt heads`: rank a checkpoint's attention heads by the loss rise when each is ablated,
and name the kind of each (previous-token, first-token, self, induction, mixed)."""

from __future__ import annotations

import argparse

from tinygpt.cli import options


def register(commands) -> None:
    parser = commands.add_parser("heads",
                                 help="rank heads by ablation loss rise and classify them")
    options.add_checkpoint(parser)
    options.add_lora_merge(parser)
    options.add_corpus(parser)
    parser.add_argument("--val-fraction", type=float, default=0.1,
                        help="fraction of the corpus at its end used for validation "
                             "(default: 0.1)")
    parser.add_argument("--windows", type=int, default=32,
                        help="validation windows of max_seq tokens (default: 32)")
    parser.add_argument("--threshold", type=float, default=0.4,
                        help="score a head needs to be given a kind (default: 0.4)")
    parser.set_defaults(func=handle)


def handle(args: argparse.Namespace) -> None:
    import torch

    from tinygpt.data import cached_tokens, held_out_tokens, unknown_share
    from tinygpt.inspection import classify_heads, eval_windows, head_importance

    corpus = options.corpus_file(args)
    _, ckpt = options.load_selected_checkpoint(args)
    options.use_dense_twin(ckpt)
    tokens = cached_tokens(corpus, ckpt.tokenizer, args.data_dir)  # memory-mapped, not read whole
    options.note_repaired(tokens)
    held_out = held_out_tokens(tokens.tokens, args.val_fraction,
                               at_least=ckpt.config.max_seq + 1)
    idx, targets = eval_windows(held_out, ckpt.config.max_seq, args.windows)
    options.note_unknown(unknown_share(idx.flatten().numpy(), ckpt.tokenizer),
                         "the validation windows")
    device = next(ckpt.model.parameters()).device
    idx, targets = idx.to(device), targets.to(device)
    base, rise = head_importance(ckpt.model, idx, targets)
    scores = classify_heads(ckpt.model, idx, threshold=args.threshold)
    print(f"validation loss {base:.4f} on {idx.shape[0]} windows of {idx.shape[1]} tokens "
          f"(step {ckpt.step}); loss rise when each head alone is zero-ablated:")
    print(f"{'layer':>5} {'head':>4} {'loss rise':>9} {'prev':>6} {'first':>6} {'self':>6} "
          f"{'induct':>6}  kind")
    for s in scores:
        print(f"{s.layer:>5} {s.head:>4} {rise[s.layer, s.head].item():>+9.4f} "
              f"{s.previous_token:>6.3f} {s.first_token:>6.3f} {s.self_token:>6.3f} "
              f"{s.induction:>6.3f}  {s.kind}")
    top = torch.argmax(rise).item()
    print(f"most important: layer {top // rise.shape[1]} head {top % rise.shape[1]}")
