"""`dpt-scale study RECIPE --seeds 0,1,2`: the pipeline for several seeds, beside its controls.

One result on one seed is an anecdote: at a few labels per class, which images carry the labels
moves top-1 by points. A study runs every arm for every seed (seed s sets both `seed` and
`data.labelled.seed`, so the labelled images change too) and reports each figure as mean ± std
with the paired differences that say whether stage 4 helps:

  dpt            the recipe as it is
  self_training  stage 4 on the labelled images plus K *real* training images per pseudo-class
                 (most confident first) instead of generated ones: does the diffusion model add
                 anything beyond pseudo-labelling?
  supervised     classifier.model from scratch on the labelled images alone (plus study.supervised)
  oracle         stage 2 on the true labels of every training image: the generative side's ceiling

Each arm is an ordinary run folder, <study>/seed-S/ARM, made and resumed by `dpt-scale run`, so
a killed study picks up where it stopped. What does not depend on the seed is made once: the
imported shards (<study>/data) and, where pretrain.seed fixes it, the stage-0 backbone
(<study>/pretrain-HASH, named by its settings, so a changed setting makes a new one).
"""
from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from dpt_scale.distributed import rank_and_world
from dpt_scale.errors import UserError
from dpt_scale.recipe import Recipe, load_recipe, save_recipe

log = logging.getLogger(__name__)
STUDY_FILE = "study.json"


@dataclass(frozen=True)
class Arm:
    name: str
    what: str
    settings: dict = field(default_factory=dict)  # recipe keys the arm sets
    until: str | None = None  # the last stage it needs


ARMS = {arm.name: arm for arm in [
    Arm("dpt", "the recipe: stage 4 on the labelled images plus generated pseudo images"),
    Arm("self_training", "control: stage 4 on the labelled images plus real images with their stage-1 pseudo-labels",
        {"classifier.retrain.source": "real"}),
    Arm("supervised", "control: classifier.model from scratch on the labelled images only",
        {"classifier.method": "supervised", "classifier.model.pretrained": None}, until="train-classifier"),
    Arm("oracle", "control: stage 2 on the true labels of every training image", {"diffusion.labels": "ground_truth"}),
]}


def parse_seeds(text: str) -> list[int]:
    items = [item.strip() for item in text.split(",")]
    try:
        seeds = [int(item) for item in items]
    except ValueError:
        raise UserError(f"--seeds {text!r}: give whole numbers separated by commas, e.g. --seeds 0,1,2") from None
    if len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds {text!r} names a seed twice; each seed is one run of every arm")
    if any(not 0 <= s < 2**63 for s in seeds):
        raise UserError(f"--seeds {text!r}: seeds are 0 or more and below 2**63")
    return seeds


def check_arms(names: Sequence[str]) -> list[Arm]:
    unknown = [n for n in names if n not in ARMS]
    if unknown or not names:
        problem = f"unknown arm {unknown[0]!r}" if unknown else "no arm"
        raise UserError(f"{problem}; a study's arms are {', '.join(ARMS)} (e.g. --arms dpt,self_training)")
    if len(set(names)) != len(names):
        raise UserError(f"arms {list(names)} name one twice")
    return [ARMS[n] for n in names]


def study_dir(recipe: Recipe, out: str | None) -> Path:
    return Path(out or f"{recipe.out}-study")


def arm_recipe(path: str, overrides: Sequence[str], arm: Arm, seed: int, root: Path) -> Recipe:
    """The arm's recipe for one seed: the recipe and its --set overrides, then the arm's keys, then
    where the study keeps it and what it shares."""
    base = load_recipe(path, overrides)
    settings = {**arm.settings, **(base.study.supervised if arm.name == "supervised" else {})}
    settings.update({"out": str(root / f"seed-{seed}" / arm.name), "seed": seed, "data.labelled.seed": seed})
    if base.data.root is None:  # the run's own import: one for the whole study
        settings["data.root"] = str(root / "data")
    recipe = load_recipe(path, [*overrides, *_as_sets(settings)])
    from dpt_scale.pretrain.backbone import uses_pretrain

    if uses_pretrain(recipe) and recipe.pretrain.out is None:
        settings["pretrain.out"] = str(root / f"pretrain-{_backbone_key(recipe)}")
        recipe = load_recipe(path, [*overrides, *_as_sets(settings)])
    return recipe


def _backbone_key(recipe: Recipe) -> str:
    from dpt_scale.pipeline.markers import parts_hash
    from dpt_scale.pipeline.stages import STAGES, parts_of

    return parts_hash(parts_of(recipe, STAGES["pretrain"]))[:12]


def _as_sets(settings: dict) -> list[str]:
    return [f"{key}={value if isinstance(value, str) else json.dumps(value)}" for key, value in settings.items()]


def run_study(path: str, overrides: Sequence[str], seeds: list[int], arm_names: Sequence[str] | None = None,
              out: str | None = None) -> Path:
    from dpt_scale.pipeline.run import run_pipeline
    from dpt_scale.pipeline.study_report import write_study

    base = load_recipe(path, overrides)
    arms = check_arms(arm_names or base.study.arms)
    root = study_dir(base, out)
    _claim(root, base)
    recipes = {(seed, arm.name): arm_recipe(path, overrides, arm, seed, root) for seed in seeds for arm in arms}
    rank, _ = rank_and_world()
    if rank == 0:
        save_recipe(base, root / "recipe.yaml")
    for n, ((seed, name), recipe) in enumerate(recipes.items(), 1):
        if rank == 0:
            log.info(f"=== study {root}: seed {seed}, arm {name} ({n}/{len(recipes)}) ===")
        run_pipeline(recipe, until=ARMS[name].until)
    if rank != 0:
        return root / "study.md"
    return write_study(root, base, seeds, arms, recipes)


def _claim(root: Path, recipe: Recipe) -> None:
    """A study folder holds one recipe's study; another recipe's is refused (its runs would be redone)."""
    saved = root / "recipe.yaml"
    if saved.is_file():
        try:
            other = (yaml.safe_load(saved.read_text()) or {}).get("name")
        except (yaml.YAMLError, AttributeError):
            other = None
        if other != recipe.name:
            raise UserError(f"{root} holds the study of another recipe ({saved} names {other!r}, this recipe "
                            f"{recipe.name!r}); pass another --out DIR, or remove {root} to start over")
    elif root.is_dir() and any(p for p in root.iterdir() if not p.name.startswith(".")):
        raise UserError(f"{root} holds files that are not a dpt-scale study; pass another --out DIR, or empty it")
