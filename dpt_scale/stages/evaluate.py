"""`dpt-scale evaluate RECIPE`: the metrics of whatever the run has produced so far.

Classifiers: the stage-1 (<out>/classifier) and stage-4 (<out>/retrain) EMA weights on the
validation shards: top-1, top-5, per-class accuracy and a confusion-matrix PNG, written to
<out>/evaluation/.

Generation, once the sampler has written <out>/samples: FID, KID, precision/recall against the
reference set (`evaluate.reference`, default the validation shards) and conditional accuracy,
with the features of `evaluate.evaluator` (dpt_scale.metrics). Everything lands in
<out>/evaluation/metrics.json; reference features are cached in <out>/evaluation/cache/.
"""
from __future__ import annotations

import logging

from dpt_scale import jsonsafe
from dpt_scale.classification.evaluate import evaluate_weights
from dpt_scale.distributed import init_distributed
from dpt_scale.errors import UserError
from dpt_scale.layout import CLASSIFIER_STAGES, layout
from dpt_scale.recipe import Recipe, save_recipe
from dpt_scale.shards.manifest import MANIFEST

log = logging.getLogger(__name__)
# What `dpt-scale evaluate` prints per entry (metrics.json has the rest).
SUMMARY_KEYS = {"generation": ("fid", "kid_mean", "precision", "recall", "conditional_accuracy")}
CLASSIFIER_SUMMARY = ("top1", "top5")


def evaluate_run(recipe: Recipe) -> dict:
    rank, _, device = init_distributed()
    out = layout(recipe).evaluation
    results = {}
    for stage, sub in CLASSIFIER_STAGES.items():
        weights = layout(recipe).classifier(stage) / "weights.pt"
        if weights.is_file():
            report = evaluate_weights(recipe, weights, out / sub, device, title=stage)
            if report:
                results[stage] = {k: report[k] for k in ("top1", "top5", "samples", "per_class")}
    samples = layout(recipe).samples
    if (samples / MANIFEST).is_file():
        from dpt_scale.metrics.generation import generation_metrics

        results["generation"] = generation_metrics(recipe, samples, device)
    if not results:
        raise UserError(f"nothing to evaluate under {recipe.out}: no classifier weights with validation shards "
                        f"to score them on, and no pseudo images in {samples} (run `dpt-scale train-classifier` "
                        "first)")
    if rank == 0:
        save_recipe(recipe, out / "recipe.yaml")
        (out / "metrics.json").write_text(jsonsafe.dumps(results, "metrics.json", indent=1))
    return results


def summary(recipe: Recipe) -> dict:
    """What `dpt-scale evaluate` prints: top-1 and top-5 per classifier stage; FID, KID, precision,
    recall and conditional accuracy for the samples."""
    return {name: {k: r[k] for k in SUMMARY_KEYS.get(name, CLASSIFIER_SUMMARY)}
            for name, r in evaluate_run(recipe).items()}
