"""`tinygpt lens`: the logit lens on a prompt (the top token read from the residual stream after
each block) and, with `--target`, the direct logit attribution of the last position's logit."""

from __future__ import annotations

import argparse

from tinygpt.cli import options


def register(commands) -> None:
    parser = commands.add_parser(
        "lens", help="logit lens on a prompt, and direct logit attribution with --target")
    options.add_checkpoint(parser)
    parser.add_argument("--prompt", required=True, help="text to read the residual stream on")
    parser.add_argument("--target", default=None,
                        help="one token: also split its last-position logit into each head's, "
                             "MLP's and the embeddings' direct share (pre-norm models)")
    parser.add_argument("--foil", default=None,
                        help="one token: attribute the target's logit minus this one's")
    parser.set_defaults(func=handle)


def handle(args: argparse.Namespace) -> None:
    from tinygpt.circuits import direct_logit_attribution, logit_lens, top_tokens
    from tinygpt.pictures import display_token

    if args.foil is not None and args.target is None:
        raise ValueError("--foil is subtracted from --target's logit; give --target too.")
    _, ckpt = options.load_selected_checkpoint(args)
    idx, ids = options.prompt_ids(ckpt, args.prompt, "prompt")
    target, foil = options.target_and_foil(ckpt, args)
    # Attributed before anything is printed, so a model it cannot split fails without a table.
    result = direct_logit_attribution(ckpt.model, idx, target, foil) if target is not None else None
    decode = lambda i: f"'{display_token(ckpt.tokenizer.decode([i]))}'"  # noqa: E731
    probs, top = top_tokens(logit_lens(ckpt.model, idx), k=1)  # l b t 1
    n_layers = ckpt.config.n_layers
    print("top next token (probability) read from the residual stream after each block:")
    print(f"{'pos':>4} {'token':>8} " + " ".join(f"{f'block {n}':>14}" for n in range(n_layers)))
    for t, token in enumerate(ids):
        cells = [f"{decode(int(top[n, 0, t, 0])):>8} {probs[n, 0, t, 0]:.2f}"
                 for n in range(n_layers)]
        print(f"{t:>4} {decode(token):>8} " + " ".join(f"{c:>14}" for c in cells))
    if result is None:
        return
    what = f"logit({args.target!r})" + (f" - logit({args.foil!r})" if foil is not None else "")
    print(f"direct logit attribution of {what} at the last position "
          f"(total {result.logit_diff[0]:.3f}):")
    for label, value in zip(result.labels, result.contributions[:, 0].tolist()):
        print(f"  {label:<18} {value:+8.3f}")
