"""GPT-2 small in TinyGPT against `transformers`, same weights: forward pass and KV-cache decoding.

1. Forward on one sequence of 1,024 tokens: TinyGPT against `GPT2LMHeadModel` with eager
   attention (the hand-written softmax(q kᵀ/√d) v, like TinyGPT's), both under inference mode.
2. 100 new tokens, greedy, from an 8-token prompt: `tinygpt.generate.generate` (its KV cache)
   against `GPT2LMHeadModel.generate` (its own cache). Both must draw the same tokens.

Speed depends on the sizes, not on the values, so the weights are random: TinyGPT's `gpt2` preset,
exported with `tinygpt.interop` and loaded by `transformers`, so both hold the very same tensors.
The two sides are timed in interleaved rounds and compared round by round (`paired_ratio`), so
load on a shared machine falls on both alike. Run:

    .venv/bin/python -m benchmarks.gpt2 [--threads N] [--quick]

`--quick` runs every code path on a 2-layer model with short sequences, to check it works.
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from benchmarks.harness import Budget, measure, paired_ratio
from tinygpt import ModelConfig, TinyDecoderModel
from tinygpt.allocator import keep_freed_memory
from tinygpt.generate import generate
from tinygpt.interop import export_hf
from tinygpt.tokenizer import CharTokenizer

FULL = dict(config=ModelConfig.preset("gpt2"), tokens=1024, prompt=8, new_tokens=100,
            budget=Budget(rounds=5, round_time=1.0))
QUICK = dict(config=ModelConfig.preset("gpt2", n_layers=2, d_model=64, n_heads=4, d_ff=256,
                                       vocab_size=500, max_seq=128),
             tokens=64, prompt=4, new_tokens=10, budget=Budget(rounds=2, round_time=0.05))


def twin_models(config: ModelConfig):
    """A random TinyGPT model and transformers' GPT2LMHeadModel (eager attention) holding the
    same weights, both in eval mode."""
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    ours = TinyDecoderModel(config).eval()
    # export_hf writes tokenizer files only for a BPE; a placeholder char vocabulary of the right
    # size lets it write the weights alone.
    vocab = CharTokenizer([chr(0x100 + i) for i in range(config.vocab_size - 1)])
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(ours, vocab, f"{tmp}/gpt2")
        theirs = GPT2LMHeadModel.from_pretrained(f"{tmp}/gpt2", attn_implementation="eager")
    return ours, theirs.eval()


def run(settings: dict) -> list[tuple[str, dict]]:
    """Timings and paired ratios (TinyGPT over transformers) of both measurements."""
    ours, theirs = twin_models(settings["config"])
    vocab = settings["config"].vocab_size
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, vocab, (1, settings["tokens"]), generator=g)
    prompt = torch.randint(0, vocab, (1, settings["prompt"]), generator=g)
    n = settings["new_tokens"]

    def forward_ours():
        with torch.inference_mode():
            return ours(idx)

    def forward_theirs():
        with torch.inference_mode():
            return theirs(idx).logits

    def generate_ours():
        return generate(ours, prompt, n, temperature=0.0)

    def generate_theirs():
        with torch.inference_mode():
            return theirs.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                   use_cache=True, pad_token_id=0)

    same = torch.equal(generate_ours(), generate_theirs())
    results = []
    for label, mine, reference in (
            (f"forward 1 x {settings['tokens']}", forward_ours, forward_theirs),
            (f"generate {n} tokens (KV cache)", generate_ours, generate_theirs)):
        timings = measure({"tinygpt": mine, "transformers": reference},
                          threads=torch.get_num_threads(), budget=settings["budget"])
        ratio = paired_ratio(timings["tinygpt"].round_medians_s,
                             timings["transformers"].round_medians_s)
        results.append((label, {"tinygpt_s": timings["tinygpt"].median_s,
                                "transformers_s": timings["transformers"].median_s,
                                "ratio": ratio}))
    results.append(("same greedy tokens", {"same": same}))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes and budgets: checks every code path, measures nothing")
    args = parser.parse_args()
    keep_freed_memory()  # as the tinygpt command does
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    settings = QUICK if args.quick else FULL
    print(f"GPT-2 {'(quick sizes) ' if args.quick else 'small '}on {torch.get_num_threads()} "
          f"threads; ratio = TinyGPT time / transformers time, median [q1, q3] over paired rounds")
    for label, row in run(settings):
        if "same" in row:
            print(f"{label}: {row['same']}")
            continue
        r = row["ratio"]
        print(f"{label:<32} tinygpt {row['tinygpt_s'] * 1e3:9.2f} ms   transformers "
              f"{row['transformers_s'] * 1e3:9.2f} ms   ratio {r.median:.3f} "
              f"[{r.q1:.3f}, {r.q3:.3f}]")


if __name__ == "__main__":
    main()
