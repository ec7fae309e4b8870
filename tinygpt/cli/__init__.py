"""The `tinygpt` command line: a thin map from commands to library calls.

One module per command registers its parser beside its handler; the option groups that several
commands share live in `tinygpt.cli.options`, defined once. The library raises exceptions with one
clear sentence; this package alone turns them into one line on stderr and exit code 2 (with the
full traceback under `--debug` or TINYGPT_DEBUG=1).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import traceback

from tinygpt.allocator import keep_freed_memory
from tinygpt.cli import (
    experiment,
    export,
    finetune,
    generate,
    heads,
    import_,
    inspect,
    lens,
    patch,
    prepare,
    summary,
    tokenizer,
    train,
)

COMMANDS = (summary, prepare, tokenizer, train, generate, heads, inspect, patch, lens, finetune,
            experiment, import_, export)
DEBUG_VARIABLE = "TINYGPT_DEBUG"


def expected_errors() -> tuple[type[BaseException], ...]:
    """What bad input raises: ValueError (the project's CorpusError, CheckpointError and
    TokenizerError among them), OSError, and a loss gone non-finite. Anything else is a bug and
    keeps its traceback."""
    from tinygpt.train import NonFiniteLossError

    return (ValueError, OSError, NonFiniteLossError)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser: `--debug` and one subcommand per module of `COMMANDS`."""
    parser = argparse.ArgumentParser(prog="tinygpt", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true",
                        help=f"show the full traceback of an error (or set {DEBUG_VARIABLE}=1)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.register(commands)
    for each in _parsers(parser):
        each.allow_abbrev = False  # a flag has one spelling: no prefixes that a new flag breaks
    return parser


def _parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """`parser` and every subcommand parser below it."""
    found = [parser]
    for action in parser._actions:  # argparse offers no public way to reach the subparsers
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                found.extend(_parsers(child))
    return found


def _debugging(args: argparse.Namespace) -> bool:
    return args.debug or os.environ.get(DEBUG_VARIABLE, "") not in ("", "0")


def main(argv: list[str] | None = None) -> int:
    """Run one command; return its exit code (0, 2 for bad input, 130 when interrupted)."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except BrokenPipeError:
        raise  # the reader of stdout left (`| head`): not an error of the input; see `run`
    except expected_errors() as error:
        if _debugging(args):
            traceback.print_exception(error, file=sys.stderr)
        print(f"tinygpt: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tinygpt: interrupted", file=sys.stderr)
        return 130
    return 0


def _one_line(error: BaseException) -> str:
    """The error's first line; an operating system error that carries no sentence of ours
    ("[Errno 21] Is a directory: 'x'") as the file and what went wrong, in words."""
    if isinstance(error, OSError) and str(error).startswith("[Errno") and error.filename:
        files = " -> ".join(repr(str(f)) for f in (error.filename, error.filename2) if f)
        return f"cannot use {files}: {error.strerror[:1].lower()}{error.strerror[1:]}."
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def run() -> None:
    """The `tinygpt` program. It owns its process, so it keeps freed memory (see
    `tinygpt.allocator`); `main`, which tests also call in-process, leaves the process alone."""
    keep_freed_memory()
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader closed the pipe, as `tinygpt summary | head` does: stop quietly, like any
        # Unix filter, with the exit code of SIGPIPE. Later writes to stdout (the interpreter's
        # own flush at exit) go to /dev/null instead of raising again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 128 + signal.SIGPIPE
    sys.exit(code)
