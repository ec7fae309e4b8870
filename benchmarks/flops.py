"""The hardware's limit (dense matmul FLOP/s, measured) and attention's FLOP count (analytic)."""

from __future__ import annotations

import torch

from benchmarks.harness import Budget, measure


def attention_flops(batch: int, context: int, d_model: int, *, backward: bool) -> int:
    """Floating-point operations of one self-attention call, counting matmuls only (2 per MAC).

    Forward, with E = d_model = h·d, t = context, b = batch:
        q, k, v projections   2·b·t·E·3E
        scores q kᵀ           2·b·h·t·t·d = 2·b·t²·E
        weights · v           2·b·t²·E
        output projection     2·b·t·E·E
        total                 8·b·t·E² + 4·b·t²·E
    Backward is twice the forward (each matmul needs a gradient for both of its operands), so
    forward + backward is three times the forward. The full t×t scores count, masked or not:
    every implementation here computes them (the fused kernel could skip the masked half, but
    receives an explicit mask rather than `is_causal`). Softmax, mask and bias are left out; they
    are O(b·h·t²) and O(b·t·E), not matmul work.
    """
    forward = 8 * batch * context * d_model**2 + 4 * batch * context**2 * d_model
    return 3 * forward if backward else forward


def matmul_throughput(sizes: tuple[int, ...], *, device, dtype, threads: int, budget: Budget
                      ) -> dict:
    """The best FLOP/s of a dense square `torch.mm` over `sizes` (2·n³ FLOPs per n×n product).

    This is the roof each implementation's achieved FLOP/s is divided by: what this machine,
    torch's BLAS and this thread count really sustain, rather than a datasheet peak. It is taken
    from the fastest timed block, not the median: a limit is what the machine was seen to do, and
    on a shared machine a median roof can land below what the attention itself reaches (> 100%).
    """
    best = None
    for n in sizes:
        generator = torch.Generator(device="cpu").manual_seed(n)
        a = torch.randn(n, n, generator=generator).to(device=device, dtype=dtype)
        b = torch.randn(n, n, generator=generator).to(device=device, dtype=dtype)
        timing = measure({"mm": lambda: torch.mm(a, b)}, threads=threads, budget=budget)["mm"]
        flops_per_s = 2 * n**3 / timing.min_s
        if best is None or flops_per_s > best["flops_per_s"]:
            best = {"n": n, "flops_per_s": flops_per_s, **timing.to_dict()}
    return best
