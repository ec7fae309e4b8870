"""`tinygpt prepare`: fetch a corpus into the data cache and describe it."""

from __future__ import annotations

import argparse

from tinygpt.cli import options


def register(commands) -> None:
    parser = commands.add_parser("prepare", help="fetch a corpus into the data cache")
    options.add_corpus(parser)
    parser.set_defaults(func=handle)


def handle(args: argparse.Namespace) -> None:
    from tinygpt.data import read_text

    path = options.corpus_file(args)
    text = read_text(path)
    print(f"{args.corpus}: {path} ({len(text.encode('utf-8')):,} bytes, "
          f"{len(set(text))} distinct characters)")
