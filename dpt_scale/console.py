"""How a command talks to its user: the log format, and the one line a failure the user can act on
becomes. The CLI and a SLURM task (stage_job.py) both use it, so a failure reads the same in both."""
from __future__ import annotations

import errno
import logging
import os
import sys

from dpt_scale.compat import GLOO_LOST_PEER
from dpt_scale.errors import UserError

# A full disk (or quota, or file-size limit) is the user's to fix, and every command resumes after it.
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# So is a file or folder the command may not open or write (its permissions, an immutable flag, a
# read-only mount) that the checks before the work could not foresee, e.g. a stage's own folder.
_NOT_ALLOWED = (errno.EACCES, errno.EPERM, errno.EROFS)


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        return message if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {message}"


def setup_logging(quiet: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, handlers=[handler], force=True)


def explain(exc: BaseException) -> tuple[int, str] | None:
    """(exit status, one-line message) for a failure the user can act on; None for a bug, whose
    traceback is the useful report."""
    if isinstance(exc, UserError):
        return 2, str(exc)
    if isinstance(exc, RuntimeError):
        died = _dead_worker(exc)
        if died is not None:
            return 1, (f"a worker process died ({died}): it was killed, or ran out of memory; run the same command "
                       "again (with fewer workers if memory is short) and it resumes from what was finished")
        reason = _lost_rank(exc)
        if reason is not None:
            from dpt_scale.distributed import rank_and_world

            rank, world = rank_and_world()
            return 1, (f"rank {rank} of {world} lost contact with another rank ({reason}): a rank died or was killed "
                       "(see its log); run the same command again and it resumes from the last checkpoint")
    if isinstance(exc, OSError):
        if exc.errno in _NOT_ALLOWED and exc.filename:
            return 2, (f"{os.strerror(exc.errno).lower()}: {exc.filename}; give yourself access to it (or point the "
                       "output elsewhere) and run the same command again; finished work is kept and it resumes")
        if exc.errno in _NO_SPACE:
            where = f" writing {exc.filename}" if exc.filename else ""
            return 2, (f"{os.strerror(exc.errno)}{where}: free space (or point the output elsewhere) and run the "
                       "same command again; finished shards and checkpoints are kept and it resumes")
    return None


def _dead_worker(exc: RuntimeError) -> str | None:
    """The short reason when a worker process of ours (an import or verify pool's, a DataLoader's)
    died under us, else None."""
    from concurrent.futures.process import BrokenProcessPool

    text = str(exc)
    if isinstance(exc, BrokenProcessPool) or text.startswith("DataLoader worker"):
        return text.splitlines()[0].rstrip(".")[:160] if text else type(exc).__name__
    return None


def _lost_rank(exc: RuntimeError) -> str | None:
    """The short reason when a collective failed because another rank went away, else None (NCCL
    raises a DistBackendError; gloo a RuntimeError naming the socket error)."""
    from dpt_scale.distributed import rank_and_world

    if rank_and_world()[1] < 2:
        return None
    text = str(exc)
    for reason in GLOO_LOST_PEER:
        if reason in text:
            return reason.lower()
    dist = sys.modules.get("torch.distributed")
    if dist is not None and isinstance(exc, getattr(dist, "DistError", ())):
        return text.splitlines()[0][:160] if text else type(exc).__name__
    return None
