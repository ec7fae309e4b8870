"""The option groups that several commands share, each defined once with its one default, and
the functions that turn a group's parsed values into what the library takes.

A flag means the same thing, takes the same values and has the same default in every command
that has it; tests/test_cli.py reads the parsers to hold every command to that. The conventions:

- `--checkpoint PATH`: a run directory (its newest checkpoint) or one checkpoint directory;
  without it, the newest run under `--runs-dir` (default `runs`).
- `--device auto|cpu|cuda`, default `auto` (CUDA when present).
- `--seed N` seeds every random draw a command makes (training batches, sampling, LoRA
  batches), default the training loop's: the same command line gives the same result.
- `--compile [BACKEND]`: run the model under torch.compile (bare flag: inductor); absent: eager.
- `--max-new-tokens N` (500) and `--temperature T` (1.0, the model's own distribution).
- `--corpus NAME|PATH` (default shakespeare), with `--data-dir`, `--tinyshakespeare`, `--url`.
- `--config PRESET` (default shakespeare-cpu) with one `--FIELD` per ModelConfig field.
- `--steps`, `--batch-size`, `--lr`: the training loop's defaults, in train and finetune alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
import typing
from pathlib import Path

from tinygpt.config import PRESETS, ModelConfig
from tinygpt.model import planned_parameter_table
from tinygpt.train import TrainConfig

DEVICES = ("auto", "cpu", "cuda")
DEFAULT_PRESET = "shakespeare-cpu"
DEFAULT_COMPILE_BACKEND = "inductor"


def _train_default(name: str):
    """A TrainConfig default, so a shared flag and the library agree without restating it."""
    return TrainConfig.__dataclass_fields__[name].default


def parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


# --- where runs live and which checkpoint to load ---------------------------------------------

def add_runs_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs-dir", default="runs",
                        help="where runs live, one directory each (default: runs)")


def add_checkpoint(parser: argparse.ArgumentParser) -> None:
    """`--checkpoint` (old spelling `--run`, hidden), `--runs-dir` and `--device`."""
    group = parser.add_argument_group("checkpoint")
    group.add_argument("--checkpoint", default=None, metavar="PATH",
                       help="a run directory (its newest checkpoint) or one checkpoint directory "
                            "(default: the newest run under --runs-dir)")
    group.add_argument("--run", dest="checkpoint", default=argparse.SUPPRESS,
                       help=argparse.SUPPRESS)
    add_runs_dir(group)
    add_device(group)
    add_force(group)


def add_lora_merge(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lora", default=None, metavar="DIR",
                        help="merge these adapters (from tinygpt finetune) into the model first")


def load_selected_checkpoint(args: argparse.Namespace):
    """The checkpoint that `add_checkpoint`'s options (and `--lora`, where present) select, on the
    chosen device: `(run or checkpoint path, Checkpoint)`. A model too large for the memory
    available is refused before it is built, unless `--force`."""
    from tinygpt.checkpoint import latest_run, load_checkpoint
    from tinygpt.devices import pick_device

    path = Path(args.checkpoint) if args.checkpoint is not None else latest_run(args.runs_dir)
    if path.is_file():
        raise ValueError(f"--checkpoint {str(path)!r} is a file; give a run directory or one "
                         f"checkpoint directory.")
    config = _checkpoint_config(path)
    if config is not None:
        check_model_fits(config, training=False, force=args.force)
    checkpoint = load_checkpoint(path, device=pick_device(args.device))
    if getattr(args, "lora", None) is not None:
        from tinygpt.lora import load_lora, merge_lora

        checkpoint.model = merge_lora(load_lora(checkpoint.model, args.lora))
    return path, checkpoint


def use_dense_twin(checkpoint) -> None:
    """For the commands that read attention patterns: a tiled checkpoint's model is swapped for
    its dense twin (same weights, same function), with a note, since the tiled core never forms
    the pattern."""
    from tinygpt.inspection import dense_twin

    if checkpoint.config.attention_impl == "tiled":
        note("the checkpoint's attention is tiled, which never forms a pattern; its dense twin "
             "(the same weights and function) is inspected instead.")
        checkpoint.model = dense_twin(checkpoint.model)


def _checkpoint_config(path: Path):
    """The ModelConfig of the checkpoint `path` selects, or None when it cannot be read (loading
    the checkpoint then says why, in its own words)."""
    import json

    from tinygpt.checkpoint import CheckpointError, resolve_checkpoint
    from tinygpt.config import ModelConfig

    try:
        raw = json.loads((resolve_checkpoint(path) / "config.json").read_text(encoding="utf-8"))
        return ModelConfig.from_dict(raw)
    except (CheckpointError, OSError, ValueError, TypeError, AttributeError):
        return None


# --- the size of a model, before it is built -----------------------------------------------------

# Training keeps, per parameter, the fp32 weight, its gradient and AdamW's two moments; using a
# model (sampling, inspection, LoRA on frozen weights) keeps the weight alone.
TRAINING_BYTES_PER_PARAMETER = 16
LOADING_BYTES_PER_PARAMETER = 4


def add_force(parser) -> None:
    parser.add_argument("--force", action="store_true",
                        help="build the model even when it looks too large for the memory "
                             "available")


def available_memory() -> int | None:
    """Bytes of memory the kernel can give without swapping (MemAvailable), or None if unknown."""
    import os

    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_model_fits(config: ModelConfig, *, training: bool, force: bool,
                     available: int | None = None) -> None:
    """Refuse, before anything is allocated, a model whose weights (and, when `training`, its
    gradients and optimizer moments) exceed the memory available; `force` skips the check."""
    if force:
        return
    available = available_memory() if available is None else available
    per_parameter = TRAINING_BYTES_PER_PARAMETER if training else LOADING_BYTES_PER_PARAMETER
    n = sum(count for _, count in planned_parameter_table(config))
    if available is not None and n * per_parameter > available:
        what = "to train (weights, gradients, AdamW moments)" if training else "for its weights"
        raise ValueError(
            f"a model of {n:,} parameters needs {_size(n * per_parameter)} {what}, more than "
            f"the {_size(available)} of memory available; choose a smaller config or pass "
            f"--force."
        )


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:,.1f} GiB" if n_bytes >= 2**30 // 10 else f"{n_bytes / 2**20:.2f} MiB"


# --- device, seed, compile ----------------------------------------------------------------------

def add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", choices=DEVICES,
                        help="auto picks CUDA when present, else the CPU (default: auto)")


SEED_LIMIT = 2**63  # torch seeds are 64-bit; the trainer adds small offsets to its seed


def seed_value(text: str) -> int:
    """A seed torch accepts: an integer from 0 to 2**63 - 1."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(
            f"expected an integer from 0 to 2**63 - 1, got {text!r}")
    return value


def add_seed(parser: argparse.ArgumentParser) -> None:
    default = _train_default("seed")
    parser.add_argument("--seed", type=seed_value, default=default,
                        help=f"seeds every random draw: same seed, same result "
                             f"(default: {default})")


def compile_backend(name: str) -> str:
    """A torch.compile backend that this torch knows, checked before any model is loaded."""
    import torch

    known = torch.compiler.list_backends(exclude_tags=())
    if name not in known:
        raise argparse.ArgumentTypeError(
            f"unknown torch.compile backend {name!r}; this torch has {', '.join(known)}")
    return name


def add_compile(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--compile", nargs="?", const=DEFAULT_COMPILE_BACKEND, default=None,
                        type=compile_backend, metavar="BACKEND",
                        help="run the model under torch.compile with BACKEND (bare --compile: "
                             f"{DEFAULT_COMPILE_BACKEND}); the first steps pay a one-off compile")


# --- sampling -----------------------------------------------------------------------------------

def add_sampling(parser: argparse.ArgumentParser) -> None:
    """How many tokens to draw and from what distribution (old `--tokens` kept, hidden)."""
    group = parser.add_argument_group("sampling")
    group.add_argument("--max-new-tokens", type=int, default=500,
                       help="tokens to generate after the prompt (default: 500)")
    group.add_argument("--tokens", dest="max_new_tokens", type=int, default=argparse.SUPPRESS,
                       help=argparse.SUPPRESS)
    group.add_argument("--temperature", type=float, default=1.0,
                       help="divides the logits; 0 is greedy (default: 1.0, the model's own "
                            "distribution)")
    group.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens")
    group.add_argument("--top-p", type=float, default=None,
                       help="keep the smallest set of most likely tokens reaching probability p")
    add_seed(group)


# --- corpus -------------------------------------------------------------------------------------

def add_corpus(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("corpus")
    group.add_argument("--corpus", default="shakespeare",
                       help="shakespeare, tinyshakespeare, or the path of a UTF-8 text file "
                            "(default: shakespeare)")
    group.add_argument("--data-dir", default="data/cache",
                       help="where fetched corpora and token files are cached "
                            "(default: data/cache)")
    group.add_argument("--tinyshakespeare", default=None, metavar="PATH",
                       help="a local copy of tinyshakespeare's input.txt")
    group.add_argument("--url", default=None, help="where to download tinyshakespeare from")


def note(message: str) -> None:
    """One line on stderr that does not stop the command."""
    print(f"tinygpt: note: {message}", file=sys.stderr)


def note_repaired(tokens) -> None:
    """Tell the user that a damaged token cache was rebuilt (`TokenData.repaired`)."""
    if tokens.repaired is not None:
        note(tokens.repaired)


def note_unknown(share: float, what: str) -> None:
    """Tell the user how much of `what` the tokenizer could not encode (its `<unk>` share)."""
    if share == 1.0:
        note(f"every token of {what} is <unk>: none of its characters is in the checkpoint's "
             f"vocabulary, so the results say nothing about this text.")
    elif share > 0.0:
        note(f"{share:.1%} of the tokens of {what} are <unk> (characters outside the "
             f"checkpoint's vocabulary).")


def note_unknown_characters(tokenizer, text: str, what: str = "") -> None:
    """Tell the user which characters of `text` (named `what`, when the command reads several
    texts) the tokenizer turns into `<unk>`: the model then sees none of them."""
    from tinygpt.generate import unknown_characters

    unknown = unknown_characters(tokenizer, text)
    if unknown:
        of = f" of {what}" if what else ""
        note(f"characters{of} outside the vocabulary became <unk>: "
             f"{' '.join(map(repr, unknown))}")


def corpus_file(args: argparse.Namespace) -> Path:
    """The local file of `add_corpus`'s `--corpus` (a named corpus is fetched once)."""
    from tinygpt import data

    directory_option(args.data_dir, "--data-dir")
    for flag, value in (("--tinyshakespeare", args.tinyshakespeare), ("--url", args.url)):
        if value is not None and args.corpus != "tinyshakespeare":
            note(f"{flag} is read only with --corpus tinyshakespeare; it is ignored for "
                 f"--corpus {args.corpus}.")
    return data.corpus_path(args.corpus, args.data_dir, tinyshakespeare=args.tinyshakespeare,
                            url=args.url or data.TINYSHAKESPEARE_URL)


# --- model config -------------------------------------------------------------------------------

def add_model_config(parser: argparse.ArgumentParser) -> None:
    """`--config PRESET` plus one `--FIELD` option for every ModelConfig field."""
    group = parser.add_argument_group("model config")
    group.add_argument("--config", default=DEFAULT_PRESET, choices=sorted(PRESETS),
                       help=f"named preset (default: {DEFAULT_PRESET})")
    hints = typing.get_type_hints(ModelConfig)
    for field in dataclasses.fields(ModelConfig):
        # The annotation, not the default: `window: int | None = None` takes an int.
        kind = next(t for t in typing.get_args(hints[field.name]) + (hints[field.name],)
                    if t is not type(None))
        kind = {int: int, float: float, bool: parse_bool}.get(kind, str)
        group.add_argument(f"--{field.name.replace('_', '-')}", dest=f"cfg_{field.name}",
                           type=kind, default=None, metavar=field.name.upper(),
                           help=f"override the preset's {field.name}")


def config_from_args(args: argparse.Namespace, **fixed) -> ModelConfig:
    """The preset with every `--FIELD` given on the command line (and `fixed`) replaced."""
    overrides = {
        name[len("cfg_"):]: value
        for name, value in vars(args).items()
        if name.startswith("cfg_") and value is not None
    }
    return ModelConfig.preset(args.config, **{**overrides, **fixed})


# --- optimisation -------------------------------------------------------------------------------

def add_optimizer(parser: argparse.ArgumentParser) -> None:
    """Steps, batch and learning rate, with the training loop's defaults, and `--seed`."""
    group = parser.add_argument_group("optimisation")
    for name, kind, help_ in (("steps", int, "optimizer steps"),
                              ("batch_size", int, "windows per step"),
                              ("lr", float, "AdamW's (peak) learning rate")):
        default = _train_default(name)
        group.add_argument(f"--{name.replace('_', '-')}", type=kind, default=default,
                           help=f"{help_} (default: {default})")
    add_seed(group)


def exit_if_interrupted(signal_name: str | None, saved: str, *, report: bool = True) -> None:
    """End a command that a signal stopped after it saved its work: SIGINT as any Ctrl-C does
    (exit 130), SIGTERM with one line on stderr and exit 143 (128 + 15, what a shell reports
    for a process that SIGTERM killed, so schedulers and `timeout` see what happened)."""
    if signal_name == "SIGINT":
        raise KeyboardInterrupt
    if signal_name is not None:
        if report:
            print(f"tinygpt: stopped by {signal_name}; {saved}.", file=sys.stderr)
        raise SystemExit(128 + signal.Signals[signal_name].value)


# --- prompts and single tokens (patch, lens) -------------------------------------------------

def prompt_ids(ckpt, text: str, what: str):
    """`(1 t)` token ids of `text` (its last max_seq tokens) on the model's device, and the ids."""
    import torch

    ids = ckpt.tokenizer.encode(text)[-ckpt.config.max_seq:]
    if not ids:
        raise ValueError(f"the {what} {text!r} encodes to no tokens.")
    note_unknown_characters(ckpt.tokenizer, text, f"the {what}")
    return torch.tensor([ids], device=next(ckpt.model.parameters()).device), ids


def token_id(ckpt, text: str, flag: str) -> int:
    """The id of `text`, which must encode to exactly one token of the vocabulary (the value of
    `--flag`): a character outside it would silently become `<unk>`."""
    ids = ckpt.tokenizer.encode(text)
    if len(ids) != 1:
        raise ValueError(f"--{flag} {text!r} must be exactly one token, got {len(ids)}.")
    if ckpt.tokenizer.decode(ids) != text:
        raise ValueError(f"--{flag} {text!r} is not in the checkpoint's vocabulary.")
    return ids[0]


def target_and_foil(ckpt, args: argparse.Namespace) -> tuple[int | None, int | None]:
    """The ids of `--target` and `--foil` (None where not given), refusing a foil equal to the
    target: a logit minus itself is zero whatever the model does."""
    target = token_id(ckpt, args.target, "target") if args.target is not None else None
    foil = token_id(ckpt, args.foil, "foil") if args.foil is not None else None
    check_foil(foil, target, args.foil)
    return target, foil


def check_foil(foil: int | None, target: int | None, text: str | None) -> None:
    if foil is not None and foil == target:
        raise ValueError(f"--foil {text!r} is the target token itself, so the logit difference "
                         f"is zero whatever the model does; choose another foil.")


# --- files a command writes ----------------------------------------------------------------------

def output_file(text: str, flag: str) -> Path:
    """The file `flag` names, checked before any work is done: not a directory, and not below a
    file. Missing directories above it are made when it is written (`files.write_atomic`)."""
    path = Path(text)
    if path.is_dir():
        raise ValueError(f"{flag} {text!r} is a directory; give a file name.")
    return writable_below(path, flag)


def writable_below(path: Path, flag: str) -> Path:
    """`path` (a file or a directory to be made), refused when what exists above it is a file:
    making the directories between would fail with the operating system's bare words."""
    above = next(p for p in path.absolute().parents if p.exists())
    if not above.is_dir():
        raise ValueError(f"{flag} {str(path)!r} cannot be written: {str(above)!r} is a file, "
                         f"not a directory.")
    return path


def directory_option(text: str, flag: str) -> Path:
    """A directory the command reads and writes below (`--runs-dir`, `--data-dir`): absent (it
    is made) or a directory, never a file."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {text!r} is a file; give a directory.")
    return writable_below(path, flag)


def figure_file(text: str, flag: str) -> Path:
    """A file matplotlib can draw into, by its extension (none means .png, as matplotlib adds,
    and the name printed says so)."""
    from matplotlib.backend_bases import FigureCanvasBase

    from tinygpt.pictures import figure_path

    path = output_file(text, flag)
    if figure_path(path) != path:
        path = output_file(str(figure_path(path)), flag)
    formats = FigureCanvasBase.get_supported_filetypes()
    if path.suffix[1:].lower() not in formats:
        raise ValueError(f"{flag} {text!r}: a figure cannot be written as {path.suffix!r}; use "
                         f"one of {', '.join('.' + f for f in sorted(formats))}.")
    return path
