"""Checkpoints: DeepSpeed's files (model, optimizer, scheduler) plus one file per rank of ours (EMA
shard, RNG states, data position, step), in ROOT/step-00001000/.

A checkpoint counts only once every rank has finished writing it: after a barrier, rank 0 writes
ROOT/step-.../COMPLETE and then moves ROOT/latest (each written to a temporary name and renamed).
Resuming takes the newest complete one; a directory without COMPLETE (a job killed while saving)
is reported and passed over. The newest `keep` complete checkpoints are kept.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from dpt_scale.compat import torch_save_ran_out_of_space
from dpt_scale.errors import UserError

log = logging.getLogger(__name__)
COMPLETE = "COMPLETE"
LATEST = "latest"
_TAG = re.compile(r"step-(\d{8})")


def tag_of(step: int) -> str:
    return f"step-{step:08d}"


def rank_file(root: Path, step: int, rank: int) -> Path:
    """A rank's own part of a checkpoint (EMA shard, RNG states, data position), beside DeepSpeed's files."""
    return Path(root) / tag_of(step) / f"dpt_rank{rank:05d}.pt"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextmanager
def saving(path: Path):
    """torch.save reports a full disk (or quota, or file-size limit) as an opaque RuntimeError from
    its zip writer; say what it is, in one line."""
    try:
        yield
    except RuntimeError as exc:
        if not torch_save_ran_out_of_space(exc):
            raise
        raise UserError(f"could not finish writing {path}: the disk is full, or a quota or file-size limit was "
                        "reached; free space and run the same command again (it resumes from the last complete "
                        "checkpoint)") from exc


class Checkpoints:
    def __init__(self, root: str | Path, keep: int = 2):
        self.root, self.keep = Path(root), keep

    def save(self, engine, step: int, state: dict) -> None:
        """Every rank calls this; `state` is this rank's own part (EMA shard, RNG, data position)."""
        rank, world = dist.get_rank(), dist.get_world_size()
        tag = tag_of(step)
        path = rank_file(self.root, step, rank)
        with saving(self.root):
            engine.save_checkpoint(str(self.root), tag=tag, client_state={"step": step}, save_latest=False)
            torch.save({**state, "step": step, "world_size": world}, path.with_name(path.name + ".tmp"))
        os.replace(path.with_name(path.name + ".tmp"), path)
        dist.barrier()  # every rank has written all of its files
        if rank == 0:
            meta = {"step": step, "world_size": world, "zero_stage": engine.zero_optimization_stage()}
            _atomic_write(self.root / tag / COMPLETE, json.dumps(meta))
            _atomic_write(self.root / LATEST, tag)
            self._prune(step)
        dist.barrier()

    def _steps(self) -> tuple[list[int], list[int]]:
        """(complete, incomplete) checkpoint steps under the root, each sorted."""
        found = {int(m.group(1)): p for p in (self.root.iterdir() if self.root.is_dir() else [])
                 if (m := _TAG.fullmatch(p.name)) and p.is_dir()}
        complete = sorted(s for s, p in found.items() if (p / COMPLETE).is_file())
        return complete, sorted(set(found) - set(complete))

    def latest(self) -> int | None:
        """The step of the newest complete checkpoint, reporting a newer incomplete one."""
        complete, incomplete = self._steps()
        newest = complete[-1] if complete else None
        if incomplete and (newest is None or incomplete[-1] > newest):
            then = f"resuming from {tag_of(newest)}" if newest is not None else "starting afresh"
            log.warning(f"{self.root}: checkpoint {tag_of(incomplete[-1])} is incomplete (the job stopped while "
                        f"saving it); {then}")
        return newest

    def load(self, engine, step: int) -> dict:
        """Restore DeepSpeed's state and return this rank's own part."""
        rank, world = dist.get_rank(), dist.get_world_size()
        tag = tag_of(step)
        saved = json.loads((self.root / tag / COMPLETE).read_text())["world_size"]
        if saved != world:
            raise UserError(f"checkpoint {self.root / tag} was written by {saved} ranks and this job has {world}; "
                            f"resume with {saved} ranks, or start a new run from its exported weights")
        path, _ = engine.load_checkpoint(str(self.root), tag=tag, load_module_strict=True,
                                         load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise UserError(f"DeepSpeed could not load checkpoint {self.root / tag}; it may be damaged")
        return torch.load(rank_file(self.root, step, rank), map_location="cpu", weights_only=False)

    def _prune(self, newest: int) -> None:
        complete, incomplete = self._steps()
        for step in complete[:-self.keep] + [s for s in incomplete if s < newest]:
            shutil.rmtree(self.root / tag_of(step), ignore_errors=True)
