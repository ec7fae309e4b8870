"""`tinygpt patch`: activation patching between a clean and a corrupted prompt, drawn as heatmaps
(the residual stream by block and position, the heads by layer)."""

from __future__ import annotations

import argparse

from tinygpt.cli import options


def register(commands) -> None:
    parser = commands.add_parser(
        "patch", help="heatmap of how much each piece of a clean run restores a corrupted one")
    options.add_checkpoint(parser)
    parser.add_argument("--clean", required=True, help="the prompt whose activations are copied")
    parser.add_argument("--corrupted", required=True,
                        help="a prompt of the same token length that is run with them")
    parser.add_argument("--target", default=None,
                        help="one-token answer (default: the clean run's top next token)")
    parser.add_argument("--foil", default=None,
                        help="one-token wrong answer (default: the corrupted run's top token "
                             "other than the target)")
    parser.add_argument("--out", default=None, help="PNG heatmap (default: patch.png)")
    parser.set_defaults(func=handle)


def handle(args: argparse.Namespace) -> None:
    import torch

    from tinygpt.circuits import logit_difference, patch, plot_patching

    out = options.figure_file(args.out if args.out is not None else "patch.png", "--out")
    run, ckpt = options.load_selected_checkpoint(args)
    clean, ids = options.prompt_ids(ckpt, args.clean, "clean prompt")
    corrupted, _ = options.prompt_ids(ckpt, args.corrupted, "corrupted prompt")
    if clean.shape != corrupted.shape:
        raise ValueError(f"the clean prompt has {clean.shape[1]} tokens and the corrupted one "
                         f"{corrupted.shape[1]}; patching by position needs equal lengths.")
    if torch.equal(clean, corrupted):
        raise ValueError("the clean and corrupted prompts are the same tokens, so patching "
                         "changes nothing; make them differ where the answer should.")
    target, foil = options.target_and_foil(ckpt, args)
    model, n_layers = ckpt.model, ckpt.config.n_layers
    with torch.no_grad():
        clean_logits, corrupted_logits = model(clean), model(corrupted)
    target = target if target is not None else int(clean_logits[0, -1].argmax())
    options.check_foil(foil, target, args.foil)  # a default target may be the foil given
    ranked = corrupted_logits[0, -1].argsort(descending=True).tolist()
    foil = foil if foil is not None else next(i for i in ranked if i != target)
    metric = logit_difference(target, foil)
    resid_names = [f"blocks.{n}.hook_resid_pre" for n in range(n_layers)]
    resid_names.append(f"blocks.{n_layers - 1}.hook_resid_post")
    resid = patch(model, clean, corrupted, resid_names, metric)  # (l+1) t
    heads = patch(model, clean, corrupted,
                  [f"blocks.{n}.attention.hook_z" for n in range(n_layers)], metric)  # l h
    decode = ckpt.tokenizer.decode
    name = f"logit({decode([target])!r}) - logit({decode([foil])!r})"
    clean_value, corrupted_value = metric(clean_logits), metric(corrupted_logits)
    print(f"{name} at the last position: clean {clean_value:.3f}, "
          f"corrupted {corrupted_value:.3f}")
    title = (f"{run}: {name} at the last position; clean {clean_value:.2f}, "
             f"corrupted {corrupted_value:.2f}")
    tokens = [decode([i]) for i in ids]
    print(f"wrote {plot_patching(resid.cpu(), heads.cpu(), tokens, out, title=title)}")
