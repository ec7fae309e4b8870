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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tinygpt", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    summary = commands.add_parser("summary", help="print the per-module parameter table")
    add_config_options(summary)
    summary.set_defaults(run=_cmd_summary)
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
