"""What every task of a submitit job runs: one `dpt-scale` stage command, as if typed.

    job = StageJob("train-diffusion", "recipes/x.yaml", ["diffusion.train.steps=1000"])
    submitit.AutoExecutor(folder).submit(job)     # one task per GPU

Ranks come from submitit's job environment. On preemption or time-out the job checkpoints and is
requeued with the same arguments; the stage resumes from its own checkpoints (see preemption.py).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

import submitit

from dpt_scale import preemption

log = logging.getLogger(__name__)


class StageFailed(RuntimeError):
    """The stage command ended with a non-zero status (its error is in the task's log)."""


class StageJob(submitit.helpers.Checkpointable):
    def __init__(self, stage: str, recipe: str, overrides: Sequence[str] = (), stage_args: Sequence[str] = ()):
        self.stage, self.recipe = stage, recipe
        self.overrides, self.stage_args = list(overrides), list(stage_args)

    def argv(self) -> list[str]:
        return [self.stage, self.recipe, *self.stage_args, *[a for s in self.overrides for a in ("--set", s)]]

    def __call__(self) -> int:
        from dpt_scale.cli import main

        # RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT for dpt_scale.distributed. Overwrite: values
        # inherited from the submitting shell are not this task's. Keep every GPU of the node visible:
        # the task picks cuda:LOCAL_RANK itself.
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        preemption.install()
        logging.getLogger("submitit").propagate = False  # it has its own handler; main() adds one to the root
        try:
            status = main(self.argv())
        except preemption.Preempted as stop:
            log.warning(f"dpt-scale {self.stage}: {stop}")
            preemption.hand_over()  # rank 0: checkpoint() and requeue, then exit; others return
            return -1
        except SystemExit as exited:  # from argparse: its message is already in the task's log
            status = exited.code
        if status:
            raise StageFailed(f"dpt-scale {' '.join(self.argv())} exited with status {status}")
        return 0

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        # The stage's state is already on disk (checkpoints, finished shards): run the same command again.
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)
