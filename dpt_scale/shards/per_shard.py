"""A job over a shard set, one output per input shard, that resumes where it stopped: encode,
pseudo-label and sample all run this way.

Shard i belongs to rank i % world. A rank skips the shards `done` says are finished (each job
records a finished shard in its own way), runs `work` on the rest, and once every rank is through,
rank 0 writes the set's manifest with `finish`, last, so that a set with a manifest is complete.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch.distributed as dist

log = logging.getLogger(__name__)
PROGRESS = ".progress"  # the folder of a job's records of finished shards


def run_per_shard(shards: int, done: Callable[[int], bool], work: Callable[[list[int]], int],
                  finish: Callable[[], None], what: str, size: Callable[[int], int] = lambda shard: 1,
                  unit: str = "shard(s)") -> None:
    """`work(todo)` handles this rank's unfinished shards and returns how many images it made;
    `size(shard)` counts a shard in `unit` for the resume message."""
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = list(range(rank, shards, world))
    todo = [i for i in mine if not done(i)]
    total, left = sum(map(size, mine)), sum(map(size, todo))
    if left < total:
        log.info(f"rank {rank}: {total - left} of {total} {unit} already {what}; resuming")
    start = time.perf_counter()
    images = work(todo)
    if images:
        seconds = time.perf_counter() - start
        log.info(f"rank {rank}: {what} {images} images in {seconds:.1f}s ({images / seconds:.0f} images/s)")
    dist.barrier()
    if rank == 0:
        finish()
    dist.barrier()
