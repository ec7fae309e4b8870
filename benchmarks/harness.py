"""How everything is timed and weighed: torch.utils.benchmark medians, peak memory, the machine."""

from __future__ import annotations

import contextlib
import itertools
import os
import platform
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils import benchmark


@dataclass(frozen=True)
class Timing:
    """Seconds per call: the median over timed blocks, their interquartile range, the fastest
    block, how many blocks, the calls per block (of the first round; later rounds re-estimate it),
    and the median of each interleaved round, in order (what `paired_ratio` pairs up)."""

    median_s: float
    iqr_s: float
    min_s: float
    blocks: int
    calls_per_block: int
    round_medians_s: tuple[float, ...]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Ratio:
    """One function's time over another's: the median over rounds of (its round median / the
    other's round median), with the quartiles of those per-round ratios."""

    median: float
    q1: float
    q3: float


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    q1, median, q3 = statistics.quantiles(values * 2 if len(values) == 1 else values, n=4,
                                          method="inclusive")
    return q1, median, q3


def paired_ratio(rounds: Sequence[float], reference_rounds: Sequence[float]) -> Ratio:
    """Round medians (`Timing.round_medians_s`) of one function over another's, paired in order.

    Both were measured in the same interleaved rounds, a fraction of a second apart, so a burst of
    load on a shared machine slows both sides of a pair alike and cancels out of its ratio; a
    ratio of the two overall medians would keep it whenever the burst hit one side's rounds more.
    """
    ratios = [a / b for a, b in zip(rounds, reference_rounds, strict=True)]
    q1, median, q3 = _quartiles(ratios)
    return Ratio(median, q1, q3)


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
        q1, median, q3 = _quartiles(times)
        timings[name] = Timing(median, q3 - q1, min(times), len(times),
                               measurements[0].number_per_run,
                               tuple(m.median for m in measurements))
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
    with _stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True
                                     ) as prof:
        fn()
    allocations = sorted(_allocations(prof.profiler.kineto_results.experimental_event_tree()),
                         key=lambda event: event.start_time_ns)
    running = itertools.accumulate(event.extra_fields.alloc_size for event in allocations
                                   if event.extra_fields.device.type == "cpu")
    return max(running, default=0)


@contextlib.contextmanager
def _stderr_silenced():
    """Point file descriptor 2 at /dev/null for a while: kineto writes two "USDT: profiler_start /
    profiler_stop" lines per profile straight to it, whatever its log level, which would bury the
    progress lines of a run among dozens of its own."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w", encoding="utf-8") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


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
