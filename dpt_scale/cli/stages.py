"""The pipeline stages as commands: `dpt-scale STAGE RECIPE [--set KEY=VALUE ...]`."""
from __future__ import annotations

import argparse

from dpt_scale.cli import command, recipe_arguments, resolve_recipe
from dpt_scale.distributed import rank_and_world


def _stage_arguments(p: argparse.ArgumentParser) -> None:
    recipe_arguments(p, required=True)


def _quiet_unless_rank0(args: argparse.Namespace) -> None:
    if rank_and_world()[0] != 0:  # every rank resolves the recipe; one prints it
        args.quiet = True


@command("train-diffusion", "train the class-conditional U-ViT (any launcher: python, torchrun, deepspeed)",
         _stage_arguments)
def train_diffusion(args: argparse.Namespace) -> None:
    from dpt_scale.stages.train_diffusion import train_diffusion as run

    _quiet_unless_rank0(args)
    weights = run(resolve_recipe(args))
    if rank_and_world()[0] == 0:
        print(weights)


@command("train-classifier", "stage 1: the semi-supervised classifier (fixmatch, linear_probe or supervised)",
         _stage_arguments)
def train_classifier(args: argparse.Namespace) -> None:
    from dpt_scale.stages.train_classifier import train_classifier as run

    _quiet_unless_rank0(args)
    weights = run(resolve_recipe(args), "stage1")
    if rank_and_world()[0] == 0:
        print(weights)


@command("retrain", "stage 4: the classifier again, on real plus pseudo images", _stage_arguments)
def retrain(args: argparse.Namespace) -> None:
    from dpt_scale.stages.train_classifier import train_classifier as run

    _quiet_unless_rank0(args)
    weights = run(resolve_recipe(args), "retrain")
    if rank_and_world()[0] == 0:
        print(weights)


@command("pseudo-label", "label every training image with the stage-1 classifier (resumable per shard)",
         _stage_arguments)
def pseudo_label(args: argparse.Namespace) -> None:
    from dpt_scale.stages.pseudo_label import pseudo_label as run

    _quiet_unless_rank0(args)
    out = run(resolve_recipe(args))
    if rank_and_world()[0] == 0:
        print(out)


@command("evaluate", "metrics of the run so far: classifier top-1/top-5, per-class accuracy, confusion",
         _stage_arguments)
def evaluate(args: argparse.Namespace) -> None:
    import json

    from dpt_scale.stages.evaluate import evaluate_run

    _quiet_unless_rank0(args)
    results = evaluate_run(resolve_recipe(args))
    if rank_and_world()[0] == 0:
        print(json.dumps({stage: {k: r[k] for k in ("top1", "top5")} for stage, r in results.items()}))
