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
