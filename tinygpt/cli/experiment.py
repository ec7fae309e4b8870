"""`tinygpt experiment induction`: train a 2-layer attention-only model and watch its induction
heads form (`tinygpt.experiments.induction`)."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from tinygpt.cli import options

# What the experiment writes into --out; a directory holding anything else is not replaced.
OUTPUTS = ("metrics.jsonl", "summary.json", "induction.png")


def register(commands) -> None:
    parser = commands.add_parser("experiment", help="seeded experiments that draw a figure")
    experiments = parser.add_subparsers(dest="experiment", required=True, metavar="EXPERIMENT")
    induction = experiments.add_parser(
        "induction", help="train a 2-layer attention-only model and watch induction heads form")
    options.add_corpus(induction)
    induction.add_argument("--out", default=None,
                           help="directory for the metrics, the figure and the checkpoint "
                                "(default: runs/induction)")
    induction.add_argument("--steps", type=int, default=2000,
                           help="training steps (default: 2000)")
    induction.add_argument("--score-every", type=int, default=40,
                           help="steps between scorings of the heads (default: 40)")
    options.add_seed(induction)
    induction.set_defaults(func=handle_induction)


def handle_induction(args: argparse.Namespace) -> None:
    from tinygpt.data import read_text
    from tinygpt.experiments.induction import InductionSettings, run_induction
    from tinygpt.files import make_temp_dir, replace_dir

    settings = InductionSettings(steps=args.steps, eval_every=args.score_every, seed=args.seed)
    out = _check_out(Path(args.out if args.out is not None else "runs/induction"))
    text = read_text(options.corpus_file(args))

    def report(record: dict) -> None:
        best = max(max(layer) for layer in record["induction"])
        print(f"step {record['step']:>5}  text loss {record['val_loss']:.3f}  "
              f"in-context {record['in_context']:+.3f}  best induction score {best:.2f}",
              flush=True)

    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = make_temp_dir(out.parent, f".tmp-{out.name}-")
    try:
        result = run_induction(text, scratch, settings, on_eval=report)
        replace_dir(scratch, out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    previous, induction = result.previous_head, result.induction_head
    print(f"circuit: L{previous[0]}H{previous[1]} -> L{induction[0]}H{induction[1]} "
          f"(K-composition {result.k_composition:.3f}); the induction score jumps at step "
          f"{result.jump_step}")
    figure, metrics, checkpoint = (out / p.name for p in (result.figure, result.metrics,
                                                           result.checkpoint))
    print(f"wrote {figure}, {metrics} and {checkpoint}")


def _check_out(out: Path) -> Path:
    """`--out` may be new, empty, or an earlier run of the experiment, which is replaced whole
    (so no checkpoint of another step is left beside the new one); anything else is refused
    before training, as replacing it would lose it."""
    out = out if out.name else out.resolve()  # "." or "..": the directory's own name
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file; give a directory for the experiment.")
    options.writable_below(out, "--out")
    if out.is_dir():
        others = [p.name for p in out.iterdir()
                  if p.name not in OUTPUTS and not p.name.startswith("ckpt-")]
        if others:
            raise ValueError(f"--out {str(out)!r} holds files that are not an earlier induction "
                             f"experiment's (such as {others[0]!r}); give a new directory.")
    return out
