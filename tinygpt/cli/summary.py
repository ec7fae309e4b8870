"""`tinygpt summary`: the per-module parameter table of a model config."""

from __future__ import annotations

import argparse

from tinygpt.cli import options
from tinygpt.model import planned_parameter_table


def register(commands) -> None:
    parser = commands.add_parser("summary", help="print the per-module parameter table")
    options.add_model_config(parser)
    parser.set_defaults(func=handle)


def handle(args: argparse.Namespace) -> None:
    config = options.config_from_args(args)
    rows = planned_parameter_table(config)  # from the config: no memory, any size
    width = max(len(name) for name, _ in rows)
    print(f"config {args.config}: {config}")
    print(f"{'module':<{width}}  {'parameters':>10}")
    for name, count in rows:
        print(f"{name:<{width}}  {count:>10,}")
    print(f"{'total':<{width}}  {sum(c for _, c in rows):>10,}")
