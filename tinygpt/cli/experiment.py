"""`tinygpt experiment induction`: train a 2-layer attention-only model and watch its induction
heads form (`tinygpt.experiments.induction`)."""

from __future__ import annotations

import argparse

from tinygpt.cli import options


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

    settings = InductionSettings(steps=args.steps, eval_every=args.score_every, seed=args.seed)
    text = read_text(options.corpus_file(args))

    def report(record: dict) -> None:
        best = max(max(layer) for layer in record["induction"])
        print(f"step {record['step']:>5}  text loss {record['val_loss']:.3f}  "
              f"in-context {record['in_context']:+.3f}  best induction score {best:.2f}",
              flush=True)

    out = args.out if args.out is not None else "runs/induction"
    result = run_induction(text, out, settings, on_eval=report)
    previous, induction = result.previous_head, result.induction_head
    print(f"circuit: L{previous[0]}H{previous[1]} -> L{induction[0]}H{induction[1]} "
          f"(K-composition {result.k_composition:.3f}); the induction score jumps at step "
          f"{result.jump_step}")
    print(f"wrote {result.figure}, {result.metrics} and {result.checkpoint}")
