"""How everything is timed and weighed: torch.utils.benchmark medians, peak memory, machine facts."""

from __future__ import annotations

import itertools
import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils import benchmark


@dataclass(frozen=True)
class Timing:
    """Seconds per call: the median over timed blocks, their interquartile range, and how many."""

    median_s: float
    iqr_s: float
    blocks: int
    calls_per_block: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Budget:
    """How long `measure` may keep repeating: it stops once iqr/median < `threshold` after
    `min_run_time` seconds, and in any case after `max_run_time` seconds."""

    min_run_time: float
    max_run_time: float
    threshold: float = 0.1


def measure(fn: Callable[[], object], *, threads: int, budget: Budget, warmup: int = 2) -> Timing:
    """Time `fn()` with `Timer.adaptive_autorange`, after `warmup` untimed calls.

    The warm-up absorbs one-off costs (torch.compile, allocator growth, lazy CUDA init); the Timer
    synchronises CUDA around every block and runs with exactly `threads` threads.
    """
    for _ in range(warmup):
        fn()
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
    result = timer.adaptive_autorange(threshold=budget.threshold, min_run_time=budget.min_run_time,
                                      max_run_time=budget.max_run_time)
    return Timing(result.median, result.iqr, len(result.raw_times), result.number_per_run)


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
    """What a reader needs to compare two runs: CPU, threads, torch, Python, GPU (or its absence)."""
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
