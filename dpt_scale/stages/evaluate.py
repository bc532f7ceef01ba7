"""`dpt-scale evaluate RECIPE`: the metrics of whatever the run has produced so far.

Classifiers: the stage-1 (<out>/classifier) and stage-4 (<out>/retrain) EMA weights on the
validation shards: top-1, top-5, per-class accuracy and a confusion-matrix PNG, written to
<out>/evaluation/. (Generation metrics join here with the sampler.)
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from dpt_scale.distributed import init_distributed
from dpt_scale.errors import UserError
from dpt_scale.recipe import Recipe, save_recipe
from dpt_scale.stages.train_classifier import STAGE_DIRS, evaluate

log = logging.getLogger(__name__)


def evaluate_run(recipe: Recipe) -> dict:
    rank, _, device = init_distributed()
    out = Path(recipe.out) / "evaluation"
    results = {}
    for stage, sub in STAGE_DIRS.items():
        weights = Path(recipe.out) / sub / "weights.pt"
        if weights.is_file():
            report = evaluate(recipe, weights, out / sub, device, title=stage)
            if report:
                results[stage] = {k: report[k] for k in ("top1", "top5", "samples", "per_class")}
    if not results:
        raise UserError(f"nothing to evaluate under {recipe.out}: no classifier weights and no validation "
                        "shards (run `dpt-scale train-classifier` first)")
    if rank == 0:
        save_recipe(recipe, out / "recipe.yaml")
        (out / "metrics.json").write_text(json.dumps(results, indent=1))
    return results


def summary(recipe: Recipe) -> dict:
    """What `dpt-scale evaluate` prints: top-1 and top-5 per stage (the rest is in metrics.json)."""
    return {stage: {k: r[k] for k in ("top1", "top5")} for stage, r in evaluate_run(recipe).items()}
