"""`tinygpt generate` (alias `sample`): continue a prompt with a trained checkpoint, by sampling
(optionally streamed) or by beam search."""

from __future__ import annotations

import argparse
import sys

from tinygpt.cli import options


def register(commands) -> None:
    from tinygpt.generate import POLICIES

    parser = commands.add_parser("generate", aliases=["sample"],
                                 help="continue a prompt with a trained checkpoint")
    options.add_checkpoint(parser)
    parser.add_argument("--prompt", default="", help="text to continue (empty: a newline)")
    options.add_sampling(parser)
    parser.add_argument("--beam", type=int, default=None, metavar="W",
                        help="beam search of width W instead of sampling; prints the W best")
    parser.add_argument("--stop", action="append", metavar="TEXT",
                        help="end the text before TEXT (repeatable)")
    parser.add_argument("--stream", action="store_true", help="print the text as it is produced")
    parser.add_argument("--no-cache", action="store_true",
                        help="recompute the context every step instead of using the KV cache")
    parser.add_argument("--policy", choices=POLICIES, default="exact",
                        help="when the context outgrows max_seq: exact slides it every token; "
                             "fast keeps its newest half and re-fills the cache once; "
                             "rolling (ALiBi, RoPE or no positions) drops the oldest cached key "
                             "each token (default: exact)")
    options.add_compile(parser)
    parser.set_defaults(func=handle)


def handle(args: argparse.Namespace) -> None:
    import torch

    from tinygpt.generate import beam_search, encode_prompt, stream, unknown_characters

    _refuse_combinations(args)
    _, checkpoint = options.load_selected_checkpoint(args)
    model, tokenizer = checkpoint.model, checkpoint.tokenizer
    prompt = args.prompt or "\n"
    ids = encode_prompt(tokenizer, prompt)
    options.note_unknown_characters(tokenizer, prompt)
    for text in args.stop or ():
        unknown = unknown_characters(tokenizer, text)
        if unknown:
            options.note(f"--stop {text!r} holds characters outside the vocabulary "
                         f"({' '.join(map(repr, unknown))}), which the model never writes; it "
                         f"cannot end the text.")
    decoding = {"use_cache": not args.no_cache, "policy": args.policy,
                "compile": args.compile or False}
    if args.beam is not None:
        beams = beam_search(model, [ids], args.max_new_tokens, beam_width=args.beam, **decoding)
        for rank, beam in enumerate(beams, 1):
            print(f"--- beam {rank}: log-prob {beam.log_prob:.4f}")
            print(tokenizer.decode(beam.tokens.tolist()))
        return
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(args.seed)
    pieces = stream(model, tokenizer, prompt, args.max_new_tokens, stop=args.stop or (),
                    temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    generator=generator, **decoding)
    if args.stream:
        sys.stdout.write(prompt)
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return
    drawn: list[str] = []
    try:
        for piece in pieces:
            drawn.append(piece)
    except KeyboardInterrupt:  # print what was drawn so far, then end as interrupted (code 130)
        print(prompt + "".join(drawn))
        raise
    print(prompt + "".join(drawn))


def _refuse_combinations(args: argparse.Namespace) -> None:
    """Options that cannot work together, refused before the checkpoint is loaded rather than
    one of them silently ignored."""
    if args.beam is not None and args.stream:
        raise ValueError("--stream shows sampled text as it is drawn; it cannot be used with "
                         "--beam.")
    if args.beam is not None and args.stop:
        raise ValueError("--stop ends sampled text; beam search ranks whole continuations and "
                         "cannot be used with it.")
    sampling = [flag for flag, given in (("--temperature", args.temperature != 1.0),
                                         ("--top-k", args.top_k is not None),
                                         ("--top-p", args.top_p is not None)) if given]
    if args.beam is not None and sampling:
        raise ValueError(f"{sampling[0]} shapes the distribution tokens are sampled from; beam "
                         f"search samples nothing (it keeps the most likely continuations) and "
                         f"cannot be used with it.")
    if args.policy == "rolling" and (args.no_cache or args.compile):
        raise ValueError(f"--policy rolling drops keys from the eager KV cache; it cannot be used "
                         f"with {'--no-cache' if args.no_cache else '--compile'}.")
    if args.compile and args.no_cache:
        raise ValueError("--compile speeds up the cached decode step; it cannot be used with "
                         "--no-cache.")
