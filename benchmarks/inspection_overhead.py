"""Does inspection cost anything when it is not in use? Forward-pass time, measured in one run:

  fresh   a model that has never been inspected
  after   the same model after run_with_cache and an ablation (their hooks removed again)
  cached  run_with_cache keeping every activation (hooks attached during the call)

    .venv/bin/python benchmarks/inspection_overhead.py [--preset shakespeare-cpu] [--repeats 30]

Prints median milliseconds and the ratios after/fresh (should be 1.00 within noise) and
cached/fresh (what observing every activation costs). Run it on a quiet machine for numbers.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tinygpt import ModelConfig, TinyDecoderModel
from tinygpt.allocator import keep_freed_memory
from tinygpt.inspection import ablate_head, run_with_cache


def median_ms(fn, repeats: int) -> float:
    for _ in range(3):  # burn in
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="shakespeare-cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as the tinygpt command does
    torch.manual_seed(0)
    model = TinyDecoderModel(ModelConfig.preset(args.preset)).eval()
    config = model.config
    idx = torch.randint(0, config.vocab_size, (args.batch, config.max_seq))

    # Interleave the three so drifting machine load hits them alike.
    fresh, after, cached = [], [], []
    before = model(idx)
    for _ in range(3):
        fresh.append(median_ms(lambda: model(idx), args.repeats))
        run_with_cache(model, idx)
        ablate_head(model, idx, 0, 0)
        assert torch.equal(model(idx), before), "inspection changed the model"
        after.append(median_ms(lambda: model(idx), args.repeats))
        cached.append(median_ms(lambda: run_with_cache(model, idx), args.repeats))
    f, a, c = (statistics.median(x) for x in (fresh, after, cached))
    print(f"preset {args.preset}, batch {args.batch} x {config.max_seq} tokens, "
          f"{args.threads} thread(s), median of {args.repeats} x 3 rounds")
    print(f"fresh  {f:8.2f} ms")
    print(f"after  {a:8.2f} ms   after/fresh  {a / f:.3f}")
    print(f"cached {c:8.2f} ms   cached/fresh {c / f:.3f}")


if __name__ == "__main__":
    main()
