"""Rank, world size and the process group, from whatever launched this process.

torchrun and the `deepspeed` launcher set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT;
a plain `python` run has none of them and becomes a one-process job on a free local port.
torch is imported only to join a process group: the CLI asks for the rank before any stage runs,
and a bad recipe should be reported before the seconds torch takes to import.
"""
from __future__ import annotations

import os
import socket
import sys
import warnings
from datetime import timedelta
from typing import TYPE_CHECKING

from dpt_scale.compat import skip_deepspeed_shm_comm

if TYPE_CHECKING:  # imported only when joining a process group (see above)
    import torch


def rank_and_world() -> tuple[int, int]:
    dist = sys.modules.get("torch.distributed")  # no process group exists before torch is imported
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_s: float = 1800) -> tuple[int, int, torch.device]:
    """Join (or, for a plain `python` run, create) the process group; returns rank, world size and
    this process's device (its local GPU, else the CPU)."""
    import torch
    import torch.distributed as dist

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(free_port())))
    # torch 2.14 warns on every collective DeepSpeed makes with these (deprecated) names
    warnings.filterwarnings("ignore", message=r".*(all_gather_into_tensor|reduce_scatter_tensor).*",
                            category=FutureWarning)
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is first imported
    import deepspeed

    if not cuda:
        skip_deepspeed_shm_comm()
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def leave_process_group() -> None:
    """Leave the process group together at the end of a command: a rank that exits while another
    still has gloo threads running can abort that one at exit ("terminate called without an active
    exception"), turning a finished job into a failed one."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()
