"""`tinygpt train`: train (or resume) a run, alone or under `torchrun` for data parallelism."""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path

from tinygpt.cli import options


def register(commands) -> None:
    from tinygpt.train import INITS, TrainConfig

    parser = commands.add_parser("train", help="train a model (torchrun -m tinygpt train for DDP)")
    options.add_corpus(parser)
    parser.add_argument("--tokenizer", default="char",
                        help="'char' (built from the corpus) or a tokenizer JSON file")
    options.add_runs_dir(parser)
    parser.add_argument("--name", default=None, help="run name (default: PRESET-TIMESTAMP)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run's newest checkpoint")
    options.add_model_config(parser)
    options.add_optimizer(parser)
    options.add_device(parser)
    options.add_compile(parser)
    options.add_force(parser)
    group = parser.add_argument_group("training loop")
    defaults = TrainConfig()
    group.add_argument("--pack-documents", metavar="SEPARATOR", default=None,
                       help="the corpus packs documents, each ending with SEPARATOR (text that is "
                            "one token, e.g. a form feed): no token attends across a boundary")
    for field in dataclasses.fields(TrainConfig):
        default = getattr(defaults, field.name)
        flag = f"--{field.name.replace('_', '-')}"
        if field.name == "document_separator":
            continue  # given as text, --pack-documents, and encoded with the run's tokenizer
        try:
            if field.name == "init":
                group.add_argument(flag, default=default, choices=INITS,
                                   help=f"weight initialisation (default: {default})")
            else:
                group.add_argument(flag, type=type(default), default=default,
                                   help=f"(default: {default})")
        except argparse.ArgumentError:
            pass  # a shared option group above already defines this flag
    parser.set_defaults(func=handle)


def handle(args: argparse.Namespace) -> None:
    from tinygpt.data import cached_tokens, text_chunks
    from tinygpt.devices import pick_device
    from tinygpt.distributed import main_process_first, process_group
    from tinygpt.rundir import check_run_name
    from tinygpt.tokenizer import CharTokenizer, load_tokenizer
    from tinygpt.train import TrainConfig, train

    if args.compile not in (None, options.DEFAULT_COMPILE_BACKEND):
        raise ValueError(f"training compiles with the {options.DEFAULT_COMPILE_BACKEND} backend "
                         f"only, got --compile {args.compile}.")
    corpus = options.corpus_file(args)
    tokenizer = (CharTokenizer.from_texts(text_chunks(corpus)) if args.tokenizer == "char"
                 else load_tokenizer(args.tokenizer))
    if args.cfg_vocab_size not in (None, tokenizer.vocab_size):
        raise ValueError(f"--vocab-size {args.cfg_vocab_size} does not match the tokenizer's "
                         f"vocab_size {tokenizer.vocab_size}.")
    model_config = options.config_from_args(args, vocab_size=tokenizer.vocab_size)
    options.check_model_fits(model_config, training=True, force=args.force)
    train_config = TrainConfig(**{
        field.name: getattr(args, field.name) for field in dataclasses.fields(TrainConfig)
        if field.name != "document_separator"
    } | {"compile": args.compile is not None,
         "document_separator": _separator_id(args.pack_documents, tokenizer)})
    name = check_run_name(args.name) if args.name is not None else (
        f"{args.config}-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir = options.directory_option(args.runs_dir, "--runs-dir") / name
    if args.resume:
        _notes_on_resume(run_dir, train_config, tokenizer)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun
    with process_group(world_size, pick_device(args.device)) as rank:
        data = main_process_first(lambda: cached_tokens(corpus, tokenizer, args.data_dir))
        if rank == 0:
            options.note_repaired(data)
        result = train(run_dir, data, tokenizer, model_config, train_config,
                       resume=args.resume, progress=rank == 0)
    if rank == 0:  # rank 0 reports for the whole group
        val = f", validation loss {result.val_loss:.4f}" if result.val_loss is not None else ""
        print(f"step {result.step}{val}; checkpoint {result.checkpoint}; "
              f"loss curve {run_dir / 'loss_curve.png'}")
    saved = f"saved step {result.step} to {result.checkpoint}"
    options.exit_if_interrupted(result.interrupted, saved, report=rank == 0)


# Training options that a resumed run may change freely: when to stop, evaluate and save, and
# where to run. Every other one changes the path the run would have taken had it not stopped.
RESUMABLE_CHANGES = ("steps", "eval_every", "eval_batches", "save_every", "device", "compile",
                     "init")


def _notes_on_resume(run_dir: Path, config, tokenizer) -> None:
    """Say what `--resume` would otherwise do without a word: train nothing when the run is
    already at `--steps`, or continue with other training options than the checkpoint's (each
    flag takes its default when not given again), which is not the run continued exactly."""
    import json

    from tinygpt.rundir import RunDir

    latest = RunDir(run_dir).latest()
    if latest is None:
        return  # train() refuses to resume a run without a checkpoint, in its own words
    try:
        meta = json.loads((latest / "meta.json").read_text(encoding="utf-8"))
        done = int(meta["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return  # a damaged checkpoint: loading it says what is wrong
    if done >= config.steps:
        options.note(f"the run is already at step {done}, and --steps {config.steps} plans no "
                     f"step beyond it; nothing is trained (raise --steps to train on).")
        return
    before = meta.get("train")
    if not isinstance(before, dict):
        return  # an imported checkpoint: train() refuses to resume it, in its own words
    now = config.to_dict()
    changed = [_change(k, before[k], now[k], tokenizer) for k in now
               if k not in RESUMABLE_CHANGES and k in before and before[k] != now[k]]
    if changed:
        options.note(f"resuming with other training options than the checkpoint's "
                     f"({', '.join(changed)}); give the run's own to continue it exactly.")


def _change(field: str, before, now, tokenizer) -> str:
    """One changed training option as its flag, the checkpoint's value and the new one."""
    if field == "document_separator":  # given as text, --pack-documents, and stored as an id
        shown = [repr(tokenizer.decode([v])) if v is not None else "none" for v in (before, now)]
        return f"--pack-documents {shown[0]} -> {shown[1]}"
    return f"--{field.replace('_', '-')} {before} -> {now}"


def _separator_id(text: str | None, tokenizer) -> int | None:
    """The one token id `--pack-documents` names, or None without the option."""
    if text is None:
        return None
    ids = tokenizer.encode(text)
    if len(ids) != 1:
        raise ValueError(f"--pack-documents needs a separator that is one token; {text!r} is "
                         f"{len(ids)} tokens.")
    if tokenizer.decode(ids) != text:
        raise ValueError(f"--pack-documents separator {text!r} is not in the tokenizer's "
                         "vocabulary.")
    return ids[0]
