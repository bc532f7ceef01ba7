"""`dpt-scale pseudo-label RECIPE`: the stage-1 classifier's label and confidence for every training
image, written as one sidecar per shard (see classification/pseudo_labels.py).

Shard i goes to rank i % world; a rank writes each sidecar as soon as its shard is done, so a
killed run loses at most the shards in flight, and a restarted run skips every sidecar that names
the same shard checksum and classifier. Rank 0 writes the manifest last, with per-class counts,
the confidence histogram, the stage-2 selection and (evaluation only) agreement with true labels.
"""
from __future__ import annotations

import logging
from pathlib import Path

from dpt_scale.classification.pseudo_labels import FORMAT, MANIFEST, read_sidecar, summarise, write_sidecar
from dpt_scale.data.subset import read_labels
from dpt_scale.distributed import init_distributed
from dpt_scale.engine.export import weights_identity
from dpt_scale.errors import UserError
from dpt_scale.layout import layout
from dpt_scale.models.classifier import load_classifier
from dpt_scale.recipe import Recipe, save_recipe
from dpt_scale.shards.manifest import Manifest, write_json
from dpt_scale.shards.map_shards import map_shards
from dpt_scale.shards.per_shard import run_per_shard

log = logging.getLogger(__name__)


def pseudo_label(recipe: Recipe) -> Path:
    rank, world, device = init_distributed()
    cfg = recipe.classifier.pseudo_label
    train_dir = layout(recipe).train
    weights = layout(recipe).classifier() / "weights.pt"
    out = layout(recipe).pseudo_labels
    manifest = Manifest.load(train_dir)
    model = load_classifier(weights, device=device)
    identity = weights_identity(weights)  # which classifier a sidecar came from
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        save_recipe(recipe, out / "recipe.yaml")
        (out / MANIFEST).unlink(missing_ok=True)  # the set is being (re)made: not finished until rewritten

    def done(i: int) -> bool:
        entry = manifest.shards[i]
        side = read_sidecar(out, entry.name, manifest.num_classes)
        return side is not None and side["sha256"] == entry.sha256 and side["classifier"] == identity

    def work(todo: list[int]) -> int:
        images = 0
        for pred in map_shards(lambda x: model(x).float().softmax(1), train_dir, todo, cfg.batch, device, cfg.workers):
            entry = manifest.shards[pred.shard]
            write_sidecar(out, entry.name, entry.sha256, identity, pred.keys, pred.outputs)
            images += len(pred.keys)
        return images

    run_per_shard(len(manifest.shards), done, work, lambda: _write_manifest(recipe, manifest, train_dir, out, identity),
                  "labelled")
    return out


def _write_manifest(recipe: Recipe, manifest: Manifest, train_dir: Path, out: Path, identity: str) -> None:
    sidecars = [read_sidecar(out, e.name, manifest.num_classes) for e in manifest.shards]
    if any(s is None for s in sidecars):
        raise UserError(f"{out}: some shards have no sidecar after every rank finished; rerun the command")
    true_labels = read_labels(train_dir) if sum(manifest.class_histogram) else None  # evaluation only
    summary = summarise(sidecars, manifest.num_classes, recipe.classifier.pseudo_label, true_labels)
    data = {"format": FORMAT, "shard_set": str(train_dir), "classifier": identity, "classes": manifest.classes,
            "shards": [e.name for e in manifest.shards], **summary}
    write_json(out / MANIFEST, data, indent=1)
    agreement = f", agreement with true labels {summary['agreement']:.4f}" if "agreement" in summary else ""
    log.info(f"{out}: {summary['samples']} pseudo-labels, {summary['selection']['selected']} selected for "
             f"stage 2{agreement}")
