"""Preemption and time-out of a submitit job: stop at a step boundary, checkpoint, then requeue.

submitit answers its signal (USR2 by default: sent before the time limit and on preemption) on
global rank 0 only, by calling the job's `checkpoint()`, requeueing and exiting at once. A DeepSpeed
checkpoint is a collective that every rank must join, so it cannot be written inside that handler.
Instead, while a training loop runs, the signal only raises a flag on whichever rank receives it:

1. `install()` (in the job, after submitit set up its handler) puts `_on_signal` in its place.
2. Inside `stop_points()` (the Trainer's loop) the signal sets the flag; the loop calls
   `StopCheck.requested()` after every step, an all-reduce, so all ranks stop at the same step.
3. The Trainer saves a checkpoint on every rank and raises `Preempted`.
4. The job catches it and calls `hand_over()`: on rank 0, submitit's own handler pickles the job
   (`checkpoint()`), requeues it and exits; the requeued job resumes from that checkpoint.

Outside a loop with stop points (pseudo-label, sample, encode: they redo at most the shards in
progress) the signal goes straight to submitit's handler. Without `install()` (torchrun, deepspeed,
plain python) nothing here does anything and `StopCheck` costs nothing.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

_submitit_handler = None  # submitit's own handler, once install() replaced it
_signal = signal.SIGUSR2  # the one submitit listens to (SUBMITIT_PREEMPT_SIGNAL)
_owner_pid = None  # the job's process; forked data workers inherit the handler and must ignore it
_cooperating = 0  # depth of stop_points(): a loop will check the flag
_requested = False
_gloo = None  # the CPU group StopCheck uses beside NCCL, made once per process


class Preempted(BaseException):
    """Raised by a loop that saved its state and stopped on request. A BaseException, like
    KeyboardInterrupt, so that no `except Exception` between the loop and the job swallows it."""


def install() -> None:
    """Route submitit's preemption signal through this module (call it in the job's process)."""
    from submitit.core.job_environment import JobEnvironment

    global _submitit_handler, _owner_pid, _signal
    _signal = JobEnvironment._usr_sig()
    _submitit_handler, _owner_pid = signal.getsignal(_signal), os.getpid()
    signal.signal(_signal, _on_signal)


def installed() -> bool:
    return _submitit_handler is not None


def _on_signal(signum, frame) -> None:
    global _requested
    if os.getpid() != _owner_pid:
        return
    if _cooperating:
        _requested = True
        log.warning(f"{signal.Signals(signum).name}: preempted or timing out; stopping after this step "
                    "to checkpoint and requeue")
    elif callable(_submitit_handler):
        _submitit_handler(signum, frame)


@contextlib.contextmanager
def stop_points():
    """While inside, the signal only sets the flag. A request nobody acted on (the loop was
    already ending) is handed to submitit on the way out, so the job is still requeued."""
    global _cooperating
    _cooperating += 1
    try:
        yield
    finally:
        _cooperating -= 1
    if _requested and not _cooperating:
        hand_over()


def hand_over() -> None:
    """Let submitit checkpoint the job and requeue it. On rank 0 this exits the process; on the
    other ranks it returns and their task ends (submitit requeues from rank 0 only)."""
    global _requested
    _requested = False
    if callable(_submitit_handler):
        _submitit_handler(_signal, None)


class StopCheck:
    """Whether any rank received the signal: one all-reduce of an int per call. On GPUs it runs on
    a CPU (gloo) group so that it does not wait for the GPU stream every step."""

    def __init__(self, device: torch.device):
        global _gloo
        self.active = installed() and dist.is_initialized()
        if self.active and device.type == "cuda" and _gloo is None:
            _gloo = dist.new_group(backend="gloo")  # every rank builds a Trainer, so every rank gets here
        self.group = _gloo if device.type == "cuda" else None
        self.flag = torch.zeros(1, dtype=torch.int32)

    def requested(self) -> bool:
        if not self.active:
            return False
        self.flag.fill_(int(_requested))
        dist.all_reduce(self.flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(self.flag.item())
