"""`tinygpt tokenizer train`: a byte-level BPE tokenizer learnt from a corpus."""

from __future__ import annotations

import argparse

from tinygpt.cli import options


def register(commands) -> None:
    parser = commands.add_parser("tokenizer", help="tokenizer tools")
    tools = parser.add_subparsers(dest="tokenizer_command", required=True, metavar="COMMAND")
    train = tools.add_parser("train", help="train a byte-level BPE tokenizer")
    options.add_corpus(train)
    train.add_argument("--vocab-size", type=int, required=True,
                       help="tokens in the vocabulary: the 256 bytes plus the merges learnt")
    train.add_argument("--out", required=True, help="JSON file to write")
    train.set_defaults(func=handle_train)


def handle_train(args: argparse.Namespace) -> None:
    from tinygpt.data import read_text
    from tinygpt.tokenizer import BPETokenizer

    out = options.output_file(args.out, "--out")  # before training, which takes a while
    tokenizer = BPETokenizer.train(read_text(options.corpus_file(args)),
                                   vocab_size=args.vocab_size)
    tokenizer.save(out)
    if tokenizer.vocab_size < args.vocab_size:
        options.note(f"the corpus gave {tokenizer.vocab_size} tokens, fewer than --vocab-size "
                     f"{args.vocab_size}: no pair of adjacent tokens is left in it to merge.")
    print(f"BPE tokenizer with {tokenizer.vocab_size} tokens written to {args.out}")
