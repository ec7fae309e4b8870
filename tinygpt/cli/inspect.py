"""`tinygpt inspect`: draw every head's attention on a prompt, as a PNG grid or an HTML page."""

from __future__ import annotations

import argparse

from tinygpt.cli import options


def register(commands) -> None:
    parser = commands.add_parser("inspect", help="draw every head's attention on a prompt")
    options.add_checkpoint(parser)
    options.add_lora_merge(parser)
    parser.add_argument("--prompt", required=True, help="text whose attention is drawn")
    parser.add_argument("--out", default=None, help="PNG grid of heatmaps, layers by heads")
    parser.add_argument("--html", default=None, help="self-contained interactive HTML page")
    parser.set_defaults(func=handle)


def handle(args: argparse.Namespace) -> None:
    import torch

    from tinygpt.pictures import (
        attention_patterns,
        blocked_cells,
        mask_note,
        plot_attention_grid,
        save_attention_html,
    )

    if args.out is None and args.html is None:
        raise ValueError("give --out FILE.png, --html FILE.html or both.")
    if not args.prompt:
        raise ValueError("the prompt is empty.")
    png = options.figure_file(args.out, "--out") if args.out is not None else None
    page = options.output_file(args.html, "--html") if args.html is not None else None
    if png is not None and page is not None and png.resolve() == page.resolve():
        raise ValueError(f"--out and --html name the same file {str(png)!r}; the page would "
                         f"overwrite the figure.")
    run, ckpt = options.load_selected_checkpoint(args)
    options.use_dense_twin(ckpt)
    ids = ckpt.tokenizer.encode(args.prompt)
    if not ids:
        raise ValueError(f"the prompt {args.prompt!r} encodes to no tokens.")
    options.note_unknown_characters(ckpt.tokenizer, args.prompt, "the prompt")
    shown = args.prompt
    if len(ids) > ckpt.config.max_seq:  # the model sees max_seq tokens: draw its last ones
        ids = ids[-ckpt.config.max_seq:]
        shown = ckpt.tokenizer.decode(ids)
        options.note(f"the prompt has more tokens than max_seq = {ckpt.config.max_seq}; only its "
                     f"last {ckpt.config.max_seq} are drawn.")
    idx = torch.tensor([ids], device=next(ckpt.model.parameters()).device)
    patterns = attention_patterns(ckpt.model, idx)
    blocked, note = blocked_cells(ckpt.model, idx), mask_note(ckpt.model)
    tokens = [ckpt.tokenizer.decode([i]) for i in ids]
    cut = "last tokens of the prompt: " if shown != args.prompt else ""
    title = f"{run} (step {ckpt.step}): {cut}{shown[-60:] if cut else shown[:60]!r}"
    if png is not None:
        print(f"wrote {plot_attention_grid(patterns, tokens, png, title, blocked, note)}")
    if page is not None:
        print(f"wrote {save_attention_html(patterns, tokens, page, title, blocked, note)}")
