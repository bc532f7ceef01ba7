"""`dpt-scale submit RECIPE --stage STAGE ...`: a stage command as a SLURM job through submitit.

One task per GPU; each task runs `dpt_scale.stage_job.StageJob`: the stage as `dpt-scale STAGE
RECIPE --set ...` would run it, with its rank from SLURM. On preemption or time-out the job checkpoints, requeues itself
and resumes (dpt_scale/preemption.py). `--dry-run` prints the sbatch script instead of submitting.
"""
from __future__ import annotations

import argparse
import logging
import math
import shlex
import shutil
from pathlib import Path

from dpt_scale.cli.registry import COMMANDS, Parser, command, recipe_arguments
from dpt_scale.cli.stages import pipeline_options, study_options
from dpt_scale.compat import sbatch_script
from dpt_scale.errors import UserError
from dpt_scale.layout import layout
from dpt_scale.pipeline.stages import STAGES
from dpt_scale.recipe import load_recipe

log = logging.getLogger(__name__)


def stages() -> list[str]:
    """What a job may run: a stage that has a command of its own, the pipeline, or a study."""
    return [name for name, stage in STAGES.items() if stage.command] + ["run", "study"]


def _arguments(p: argparse.ArgumentParser) -> None:
    recipe_arguments(p, required=True)
    p.add_argument("--stage", required=True, help=f"what each task runs: {', '.join(stages())}")
    p.add_argument("--stage-args", default="", metavar='"ARGS"',
                   help="more arguments of that command, e.g. --stage-args='--from sample' for run")
    p.add_argument("--nodes", type=int, default=1, metavar="N", help="default: 1")
    p.add_argument("--gpus-per-node", type=int, default=1, metavar="G",
                   help="GPUs per node; one task per GPU (default: 1)")
    p.add_argument("--tasks-per-node", type=int, metavar="N", help="default: --gpus-per-node, or 1 without GPUs")
    p.add_argument("--partition", metavar="P", help="default: the cluster's")
    p.add_argument("--timeout-min", type=int, default=240, metavar="T",
                   help="time limit of each run of the job (default: 240); at the limit it checkpoints and requeues")
    p.add_argument("--cpus-per-task", type=int, metavar="N", help="default: data.loader.workers + 1")
    p.add_argument("--mem-gb", type=float, metavar="GB", help="memory per node (default: the cluster's)")
    p.add_argument("--account")
    p.add_argument("--qos")
    p.add_argument("--constraint")
    p.add_argument("--setup", action="append", default=[], metavar="LINE",
                   help="shell line run before the tasks, e.g. 'module load cuda' (repeatable)")
    p.add_argument("--slurm", action="append", default=[], metavar="KEY=VALUE",
                   help="any other sbatch option, e.g. --slurm mail-type=END --slurm exclusive (repeatable)")
    p.add_argument("--signal-delay-s", type=int, default=120, metavar="S",
                   help="warning before the time limit, to finish the step and checkpoint (default: 120)")
    p.add_argument("--max-timeouts", type=int, default=20, metavar="N",
                   help="requeues after a time-out before giving up (default: 20; preemptions do not count)")
    p.add_argument("--folder", metavar="DIR", help="submitit's scripts, pickles and logs (default: <out>/slurm)")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script, submit nothing")


def _check(args: argparse.Namespace) -> None:
    if args.stage not in stages():
        raise UserError(f"unknown stage {args.stage!r} for --stage; choose one of {', '.join(stages())}")
    for flag, value, least, most in [
            ("--nodes", args.nodes, 1, 100_000), ("--gpus-per-node", args.gpus_per_node, 0, 64),
            ("--tasks-per-node", args.tasks_per_node, 1, 1024), ("--timeout-min", args.timeout_min, 1, 366 * 24 * 60),
            ("--cpus-per-task", args.cpus_per_task, 1, 4096), ("--signal-delay-s", args.signal_delay_s, 0, 86_400),
            ("--max-timeouts", args.max_timeouts, 0, 10_000)]:
        if value is not None and value < least:
            raise UserError(f"{flag} {value} is impossible; give at least {least}")
        if value is not None and value > most:
            raise UserError(f"{flag} {value} is impossible; give at most {most}")
    if args.mem_gb is not None and not 0 < args.mem_gb <= 1_000_000:
        raise UserError(f"--mem-gb {args.mem_gb:g} is impossible; give a number of GB above 0, at most 1000000")
    if args.signal_delay_s >= 60 * args.timeout_min:
        raise UserError(f"--signal-delay-s {args.signal_delay_s} leaves no time to run within --timeout-min "
                        f"{args.timeout_min}; give a longer time limit or a shorter delay")


def _options(stage: str, recipe_path: str, stage_args: list[str], recipe) -> dict:
    """--stage-args, read by the stage command's own parser (so argparse says what is wrong), as
    the keyword arguments StageJob passes on."""
    parser = Parser(prog=f"dpt-scale {stage}")
    COMMANDS[stage].arguments(parser)
    parsed = parser.parse_args([recipe_path, *stage_args])
    if parsed.overrides:
        raise UserError("--stage-args holds --set: give recipe overrides to submit itself (--set KEY=VALUE)")
    if stage == "run":
        if parsed.plan:
            raise UserError("--plan submits nothing: run `dpt-scale run RECIPE --plan` here to see the plan")
        return pipeline_options(parsed)
    return study_options(parsed, recipe) if stage == "study" else {}


def _memory(gb: float) -> str:
    """sbatch takes a whole number with a unit: 1.5 GB as 1536MB."""
    return f"{gb:.0f}GB" if gb == int(gb) else f"{math.ceil(gb * 1024)}MB"


def _extra_sbatch(items: list[str]) -> dict:
    """--slurm KEY=VALUE (or a bare KEY for a flag) -> sbatch options, as submitit writes them."""
    extra = {}
    for item in items:
        key, has_value, value = item.partition("=")
        key = key.strip().lstrip("-")
        if not key:
            raise UserError(f"--slurm {item!r} names no option; write --slurm KEY=VALUE, e.g. --slurm mail-type=END")
        extra[key] = value if has_value else True
    return extra


def sbatch_parameters(args: argparse.Namespace, recipe) -> dict:
    """submitit's SlurmExecutor parameters (sbatch's names) for these options."""
    tasks = args.tasks_per_node or max(args.gpus_per_node, 1)
    params = dict(job_name=f"dpt-{recipe.name}-{args.stage}", nodes=args.nodes, ntasks_per_node=tasks,
                  gpus_per_node=args.gpus_per_node or None, time=args.timeout_min,
                  cpus_per_task=args.cpus_per_task or recipe.data.loader.workers + 1,
                  partition=args.partition, account=args.account, qos=args.qos, constraint=args.constraint,
                  mem=None if args.mem_gb is None else _memory(args.mem_gb),
                  setup=args.setup or None, signal_delay_s=args.signal_delay_s,
                  additional_parameters=_extra_sbatch(args.slurm) or None)
    return {k: v for k, v in params.items() if v is not None}


def _executor(folder: Path, max_timeouts: int, dry_run: bool):
    from submitit import SlurmExecutor

    if dry_run:
        class Renderer(SlurmExecutor):  # submitit's own executor, minus its check that srun exists
            @classmethod
            def affinity(cls) -> int:
                return 2
        return Renderer(folder, max_num_timeout=max_timeouts)
    missing = [tool for tool in ("sbatch", "srun") if shutil.which(tool) is None]
    if missing:
        raise UserError(f"{' and '.join(missing)} not found: submit from a SLURM login node, or add --dry-run "
                        "to print the script")
    return SlurmExecutor(folder, max_num_timeout=max_timeouts)


@command("submit", "run a stage (or `run`) as a SLURM job through submitit; requeued on preemption and time-out",
         _arguments)
def submit(args: argparse.Namespace) -> None:
    from dpt_scale.stage_job import StageJob

    _check(args)
    recipe = load_recipe(args.recipe, args.overrides)  # a bad recipe fails here, not on the cluster
    stage_args = shlex.split(args.stage_args)
    job = StageJob(args.stage, str(Path(args.recipe).resolve()), args.overrides,
                   _options(args.stage, args.recipe, stage_args, recipe))
    folder = Path(args.folder or layout(recipe).slurm).resolve()
    parameters = sbatch_parameters(args, recipe)
    executor = _executor(folder, args.max_timeouts, args.dry_run)
    try:
        executor.update_parameters(**parameters)
    except ValueError as exc:  # submitit checks the options by rendering them
        raise UserError(f"sbatch options refused by submitit: {str(exc).splitlines()[0]}") from None
    tasks = args.nodes * executor.parameters["ntasks_per_node"]
    nodes = f"{args.nodes} node" + "s" * (args.nodes > 1)
    argv = [args.stage, job.recipe, *stage_args, *[a for s in args.overrides for a in ("--set", s)]]
    what = f"dpt-scale {shlex.join(argv)} in each of {tasks} tasks ({nodes})"
    if args.dry_run:
        print(sbatch_script(executor).rstrip("\n"))
        log.info(f"dry run, nothing submitted: the job would run {what}")
        return
    try:
        submitted = executor.submit(job)
    except Exception as exc:  # sbatch's refusal comes back as submitit's FailedJobError, with its output
        last = [line for line in str(exc).splitlines() if line.strip()][-1:] or [type(exc).__name__]
        raise UserError(f"sbatch refused the job: {last[0].strip()}") from None
    print(f"submitted job {submitted.job_id}: {what}")
    print(f"logs: {submitted.paths.stdout} and .err (task 0); status: squeue -j {submitted.job_id}")
