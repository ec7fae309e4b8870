"""How everything is timed and weighed: torch.utils.benchmark medians, peak memory, the machine."""

from __future__ import annotations

import itertools
import platform
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils import benchmark


@dataclass(frozen=True)
class Timing:
    """Seconds per call: the median over timed blocks, their interquartile range, how many blocks
    and the calls per block (of the first round; later rounds re-estimate it)."""

    median_s: float
    iqr_s: float
    blocks: int
    calls_per_block: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Budget:
    """How long `measure` spends per function: `rounds` rounds of `blocked_autorange`, each
    running for at least `round_time` seconds."""

    rounds: int
    round_time: float


def measure(functions: dict[str, Callable[[], object]], *, threads: int, budget: Budget,
            warmup: int = 2) -> dict[str, Timing]:
    """Time each function with `torch.utils.benchmark`, interleaved: round after round, every
    function gets one `Timer.blocked_autorange`; its median and IQR come from all its blocks.

    On a shared machine, load comes and goes; interleaving spreads it over every function alike,
    so the ratios between them stay fair. `warmup` untimed calls first absorb one-off costs
    (torch.compile, allocator growth, lazy CUDA init). The Timer synchronises CUDA around every
    block and runs with exactly `threads` threads.
    """
    for fn in functions.values():
        for _ in range(warmup):
            fn()
    timers = {name: benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
              for name, fn in functions.items()}
    rounds = {name: [] for name in functions}
    for _ in range(budget.rounds):
        for name, timer in timers.items():
            rounds[name].append(timer.blocked_autorange(min_run_time=budget.round_time))
    timings = {}
    for name, measurements in rounds.items():
        times = [t for m in measurements for t in m.times]  # seconds per call, one per block
        q1, _, q3 = statistics.quantiles(times * 2 if len(times) == 1 else times, n=4,
                                         method="inclusive")
        timings[name] = Timing(statistics.median(times), q3 - q1, len(times),
                               measurements[0].number_per_run)
    return timings


def peak_memory(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated by torch while `fn()` runs, above what was allocated before it.

    CUDA: `max_memory_allocated` after `reset_peak_memory_stats`. CPU has no such counter, and
    neither RSS (shared with everything else, kept by malloc) nor tracemalloc (blind to torch's
    allocator) measures it, so the profiler records every allocation and free torch's CPU
    allocator makes, and the peak is the maximum of their running sum: the same quantity.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    allocations = sorted(_allocations(prof.profiler.kineto_results.experimental_event_tree()),
                         key=lambda event: event.start_time_ns)
    running = itertools.accumulate(event.extra_fields.alloc_size for event in allocations
                                   if event.extra_fields.device.type == "cpu")
    return max(running, default=0)


def _allocations(events):
    """Allocation events (alloc_size > 0, frees < 0) anywhere in the profiler's event tree."""
    allocation = torch._C._profiler._EventType.Allocation
    for event in events:
        if event.tag == allocation:
            yield event
        yield from _allocations(event.children)


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_facts(threads: int) -> dict:
    """What a reader needs to compare two runs: CPU, threads, torch, Python, GPU (or none)."""
    cuda = torch.cuda.is_available()
    return {
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "cuda": torch.version.cuda if cuda else None,
    }
