"""The `tinygpt` command line: a thin map from commands to library calls.

The library raises exceptions with one clear sentence; this module alone turns them into a
one-line message on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from tinygpt.config import PRESETS, ModelConfig


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_config_options(parser: argparse.ArgumentParser, default_preset: str = "seed") -> None:
    """`--config PRESET` plus one `--FIELD` option for every ModelConfig field."""
    group = parser.add_argument_group("model config")
    group.add_argument("--config", default=default_preset, choices=sorted(PRESETS),
                       help=f"named preset (default: {default_preset})")
    for field in dataclasses.fields(ModelConfig):
        kind = {int: int, float: float, bool: _parse_bool}.get(
            type(ModelConfig.__dataclass_fields__[field.name].default), str)
        group.add_argument(f"--{field.name.replace('_', '-')}", dest=f"cfg_{field.name}",
                           type=kind, default=None, metavar=field.name.upper(),
                           help=f"override the preset's {field.name}")


def config_from_args(args: argparse.Namespace) -> ModelConfig:
    overrides = {
        name[len("cfg_"):]: value
        for name, value in vars(args).items()
        if name.startswith("cfg_") and value is not None
    }
    return ModelConfig.preset(args.config, **overrides)


def _cmd_summary(args: argparse.Namespace) -> None:
    from tinygpt.model import TinyDecoderModel, parameter_table

    config = config_from_args(args)
    rows = parameter_table(TinyDecoderModel(config))
    width = max(len(name) for name, _ in rows)
    print(f"config {args.config}: {config}")
    print(f"{'module':<{width}}  {'parameters':>10}")
    for name, count in rows:
        print(f"{name:<{width}}  {count:>10,}")
    print(f"{'total':<{width}}  {sum(c for _, c in rows):>10,}")


def _resolve_device(name: str) -> str:
    """`auto` picks CUDA when present, else the CPU."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but no CUDA device is available.")
    return name


def _cmd_generate(args: argparse.Namespace) -> None:
    import torch

    from tinygpt.checkpoint import latest_run, load_checkpoint
    from tinygpt.generate import beam_search, encode_prompt, stream, unknown_characters

    if args.beam is not None and args.stream:
        raise ValueError("--stream shows sampled text as it is drawn; it cannot be used with "
                         "--beam.")
    device = _resolve_device(args.device)
    checkpoint = load_checkpoint(args.checkpoint or latest_run(args.runs_dir), device=device)
    model, tokenizer = checkpoint.model, checkpoint.tokenizer
    prompt = args.prompt or "\n"  # an empty prompt starts from a newline
    ids = encode_prompt(tokenizer, prompt)
    unknown = unknown_characters(tokenizer, prompt)
    if unknown:
        print(f"tinygpt: note: characters outside the vocabulary became <unk>: "
              f"{' '.join(map(repr, unknown))}", file=sys.stderr)
    if args.beam is not None:
        beams = beam_search(model, [ids], args.max_new_tokens, beam_width=args.beam,
                            use_cache=not args.no_cache, policy=args.policy)
        for rank, beam in enumerate(beams, 1):
            print(f"--- beam {rank}: log-prob {beam.log_prob:.4f}")
            print(tokenizer.decode(beam.tokens.tolist()))
        return
    generator = None
    if args.seed is not None:
        generator = torch.Generator(device=device).manual_seed(args.seed)
    pieces = stream(model, tokenizer, prompt, args.max_new_tokens, stop=args.stop or (),
                    temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    use_cache=not args.no_cache, policy=args.policy, generator=generator)
    if args.stream:
        sys.stdout.write(prompt)
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    else:
        print(prompt + "".join(pieces))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tinygpt", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    summary = commands.add_parser("summary", help="print the per-module parameter table")
    add_config_options(summary)
    summary.set_defaults(run=_cmd_summary)

    gen = commands.add_parser("generate", help="continue a prompt with a trained checkpoint")
    gen.add_argument("--checkpoint", default=None, metavar="RUN",
                     help="run directory (runs/NAME) or one of its ckpt-* directories "
                          "(default: the newest run under --runs-dir)")
    gen.add_argument("--runs-dir", default="runs", help="where runs live (default: runs)")
    gen.add_argument("--prompt", default="", help="text to continue (empty: start from a newline)")
    gen.add_argument("--max-new-tokens", type=int, default=500)
    gen.add_argument("--temperature", type=float, default=1.0, help="0 is greedy (default: 1.0)")
    gen.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens")
    gen.add_argument("--top-p", type=float, default=None,
                     help="keep the smallest set of most likely tokens reaching probability p")
    gen.add_argument("--seed", type=int, default=None,
                     help="seed the sampler: same seed, same text")
    gen.add_argument("--beam", type=int, default=None, metavar="W",
                     help="beam search of width W instead of sampling; prints the W best")
    gen.add_argument("--stop", action="append", metavar="TEXT",
                     help="end the text before TEXT (repeatable)")
    gen.add_argument("--stream", action="store_true", help="print the text as it is produced")
    gen.add_argument("--no-cache", action="store_true",
                     help="recompute the context every step instead of using the KV cache")
    gen.add_argument("--policy", choices=("exact", "fast"), default="exact",
                     help="when the context outgrows max_seq: exact slides it every token; fast "
                          "keeps its newest half and re-fills the cache once (default: exact)")
    gen.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    gen.set_defaults(run=_cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, TypeError, OSError, KeyError, RuntimeError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"tinygpt: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tinygpt: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
