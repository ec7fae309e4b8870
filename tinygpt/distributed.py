"""Joining the process group that `torchrun` starts, for data-parallel training.

The caller says how many processes there are (torchrun's `WORLD_SIZE`); the rendezvous itself
(address, port, rank) is torch's `env://` default, which reads the rest of torchrun's variables.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@contextmanager
def process_group(world_size: int, device: torch.device) -> Iterator[int]:
    """Join the process group for the duration of the block and yield this process's rank.

    nccl on CUDA, gloo on CPU. With `world_size` 1 nothing is joined and the rank is 0, so one
    code path serves a plain run and a torchrun one. The group is left even if the block raises.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}.")
    if world_size == 1:
        yield 0
        return
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield dist.get_rank()
    finally:
        dist.destroy_process_group()


def main_process_first(make: Callable[[], T]) -> T:
    """`make()` on rank 0, then, once it is done, on every other rank.

    For caches: rank 0 writes the files while the others wait at a barrier, then they find the
    cache complete and only read it. Outside a process group this is just `make()`.
    """
    if not dist.is_initialized():
        return make()
    if dist.get_rank() == 0:
        result = make()
    dist.barrier()
    if dist.get_rank() != 0:
        result = make()
    return result
