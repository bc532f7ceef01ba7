"""FID, KID, precision/recall and conditional accuracy of a generated shard set against a real one.

Both sets are read as shards (no image files on disk, no torch-fidelity Dataset): each rank runs
the evaluator over whole shards (shard i on rank i % world) and rank 0 gathers the features in
shard order, so the numbers do not depend on the number of ranks. The math is torch-fidelity's
own (`*_features_to_*` functions), on rank 0; every rank returns its result.

The reference set's features and FID statistics are cached under <out>/evaluation/cache/, keyed by
the evaluator's identity and the reference manifest's shard checksums: evaluating successive
sample sets extracts the (e.g. 50k ImageNet) reference once, and a changed reference or other
weights are never mistaken for the cached ones. The cache lives with the run, not in the data
directory, which may be shared and read-only.

Conditional accuracy: the evaluator's top-1 on the generated images against the class each was
generated for (`cls`), where the evaluator has a head over the data set's classes.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from dpt_scale.distributed import rank_and_world
from dpt_scale.errors import UserError
from dpt_scale.layout import layout
from dpt_scale.metrics.evaluators import Evaluator, build_evaluator, trained_evaluator_path
from dpt_scale.recipe import Recipe
from dpt_scale.recipe.schema import Evaluate
from dpt_scale.shards.manifest import MANIFEST, Manifest
from dpt_scale.shards.map_shards import map_shards

log = logging.getLogger(__name__)
# Precision/recall look at each point's 3rd nearest neighbour (torch-fidelity's default), so a set
# needs the point itself plus 3 others.
MIN_SAMPLES = 4
PRC_BATCH = 2048  # rows of the distance matrix at a time: 2048 x 50k floats = 400 MB


@dataclass
class SetFeatures:
    features: torch.Tensor  # (N, D) float32, in shard order
    logits: torch.Tensor | None  # (N, classes), or None for an evaluator without a class head
    labels: torch.Tensor  # (N,) each sample's `cls`; -1 where it has none


def _from_rank0(value):
    """Rank 0's `value` on every rank."""
    if rank_and_world()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def set_features(evaluator: Evaluator, directory: Path, batch: int, device: torch.device,
                 workers: int) -> SetFeatures | None:
    """The evaluator over a whole shard set; the result on rank 0, None on the other ranks."""
    rank, world = rank_and_world()
    shards = list(range(rank, len(Manifest.load(directory).shards), world))

    def packed(images: torch.Tensor) -> torch.Tensor:  # map_shards carries one tensor per batch
        features, logits = evaluator(images)
        return features if logits is None else torch.cat([features, logits], 1)

    parts = [(p.shard, p.outputs, p.labels)
             for p in map_shards(packed, directory, shards, batch, device, workers, read_labels=True)]
    if world > 1:
        gathered = [None] * world if rank == 0 else None
        dist.gather_object(parts, gathered, dst=0)
        if rank != 0:
            return None
        parts = [part for rank_parts in gathered for part in rank_parts]
    parts.sort(key=lambda part: part[0])
    outputs = torch.cat([p[1] for p in parts]).float()
    logits = outputs[:, evaluator.dim:] if evaluator.classes is not None else None
    return SetFeatures(outputs[:, :evaluator.dim].contiguous(), logits, torch.cat([p[2] for p in parts]))


def reference_features(evaluator: Evaluator, directory: Path, manifest: Manifest, cache: Path, batch: int,
                       device: torch.device, workers: int) -> dict | None:
    """{"features", "mu", "sigma", ...} of the reference set on rank 0 (None elsewhere), from the
    cache when it holds this set for this evaluator, else extracted and cached."""
    from torch_fidelity.metric_fid import fid_features_to_statistics

    rank, _ = rank_and_world()
    key = hashlib.sha256(json.dumps({"evaluator": evaluator.identity,
                                     "shards": [s.sha256 for s in manifest.shards]}).encode()).hexdigest()
    path = cache / f"reference-{evaluator.name}-{key[:20]}.pt"
    entry = _load_cache(path, key) if rank == 0 else None
    if entry is not None and "labels" not in entry:  # cached before labels were kept: extract again
        entry = None
    if _from_rank0(entry is not None):  # rank 0 decides, so that all ranks extract or none does
        log.info(f"reference features of {directory} from {path}")
        return entry
    found = set_features(evaluator, directory, batch, device, workers)
    if found is None:
        return None
    stats = fid_features_to_statistics(found.features)
    entry = {"key": key, "reference": str(directory), "evaluator": evaluator.identity, "features": found.features,
             "labels": found.labels, "mu": torch.from_numpy(stats["mu"]), "sigma": torch.from_numpy(stats["sigma"])}
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(entry, tmp)
    os.replace(tmp, path)  # a killed run leaves no half-written cache behind
    return entry


def _load_cache(path: Path, key: str) -> dict | None:
    if not path.is_file():
        return None
    try:
        entry = torch.load(path, map_location="cpu", weights_only=True)
        return entry if entry.get("key") == key else None
    except Exception as exc:  # damaged or foreign: extract again (and overwrite it)
        log.warning(f"ignoring unreadable feature cache {path} ({exc})")
        return None


def compare(generated: SetFeatures, reference: dict, kid_subset_size: int) -> dict:
    """torch-fidelity's FID, KID and precision/recall (generated = its input 1, real = input 2)."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric
    from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric

    real = reference["features"]
    fid = fid_statistics_to_metric(fid_features_to_statistics(generated.features),
                                   {"mu": reference["mu"].numpy(), "sigma": reference["sigma"].numpy()},
                                   verbose=False)
    # KID draws subsets of this size from each set; small sets get subsets as large as they are.
    subset = min(kid_subset_size, len(generated.features), len(real))
    kid = kid_features_to_metric(generated.features, real, kid_subset_size=subset, verbose=False)
    prc = prc_features_to_metric(generated.features, real, save_cpu_ram=True, prc_batch_size=PRC_BATCH,
                                 verbose=False)
    return {"fid": fid[KEY_METRIC_FID], "kid_mean": kid[KEY_METRIC_KID_MEAN], "kid_std": kid[KEY_METRIC_KID_STD],
            "kid_subset_size": subset, "precision": prc[KEY_METRIC_PRECISION], "recall": prc[KEY_METRIC_RECALL]}


def within_class_spread(features: torch.Tensor, labels: torch.Tensor) -> dict[int, float]:
    """Per class, the mean squared distance of its features to their centroid (the trace of the
    class covariance): how varied a class's images are, as the evaluator sees them."""
    spread = {}
    for c in labels.unique().tolist():
        if c < 0:
            continue
        group = features[labels == c].double()
        if len(group) > 1:
            spread[c] = float((group - group.mean(0)).pow(2).sum(1).mean())
    return spread


def diversity(generated: SetFeatures, reference: dict) -> dict:
    """Within-class spread of the generated images against that of the real ones, class by class
    (mean of the ratios): strongly guided samples can all be near-copies of one prototype per
    class, which recall over all classes can hide and which teaches a classifier little."""
    fake = within_class_spread(generated.features, generated.labels)
    real = within_class_spread(reference["features"], reference["labels"])
    both = [c for c in fake if c in real and real[c] > 0]
    if not both:
        return {"spread_ratio": None}
    ratios = [fake[c] / real[c] for c in both]
    return {"spread_ratio": sum(ratios) / len(ratios), "spread_ratio_min": min(ratios), "spread_classes": len(both)}


def conditional_accuracy(generated: SetFeatures, evaluator: Evaluator, manifest: Manifest, path: Path) -> float | None:
    """Share of generated images the evaluator assigns to the class they were generated for."""
    if generated.logits is None:
        return None  # no head over the data set's classes (inception)
    if manifest.classes != evaluator.classes:
        log.warning(f"{path}: classes {manifest.classes[:5]}... are not the {evaluator.name} evaluator's "
                    f"{evaluator.classes[:5]}...: no conditional accuracy")
        return None
    known = generated.labels >= 0
    if not known.any():
        return None
    return (generated.logits[known].argmax(1) == generated.labels[known]).float().mean().item()


def _shard_set(path: Path, what: str, fix: str) -> Manifest:
    if not (path / MANIFEST).is_file():
        raise UserError(f"{what} not found: {path} has no {MANIFEST} ({fix})")
    manifest = Manifest.load(path)
    if manifest.image is None or not manifest.image["size"]:
        found = "no images" if manifest.image is None else "images of several sizes"
        raise UserError(f"{path} holds {found}; generation metrics need images of one size "
                        "(`dpt-scale data import --image-size`)")
    if manifest.num_samples < MIN_SAMPLES:
        raise UserError(f"{path} holds {manifest.num_samples} image(s); generation metrics need at least "
                        f"{MIN_SAMPLES}")
    return manifest


def reference_for(recipe: Recipe, device: torch.device) -> tuple[Evaluator, dict | None]:
    """The recipe's evaluator and its reference features (on rank 0; None elsewhere). Every rank calls it."""
    cfg = resolved(recipe)
    reference = Path(cfg.reference or layout(recipe).val)
    manifest = _shard_set(reference, "reference shard set",
                          "run `dpt-scale data import`, or set evaluate.reference to a shard set")
    evaluator = build_evaluator(cfg, manifest, device)
    if evaluator.accepts is not None:
        evaluator.accepts(manifest, reference)
    cache = layout(recipe).evaluation / "cache"
    workers = recipe.classifier.pseudo_label.workers
    return evaluator, reference_features(evaluator, reference, manifest, cache, cfg.batch, device, workers)


def resolved(recipe: Recipe) -> Evaluate:
    """The evaluate section with the trained evaluator's default path filled in (named by the
    training set's checksum; see evaluators.trained_evaluator_path)."""
    cfg = recipe.evaluate
    if cfg.trained.weights is not None:
        return cfg
    train = layout(recipe).train
    weights = trained_evaluator_path(recipe.data_root, Manifest.load(train)) if (train / MANIFEST).is_file() else None
    return dataclasses.replace(cfg, trained=dataclasses.replace(cfg.trained, weights=weights and str(weights)))


def image_metrics(evaluator: Evaluator, reference: dict, images: torch.Tensor, labels: torch.Tensor,
                  classes: list[str], kid_subset_size: int, batch: int) -> dict:
    """FID, KID, precision/recall and conditional accuracy of uint8 images held in memory (the
    in-training probe), against reference features from `reference_for`."""
    parts = [evaluator(images[i:i + batch]) for i in range(0, len(images), batch)]
    logits = None if parts[0][1] is None else torch.cat([p[1] for p in parts]).cpu()
    fake = SetFeatures(torch.cat([p[0] for p in parts]).cpu(), logits, labels.cpu())
    accuracy = None
    if logits is not None and evaluator.classes == classes:
        accuracy = (logits.argmax(1) == fake.labels).float().mean().item()
    return {**compare(fake, reference, kid_subset_size), **diversity(fake, reference), "conditional_accuracy": accuracy,
            "samples": len(images), "evaluator": evaluator.name}


def generation_metrics(recipe: Recipe, generated: Path | None = None,
                       device: torch.device = torch.device("cpu")) -> dict:
    """Metrics of `generated` (default <out>/samples) against `evaluate.reference` (default
    <data root>/val); the same dict on every rank."""
    cfg = recipe.evaluate
    generated = Path(generated or layout(recipe).samples)
    reference = Path(cfg.reference or layout(recipe).val)
    gen_manifest = _shard_set(generated, "generated images", "run `dpt-scale sample RECIPE` first")
    evaluator, real = reference_for(recipe, device)
    if evaluator.accepts is not None:
        evaluator.accepts(gen_manifest, generated)
    workers = recipe.classifier.pseudo_label.workers  # the same decoding processes as classifier evaluation
    fake = set_features(evaluator, generated, cfg.batch, device, workers)
    result = None
    if fake is not None:  # rank 0
        result = {**compare(fake, real, cfg.kid_subset_size), **diversity(fake, real),
                  "conditional_accuracy": conditional_accuracy(fake, evaluator, gen_manifest, generated),
                  "evaluator_top1": evaluator.ceiling,
                  "samples": len(fake.features), "reference_samples": len(real["features"]),
                  "evaluator": evaluator.name, "generated": str(generated), "reference": str(reference),
                  "sampled_with": {k: v for k, v in gen_manifest.meta.get("generated", {}).items()
                                   if k in ("solver", "steps", "guidance")}}
        accuracy = result["conditional_accuracy"]
        log.info(f"generation ({evaluator.name} features, {result['samples']} samples vs "
                 f"{result['reference_samples']}): FID {result['fid']:.3f}, KID {result['kid_mean']:.5f}, "
                 f"precision {result['precision']:.3f}, "
                 f"recall {result['recall']:.3f}, conditional accuracy "
                 f"{'n/a' if accuracy is None else f'{accuracy:.4f}'}")
    return _from_rank0(result)
