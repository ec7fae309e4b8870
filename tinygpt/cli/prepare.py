"""`tinygpt prepare`: fetch a corpus into the data cache and describe it."""

from __future__ import annotations

import argparse

from tinygpt.cli import options


def register(commands) -> None:
    parser = commands.add_parser("prepare", help="fetch a corpus into the data cache")
    options.add_corpus(parser)
    parser.set_defaults(func=handle)


def handle(args: argparse.Namespace) -> None:
    from tinygpt.data import text_chunks

    path = options.corpus_file(args)
    characters: set[str] = set()
    for chunk in text_chunks(path):  # in pieces: a corpus larger than memory is described too
        characters.update(chunk)
    print(f"{args.corpus}: {path} ({path.stat().st_size:,} bytes, "
          f"{len(characters)} distinct characters)")
