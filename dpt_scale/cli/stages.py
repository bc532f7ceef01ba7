"""The pipeline stages as commands: `dpt-scale STAGE RECIPE [--set KEY=VALUE ...]`.

Each runs under any launcher (python, torchrun, deepspeed); every rank resolves the recipe, rank 0
prints it and, at the end, the stage's result (an output path, or metrics as JSON).
"""
from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path

from dpt_scale.cli import command, recipe_arguments, resolve_recipe
from dpt_scale.distributed import rank_and_world
from dpt_scale.errors import UserError


def _stage_arguments(p: argparse.ArgumentParser) -> None:
    recipe_arguments(p, required=True)


def _stage(name: str, help: str, target: str, *extra) -> None:
    """Register `dpt-scale NAME RECIPE` running `module:function(recipe, *extra)`; the module is
    imported only when the command runs (torch and DeepSpeed are slow to import)."""
    def run(args: argparse.Namespace) -> None:
        if rank_and_world()[0] != 0:  # every rank resolves the recipe; one prints it
            args.quiet = True
        recipe = resolve_recipe(args)  # a bad recipe is reported before the stage's slow imports
        from dpt_scale.pipeline.run import check_out

        check_out(recipe)  # not into another run's folder, nor a folder of unrelated files
        module, function = target.split(":")
        result = getattr(importlib.import_module(module), function)(recipe, *extra)
        if rank_and_world()[0] == 0:
            print(result if isinstance(result, (str, Path)) else json.dumps(result))

    command(name, help, _stage_arguments)(run)


_stage("pretrain", "stage 0: a self-supervised backbone from the training shards (no label is read)",
       "dpt_scale.stages.pretrain:pretrain")
_stage("train-classifier", "stage 1: the semi-supervised classifier (fixmatch, linear_probe or supervised)",
       "dpt_scale.stages.train_classifier:train_classifier", "stage1")
_stage("pseudo-label", "label every training image with the stage-1 classifier (resumable per shard)",
       "dpt_scale.stages.pseudo_label:pseudo_label")
_stage("encode", "latent recipes: autoencoder moments of every training image (resumable per shard)",
       "dpt_scale.stages.encode:encode")
_stage("train-diffusion", "train the class-conditional U-ViT (any launcher: python, torchrun, deepspeed)",
       "dpt_scale.stages.train_diffusion:train_diffusion")
_stage("sample", "stage 3: pseudo images from the stage-2 model into shards (resumable, any number of ranks)",
       "dpt_scale.stages.sample:sample")
_stage("retrain", "stage 4: the classifier again, on real plus pseudo images",
       "dpt_scale.stages.train_classifier:train_classifier", "retrain")
_stage("make-evaluator", "an evaluation-only classifier on every true label of <data.root>/train, for data sets no "
       "shipped evaluator knows (evaluate.evaluator auto finds it)", "dpt_scale.stages.make_evaluator:make_evaluator")
_stage("evaluate", "metrics of the run so far: classifier top-1/top-5 and confusion; FID, KID, precision/recall and "
       "conditional accuracy of <out>/samples",
       "dpt_scale.stages.evaluate:summary")


def _run_arguments(p: argparse.ArgumentParser) -> None:
    from dpt_scale.pipeline.stages import STAGES

    recipe_arguments(p, required=True)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--from", dest="start", metavar="STAGE", choices=list(STAGES),
                       help=f"run STAGE and every later stage again ({', '.join(STAGES)})")
    which.add_argument("--only", metavar="STAGE", choices=list(STAGES), help="run STAGE alone, again")
    p.add_argument("--until", metavar="STAGE", choices=list(STAGES), help="stop after STAGE")
    p.add_argument("--plan", action="store_true", help="print what would run, and why, then stop")


@command("run", "the whole pipeline: import, subset, (pretrain), stage 1, pseudo-label, (encode), stage 2, sample, "
         "stage 4, evaluate, then report.md; finished stages are skipped, interrupted ones resumed", _run_arguments)
def run(args: argparse.Namespace) -> None:
    if rank_and_world()[0] != 0:
        args.quiet = True
    recipe = resolve_recipe(args)  # a bad recipe is reported before torch is imported
    from dpt_scale.pipeline.run import run_pipeline

    if args.only and args.until:
        raise UserError("--only runs one stage; --until has nothing to add to it")
    report = run_pipeline(recipe, args.start, args.only, dry_run=args.plan, until=args.until)
    if rank_and_world()[0] == 0 and not args.plan:
        print(report)


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
    from dpt_scale.pipeline.study import check_arms, parse_seeds

    if rank_and_world()[0] != 0:
        args.quiet = True
    seeds = parse_seeds(args.seeds)
    arms = check_arms([a.strip() for a in args.arms.split(",")]) if args.arms is not None else None
    recipe = resolve_recipe(args)  # a bad recipe is reported before torch is imported
    if arms is None:
        check_arms(recipe.study.arms)
    from dpt_scale.pipeline.study import run_study

    report = run_study(args.recipe, args.overrides, seeds, [a.name for a in arms] if arms else None, args.out)
    if rank_and_world()[0] == 0:
        print(report)
