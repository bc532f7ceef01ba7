"""The pipeline stages as commands: `dpt-scale STAGE RECIPE [--set KEY=VALUE ...]`.

Each runs under any launcher (python, torchrun, deepspeed); every rank resolves the recipe, rank 0
prints it and, at the end, the stage's result (an output path, or metrics as JSON).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from dpt_scale.cli.registry import command, recipe_arguments, resolve_recipe
from dpt_scale.distributed import rank_and_world
from dpt_scale.pipeline.stages import PIPELINE, STAGES, Stage


def _stage_command(stage: Stage) -> None:
    """Register `dpt-scale NAME RECIPE`, which runs the stage on every rank of any launcher."""
    def run(args: argparse.Namespace) -> None:
        if rank_and_world()[0] != 0:  # every rank resolves the recipe; one prints it
            args.quiet = True
        recipe = resolve_recipe(args)  # a bad recipe is reported before the stage's slow imports
        from dpt_scale.pipeline.run import run_stage

        result = run_stage(stage.name, recipe)
        if rank_and_world()[0] == 0:
            print(result if isinstance(result, (str, Path)) else json.dumps(result))

    command(stage.name, stage.command, lambda p: recipe_arguments(p, required=True))(run)


for _stage in STAGES.values():
    if _stage.command:
        _stage_command(_stage)


def _run_arguments(p: argparse.ArgumentParser) -> None:
    recipe_arguments(p, required=True)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--from", dest="start", metavar="STAGE", choices=list(PIPELINE),
                       help=f"run STAGE and every later stage again ({', '.join(PIPELINE)})")
    which.add_argument("--only", metavar="STAGE", choices=list(PIPELINE), help="run STAGE alone, again")
    p.add_argument("--until", metavar="STAGE", choices=list(PIPELINE), help="stop after STAGE")
    p.add_argument("--plan", action="store_true", help="print what would run, and why, then stop")


@command("run", "the whole pipeline: import, subset, (pretrain), stage 1, pseudo-label, (encode), stage 2, sample, "
         "stage 4, evaluate, then report.md; finished stages are skipped, interrupted ones resumed", _run_arguments)
def run(args: argparse.Namespace) -> None:
    if rank_and_world()[0] != 0:
        args.quiet = True
    recipe = resolve_recipe(args)  # a bad recipe is reported before torch is imported
    from dpt_scale.pipeline.run import run_pipeline

    report = run_pipeline(recipe, dry_run=args.plan, **pipeline_options(args))
    if rank_and_world()[0] == 0 and not args.plan:
        print(report)


def pipeline_options(args: argparse.Namespace) -> dict:
    """`run`'s flags as run_pipeline's arguments (also for a SLURM job of it)."""
    return {"start": args.start, "only": args.only, "until": args.until}


def _study_arguments(p: argparse.ArgumentParser) -> None:
    recipe_arguments(p, required=True)
    p.add_argument("--seeds", default="0,1,2", metavar="S,S,...",
                   help="seeds to run every arm with; each sets seed and data.labelled.seed (default: 0,1,2)")
    p.add_argument("--arms", metavar="ARM,ARM,...",
                   help="default: the recipe's study.arms (dpt, self_training, supervised, oracle)")
    p.add_argument("--out", metavar="DIR", help="the study's folder (default: <out>-study)")


@command("study", "the pipeline for several seeds beside its controls (self-training, supervised, true labels): "
         "study.md, study.json and study.png with mean ± std and paired differences; resumable", _study_arguments)
def study(args: argparse.Namespace) -> None:
    if rank_and_world()[0] != 0:
        args.quiet = True
    options = study_options(args, resolve_recipe(args))  # bad input is reported before torch is imported
    from dpt_scale.pipeline.study import run_study

    report = run_study(args.recipe, args.overrides, **options)
    if rank_and_world()[0] == 0:
        print(report)


def study_options(args: argparse.Namespace, recipe) -> dict:
    """`study`'s flags, checked, as run_study's arguments (also for a SLURM job of it)."""
    from dpt_scale.pipeline.study import check_arms, parse_seeds

    seeds = parse_seeds(args.seeds)
    arms = check_arms([a.strip() for a in args.arms.split(",")]) if args.arms is not None else None
    if arms is None:
        check_arms(recipe.study.arms)
    return {"seeds": seeds, "arm_names": [a.name for a in arms] if arms else None, "out": args.out}
