"""`tinygpt export --to hf OUT`: a checkpoint as a GPT-2 directory in Hugging Face's format, which
`transformers.GPT2LMHeadModel.from_pretrained(OUT)` loads."""

from __future__ import annotations

import argparse
from pathlib import Path

from tinygpt.cli import options

FORMATS = ("hf",)


def register(commands) -> None:
    parser = commands.add_parser("export", help="write a checkpoint in GPT-2's Hugging Face format")
    options.add_checkpoint(parser)
    options.add_lora_merge(parser)
    parser.add_argument("--to", dest="format", required=True, choices=FORMATS,
                        help="hf: GPT-2 in Hugging Face's format, with the tokenizer's files when "
                             "it is a byte-level BPE")
    parser.add_argument("out", metavar="OUT", help="the new directory to write")
    parser.set_defaults(func=handle)


def handle(args: argparse.Namespace) -> None:
    from tinygpt.interop import export_hf

    options.writable_below(Path(args.out), "OUT")
    _, checkpoint = options.load_selected_checkpoint(args)
    out = export_hf(checkpoint.model, checkpoint.tokenizer, args.out)
    print(f"wrote {out} (transformers.GPT2LMHeadModel.from_pretrained loads it)")
