"""The `tinygpt` command line: a thin map from commands to library calls.

The library raises exceptions with one clear sentence; this module alone turns them into a
one-line message on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from tinygpt.allocator import keep_freed_memory
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


def _inspection_checkpoint(args: argparse.Namespace):
    from tinygpt.checkpoint import latest_run, load_checkpoint
    from tinygpt.train import pick_device

    run = args.checkpoint if args.checkpoint is not None else latest_run(args.runs_dir)
    ckpt = load_checkpoint(run, device=pick_device(args.device))
    if getattr(args, "lora", None) is not None:
        from tinygpt.lora import load_lora, merge_lora

        ckpt.model = merge_lora(load_lora(ckpt.model, args.lora))
    return run, ckpt


def _cmd_heads(args: argparse.Namespace) -> None:
    import torch

    from tinygpt.data import read_text
    from tinygpt.inspection import classify_heads, eval_windows, head_importance

    if not 0.0 < args.val_fraction <= 1.0:
        raise ValueError(f"--val-fraction must be in (0, 1], got {args.val_fraction}.")
    _, ckpt = _inspection_checkpoint(args)
    ids = ckpt.tokenizer.encode(read_text(args.corpus))
    held_out = ids[len(ids) - max(int(len(ids) * args.val_fraction), ckpt.config.max_seq + 1):]
    idx, targets = eval_windows(held_out, ckpt.config.max_seq, args.windows)
    device = next(ckpt.model.parameters()).device
    idx, targets = idx.to(device), targets.to(device)
    base, rise = head_importance(ckpt.model, idx, targets)
    scores = classify_heads(ckpt.model, idx, threshold=args.threshold)
    print(f"validation loss {base:.4f} on {idx.shape[0]} windows of {idx.shape[1]} tokens "
          f"(step {ckpt.step}); loss rise when each head alone is zero-ablated:")
    print(f"{'layer':>5} {'head':>4} {'loss rise':>9} {'prev':>6} {'first':>6} {'self':>6}  kind")
    for s in scores:
        print(f"{s.layer:>5} {s.head:>4} {rise[s.layer, s.head].item():>+9.4f} "
              f"{s.previous_token:>6.3f} {s.first_token:>6.3f} {s.self_token:>6.3f}  {s.kind}")
    top = torch.argmax(rise).item()
    print(f"most important: layer {top // rise.shape[1]} head {top % rise.shape[1]}")


def _cmd_inspect(args: argparse.Namespace) -> None:
    import torch

    from tinygpt.pictures import attention_patterns, plot_attention_grid, save_attention_html

    if args.out is None and args.html is None:
        raise ValueError("give --out FILE.png, --html FILE.html or both.")
    if not args.prompt:
        raise ValueError("the prompt is empty.")
    run, ckpt = _inspection_checkpoint(args)
    ids = ckpt.tokenizer.encode(args.prompt)[-ckpt.config.max_seq:]
    if not ids:
        raise ValueError(f"the prompt {args.prompt!r} encodes to no tokens.")
    idx = torch.tensor([ids], device=next(ckpt.model.parameters()).device)
    patterns = attention_patterns(ckpt.model, idx)
    tokens = [ckpt.tokenizer.decode([i]) for i in ids]
    title = f"{run} (step {ckpt.step}): {args.prompt[:60]!r}"
    if args.out is not None:
        print(f"wrote {plot_attention_grid(patterns, tokens, args.out, title=title)}")
    if args.html is not None:
        print(f"wrote {save_attention_html(patterns, tokens, args.html, title=title)}")


def _cmd_finetune(args: argparse.Namespace) -> None:
    from pathlib import Path

    from tinygpt.data import read_text
    from tinygpt.lora import LoraSettings, add_lora, finetune, save_lora

    settings = LoraSettings(rank=args.lora_rank, alpha=args.lora_alpha,
                            targets=tuple(args.lora_targets))
    run, ckpt = _inspection_checkpoint(args)
    ids = ckpt.tokenizer.encode(read_text(args.corpus))
    adapted = add_lora(ckpt.model, settings)
    losses = finetune(adapted, ids, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                      seed=args.seed)
    out = save_lora(adapted, args.out if args.out is not None else Path(run) / "lora")
    if losses:
        k = max(1, len(losses) // 10)  # one batch is noisy: compare the first and last tenths
        print(f"LoRA rank {settings.rank} on {', '.join(settings.targets)}: mean loss "
              f"{sum(losses[:k]) / k:.4f} (first {k} steps) -> {sum(losses[-k:]) / k:.4f} "
              f"(last {k}) in {len(losses)} steps")
    print(f"wrote adapters to {out}")


def _add_checkpoint_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", default=None, metavar="RUN",
                        help="run directory (default: the newest run under --runs-dir)")
    parser.add_argument("--runs-dir", default="runs", help="where runs live (default: runs)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="auto picks CUDA when present (default: auto)")


def _cmd_generate(args: argparse.Namespace) -> None:
    import torch

    from tinygpt.checkpoint import latest_run, load_checkpoint
    from tinygpt.generate import beam_search, encode_prompt, stream, unknown_characters
    from tinygpt.train import pick_device

    if args.beam is not None and args.stream:
        raise ValueError("--stream shows sampled text as it is drawn; it cannot be used with "
                         "--beam.")
    if args.compile and args.no_cache:
        raise ValueError("--compile speeds up the cached decode step; it cannot be used with "
                         "--no-cache.")
    device = pick_device(args.device)
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
                            use_cache=not args.no_cache, policy=args.policy,
                            compile=args.compile or False)
        for rank, beam in enumerate(beams, 1):
            print(f"--- beam {rank}: log-prob {beam.log_prob:.4f}")
            print(tokenizer.decode(beam.tokens.tolist()))
        return
    generator = None
    if args.seed is not None:
        generator = torch.Generator(device=device).manual_seed(args.seed)
    pieces = stream(model, tokenizer, prompt, args.max_new_tokens, stop=args.stop or (),
                    temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    use_cache=not args.no_cache, policy=args.policy, generator=generator,
                    compile=args.compile or False)
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

    gen = commands.add_parser("generate", help="continue a prompt with a trained checkpoint")
    _add_checkpoint_options(gen)
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
    gen.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                     help="run the cached decode step under torch.compile (default backend: "
                          "inductor): faster steps after a one-off compile of seconds")
    gen.set_defaults(run=_cmd_generate)

    heads = commands.add_parser("heads", help="rank heads by ablation loss rise and classify them")
    _add_checkpoint_options(heads)
    heads.add_argument("--corpus", required=True, help="text file; its tail is the validation set")
    heads.add_argument("--val-fraction", type=float, default=0.1,
                       help="fraction of the corpus at its end used for validation (default: 0.1)")
    heads.add_argument("--windows", type=int, default=32,
                       help="validation windows of max_seq tokens (default: 32)")
    heads.add_argument("--threshold", type=float, default=0.4,
                       help="score a head needs to be given a kind (default: 0.4)")
    heads.add_argument("--lora", default=None, metavar="DIR",
                       help="merge these adapters (from tinygpt finetune) into the model first")
    heads.set_defaults(run=_cmd_heads)

    inspect = commands.add_parser("inspect", help="draw every head's attention on a prompt")
    _add_checkpoint_options(inspect)
    inspect.add_argument("--prompt", required=True, help="text whose attention is drawn")
    inspect.add_argument("--out", default=None, help="PNG grid of heatmaps, layers by heads")
    inspect.add_argument("--html", default=None, help="self-contained interactive HTML page")
    inspect.add_argument("--lora", default=None, metavar="DIR",
                         help="merge these adapters (from tinygpt finetune) into the model first")
    inspect.set_defaults(run=_cmd_inspect)

    lora = commands.add_parser("finetune", help="fine-tune LoRA adapters on a corpus (peft)")
    _add_checkpoint_options(lora)
    lora.add_argument("--corpus", required=True, help="text file to fine-tune on")
    lora.add_argument("--lora-rank", type=int, default=8, help="adapter rank r (default: 8)")
    lora.add_argument("--lora-alpha", type=float, default=16.0, help="scale alpha (default: 16)")
    lora.add_argument("--lora-targets", nargs="+", default=["in_proj", "out_proj"],
                      metavar="TARGET", help="linear layers to adapt, from: in_proj out_proj "
                      "mlp.fc_in mlp.fc_out lm_head (default: in_proj out_proj)")
    lora.add_argument("--steps", type=int, default=200, help="optimizer steps (default: 200)")
    lora.add_argument("--batch-size", type=int, default=16, help="windows per step (default: 16)")
    lora.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default: 1e-3)")
    lora.add_argument("--seed", type=int, default=0, help="seed of the batch sampler (default: 0)")
    lora.add_argument("--out", default=None,
                      help="adapter directory (default: RUN/lora, beside the base checkpoints)")
    lora.set_defaults(run=_cmd_finetune)
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


def run() -> None:
    """The `tinygpt` program. It owns its process, so it keeps freed memory (see
    `tinygpt.allocator`); `main`, which tests also call in-process, leaves the process alone."""
    keep_freed_memory()
    sys.exit(main())


if __name__ == "__main__":
    run()
