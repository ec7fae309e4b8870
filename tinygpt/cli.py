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


def _add_corpus_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--corpus", default="shakespeare",
                        help="shakespeare, tinyshakespeare, or the path of a UTF-8 text file "
                             "(default: shakespeare)")
    parser.add_argument("--data-dir", default="data/cache",
                        help="where fetched corpora and token files are cached (default: data/cache)")
    parser.add_argument("--tinyshakespeare", default=None, metavar="PATH",
                        help="a local copy of tinyshakespeare's input.txt")
    parser.add_argument("--url", default=None, help="where to download tinyshakespeare from")


def _corpus_file(args: argparse.Namespace):
    from tinygpt import data

    return data.corpus_path(args.corpus, args.data_dir, tinyshakespeare=args.tinyshakespeare,
                            url=args.url or data.TINYSHAKESPEARE_URL)


def _cmd_prepare(args: argparse.Namespace) -> None:
    from tinygpt.data import read_text

    path = _corpus_file(args)
    text = read_text(path)
    print(f"{args.corpus}: {path} ({len(text.encode('utf-8')):,} bytes, {len(set(text))} distinct characters)")


def _cmd_tokenizer_train(args: argparse.Namespace) -> None:
    from tinygpt.data import read_text
    from tinygpt.tokenizer import BPETokenizer

    tokenizer = BPETokenizer.train(read_text(_corpus_file(args)), vocab_size=args.vocab_size)
    tokenizer.save(args.out)
    print(f"BPE tokenizer with {tokenizer.vocab_size} tokens written to {args.out}")


def _cmd_train(args: argparse.Namespace) -> None:
    import hashlib
    import json
    import os
    import time
    from pathlib import Path

    import torch.distributed as dist

    from tinygpt.data import TokenData, prepare_tokens, read_text
    from tinygpt.tokenizer import CharTokenizer, load_tokenizer
    from tinygpt.train import TrainConfig, train

    text = read_text(_corpus_file(args))
    tokenizer = CharTokenizer.from_text(text) if args.tokenizer == "char" else load_tokenizer(args.tokenizer)
    if args.cfg_vocab_size is not None and args.cfg_vocab_size != tokenizer.vocab_size:
        raise ValueError(f"--vocab-size {args.cfg_vocab_size} does not match the tokenizer's "
                         f"vocab_size {tokenizer.vocab_size}.")
    args.cfg_vocab_size = tokenizer.vocab_size
    model_config = config_from_args(args)
    train_config = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    key = hashlib.sha256(json.dumps(tokenizer.to_dict(), sort_keys=True).encode()).hexdigest()[:12]
    token_dir = Path(args.data_dir) / "tokens" / f"{Path(args.corpus).stem}-{key}"

    world = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun
    if world > 1:
        from tinygpt.train import pick_device

        dist.init_process_group("nccl" if pick_device(args.device).type == "cuda" else "gloo")
    try:
        if not dist.is_initialized() or dist.get_rank() == 0:
            prepare_tokens(text, tokenizer, token_dir)
        if dist.is_initialized():
            dist.barrier()
        name = args.name or f"{args.config}-{time.strftime('%Y%m%d-%H%M%S')}"
        run_dir = Path(args.runs_dir) / name
        rank0 = not dist.is_initialized() or dist.get_rank() == 0
        result = train(run_dir, TokenData.open(token_dir), tokenizer, model_config, train_config,
                       resume=args.resume, progress=rank0)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if not rank0:
        return
    val = f", validation loss {result.val_loss:.4f}" if result.val_loss is not None else ""
    print(f"step {result.step}{val}; checkpoint {result.checkpoint}; "
          f"loss curve {run_dir / 'loss_curve.png'}")
    if result.interrupted:
        raise KeyboardInterrupt


def _cmd_sample(args: argparse.Namespace) -> None:
    import torch

    from tinygpt.checkpoint import latest_run, load_checkpoint
    from tinygpt.generate import generate
    from tinygpt.train import pick_device

    ckpt = load_checkpoint(args.run_dir or latest_run(args.runs_dir), device=pick_device(args.device))
    prompt = ckpt.tokenizer.encode(args.prompt)
    if not prompt:
        raise ValueError("the prompt must encode to at least one token.")
    idx = torch.tensor([prompt], dtype=torch.long, device=next(ckpt.model.parameters()).device)
    options = {"top_k": args.top_k} if args.top_k is not None else {}
    generator = torch.Generator(device=idx.device).manual_seed(args.seed)
    out = generate(ckpt.model, idx, max_new_tokens=args.tokens, temperature=args.temperature,
                   generator=generator, **options)
    print(ckpt.tokenizer.decode(out[0].tolist()))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tinygpt", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    summary = commands.add_parser("summary", help="print the per-module parameter table")
    add_config_options(summary)
    summary.set_defaults(run=_cmd_summary)

    prepare = commands.add_parser("prepare", help="fetch a corpus into the data cache")
    _add_corpus_options(prepare)
    prepare.set_defaults(run=_cmd_prepare)

    tokenizer = commands.add_parser("tokenizer", help="tokenizer tools")
    tokenizer_commands = tokenizer.add_subparsers(dest="tokenizer_command", required=True,
                                                  metavar="COMMAND")
    tokenizer_train = tokenizer_commands.add_parser("train", help="train a byte-level BPE tokenizer")
    _add_corpus_options(tokenizer_train)
    tokenizer_train.add_argument("--vocab-size", type=int, default=512)
    tokenizer_train.add_argument("--out", required=True, help="JSON file to write")
    tokenizer_train.set_defaults(run=_cmd_tokenizer_train)

    from tinygpt.train import INITS, TrainConfig

    defaults = TrainConfig()
    train = commands.add_parser("train", help="train a model (torchrun -m tinygpt train for DDP)")
    _add_corpus_options(train)
    train.add_argument("--tokenizer", default="char",
                       help="'char' (built from the corpus) or a tokenizer JSON file")
    train.add_argument("--runs-dir", default="runs")
    train.add_argument("--name", default=None, help="run name (default: PRESET-TIMESTAMP)")
    train.add_argument("--resume", action="store_true", help="continue the run's newest checkpoint")
    for field in dataclasses.fields(TrainConfig):
        default = getattr(defaults, field.name)
        flag = f"--{field.name.replace('_', '-')}"
        if field.name == "device":
            train.add_argument(flag, default=default, choices=("cpu", "cuda", "auto"))
        elif field.name == "init":
            train.add_argument(flag, default=default, choices=INITS,
                               help="weight initialisation (default: the model's own)")
        elif isinstance(default, bool):
            train.add_argument(flag, action="store_true", help="torch.compile the model")
        else:
            train.add_argument(flag, type=type(default), default=default,
                               help=f"(default: {default})")
    add_config_options(train, default_preset="shakespeare-cpu")
    train.set_defaults(run=_cmd_train)

    sample = commands.add_parser("sample", help="generate text from a trained run")
    sample.add_argument("--run", dest="run_dir", default=None,
                        help="run or checkpoint directory (default: the newest run)")
    sample.add_argument("--runs-dir", default="runs")
    sample.add_argument("--prompt", default="\n")
    sample.add_argument("--tokens", type=int, default=500, help="new tokens to generate")
    sample.add_argument("--temperature", type=float, default=0.8)
    sample.add_argument("--top-k", type=int, default=None)
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    sample.set_defaults(run=_cmd_sample)
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
