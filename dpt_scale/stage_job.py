"""What every task of a submitit job runs: one stage (or the whole pipeline, or a study), called
as the command would call it, with its rank from SLURM.

    job = StageJob("train-diffusion", "recipes/x.yaml", ["diffusion.train.steps=1000"])
    submitit.AutoExecutor(folder).submit(job)     # one task per GPU

On preemption or time-out the job checkpoints and is requeued with the same arguments; the stage
resumes from its own checkpoints (see preemption.py).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

import submitit

from dpt_scale import console, preemption

log = logging.getLogger(__name__)


class StageFailed(RuntimeError):
    """The stage raised an error the user can act on (its one line is in the task's log)."""


class StageJob(submitit.helpers.Checkpointable):
    def __init__(self, stage: str, recipe: str, overrides: Sequence[str] = (), options: dict | None = None):
        """`stage`: a name of pipeline/stages.py's STAGES, or "run" / "study" with `options` the
        keyword arguments of run_pipeline / run_study (cli/stages.py makes them from the flags)."""
        self.stage, self.recipe, self.overrides, self.options = stage, recipe, list(overrides), dict(options or {})

    def __call__(self) -> int:
        # RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT for dpt_scale.distributed. Overwrite: values
        # inherited from the submitting shell are not this task's. Keep every GPU of the node visible:
        # the task picks cuda:LOCAL_RANK itself.
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        preemption.install()
        console.setup_logging()
        logging.getLogger("submitit").propagate = False  # it has its own handler
        try:
            self.run()
        except preemption.Preempted as stop:
            log.warning(f"dpt-scale {self.stage}: {stop}")
            preemption.hand_over()  # rank 0: checkpoint() and requeue, then exit; others return
            return -1
        except Exception as exc:
            explained = console.explain(exc)
            if explained is None:
                raise
            log.error(explained[1])
            raise StageFailed(f"dpt-scale {self.stage} {self.recipe}: {explained[1]}") from None
        from dpt_scale.distributed import leave_process_group

        leave_process_group()
        return 0

    def run(self):
        from dpt_scale.recipe import load_recipe

        if self.stage == "study":
            from dpt_scale.pipeline.study import run_study

            return run_study(self.recipe, self.overrides, **self.options)
        recipe = load_recipe(self.recipe, self.overrides)
        if self.stage == "run":
            from dpt_scale.pipeline.run import run_pipeline

            return run_pipeline(recipe, **self.options)
        from dpt_scale.pipeline.run import run_stage

        return run_stage(self.stage, recipe)

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        # The stage's state is already on disk (checkpoints, finished shards): run the same command again.
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)
