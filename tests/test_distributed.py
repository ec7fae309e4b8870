"""Joining torchrun's process group: one process joins nothing; two gloo processes let rank 0
write a cache before the other reads it."""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tinygpt.distributed import main_process_first, process_group


def test_one_process_joins_nothing_and_is_rank_0():
    with process_group(1, torch.device("cpu")) as rank:
        assert rank == 0 and not dist.is_initialized()
        assert main_process_first(lambda: "made") == "made"
    with pytest.raises(ValueError, match="world_size must be a positive integer, got 0"):
        with process_group(0, torch.device("cpu")):
            pass


def _rank(rank, port, path):
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2")

    def make():
        if rank == 0:
            path.write_text("written by rank 0")
        return path.read_text()  # the other rank must find the file complete

    with process_group(2, torch.device("cpu")) as joined:
        assert joined == rank and dist.get_world_size() == 2
        assert main_process_first(make) == "written by rank 0"
    assert not dist.is_initialized()  # the group is left at the end of the block


def test_rank_0_makes_the_cache_before_the_others_read_it(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.start_processes(_rank, args=(port, tmp_path / "cache.txt"), nprocs=2, join=True,
                       start_method="spawn")


class _RecordingGroup:
    """Stands in for torch.distributed as seen by one rank, recording barriers."""

    def __init__(self, rank, events):
        self.rank, self.events = rank, events

    def is_initialized(self):
        return True

    def get_rank(self):
        return self.rank

    def barrier(self):
        self.events.append("barrier")


@pytest.mark.parametrize("rank, order", [(0, ["make", "barrier"]), (1, ["barrier", "make"]),
                                         (3, ["barrier", "make"])])
def test_only_rank_0_makes_before_the_barrier(monkeypatch, rank, order):
    import tinygpt.distributed

    events = []
    monkeypatch.setattr(tinygpt.distributed, "dist", _RecordingGroup(rank, events))
    assert main_process_first(lambda: events.append("make") or rank) == rank
    assert events == order
