"""`tinygpt import`: a GPT-2 (Hugging Face) or nanoGPT checkpoint as a new run, step 0, that
every other command reads like one TinyGPT trained."""

from __future__ import annotations

import argparse

from tinygpt.cli import options


def register(commands) -> None:
    parser = commands.add_parser("import",
                                 help="a GPT-2 (Hugging Face) or nanoGPT checkpoint as a new run")
    parser.add_argument("--from", dest="source", required=True, metavar="SOURCE",
                        help="hf:DIR (written by save_pretrained), hf:NAME (downloaded from the "
                             "Hugging Face Hub) or nanogpt:PATH/ckpt.pt")
    parser.add_argument("--name", default=None,
                        help="run name (default: the model's name, or the directory holding "
                             "the nanoGPT checkpoint)")
    options.add_runs_dir(parser)
    parser.add_argument("--tokenizer-path", default=None, metavar="PATH",
                        help="a directory with GPT-2's tokenizer files, or a TinyGPT tokenizer "
                             "JSON, instead of the tokenizer beside the checkpoint")
    parser.set_defaults(func=handle)


def handle(args: argparse.Namespace) -> None:
    from tinygpt.interop import default_run_name, import_checkpoint
    from tinygpt.rundir import check_run_name

    name = check_run_name(args.name) if args.name is not None else default_run_name(args.source)
    run_dir = options.directory_option(args.runs_dir, "--runs-dir") / name
    imported = import_checkpoint(args.source, run_dir, tokenizer=args.tokenizer_path)
    count = sum(p.numel() for p in imported.model.parameters())
    print(f"imported {args.source}: {count:,} parameters, {imported.tokenizer.vocab_size:,} "
          f"tokens -> {imported.checkpoint}")
