"""Classifier metrics on a labelled shard set: top-1, top-5, per-class accuracy, confusion matrix.
Every rank scores its whole shards; the counts are summed across ranks."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.distributed as dist

from dpt_scale import jsonsafe
from dpt_scale.distributed import rank_and_world
from dpt_scale.errors import UserError
from dpt_scale.layout import layout
from dpt_scale.models.classifier import load_classifier
from dpt_scale.recipe import Recipe
from dpt_scale.shards.manifest import Manifest
from dpt_scale.shards.map_shards import map_shards

log = logging.getLogger(__name__)


def evaluate_classifier(model: torch.nn.Module, directory: str | Path, batch_size: int, device: torch.device,
                        workers: int = 2) -> dict:
    manifest = Manifest.load(directory)
    if sum(manifest.class_histogram) == 0:
        raise UserError(f"{directory}: no sample carries a label, so accuracy cannot be measured")
    rank, world = rank_and_world()
    classes = manifest.num_classes
    confusion = torch.zeros(classes * classes, dtype=torch.int64)  # true x predicted
    top5 = torch.zeros((), dtype=torch.int64)
    mine = list(range(rank, len(manifest.shards), world))
    for pred in map_shards(lambda x: model(x).float().softmax(1), directory, mine, batch_size, device, workers,
                           read_labels=True):
        known = pred.labels >= 0
        labels, probs = pred.labels[known], pred.outputs[known]
        confusion += torch.bincount(labels * classes + probs.argmax(1), minlength=classes * classes)
        top5 += (probs.topk(min(5, classes), dim=1).indices == labels[:, None]).any(1).sum()
    if dist.is_initialized():
        dist.all_reduce(confusion)
        dist.all_reduce(top5)
    confusion = confusion.view(classes, classes)
    total = int(confusion.sum())
    per_class = confusion.diag() / confusion.sum(1).clamp(min=1)
    return {"top1": float(confusion.diag().sum()) / total, "top5": int(top5) / total, "samples": total,
            "per_class": {name: round(float(a), 4) for name, a in zip(manifest.classes, per_class)},
            "confusion": confusion.tolist()}


def save_confusion_png(confusion: list[list[int]], classes: list[str], path: str | Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only; no display
    import matplotlib.pyplot as plt

    matrix = torch.tensor(confusion, dtype=torch.float64)
    rates = matrix / matrix.sum(1, keepdim=True).clamp(min=1)
    n = len(classes)
    side = min(4 + 0.35 * n, 40)
    fig, ax = plt.subplots(figsize=(side, side))
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    if n <= 30:  # beyond that, labels and counts are unreadable; the colours still show the pattern
        ax.set_xticks(range(n), classes, rotation=90)
        ax.set_yticks(range(n), classes)
        for i in range(n):
            for j in range(n):
                if matrix[i, j]:
                    ax.text(j, i, int(matrix[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def evaluate_weights(recipe: Recipe, weights: Path, out: Path, device, title: str) -> dict | None:
    """Top-1/top-5/per-class/confusion of the EMA weights on the validation shards, if there are any."""
    val = layout(recipe).val
    if not (val / "manifest.json").is_file():
        log.warning(f"no validation shards at {val}: skipping evaluation")
        return None
    model = load_classifier(weights, device=device)
    report = evaluate_classifier(model, val, recipe.classifier.pseudo_label.batch, device,
                                 recipe.classifier.pseudo_label.workers)
    if dist.get_rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.json").write_text(jsonsafe.dumps(report, "eval.json", indent=1))
        save_confusion_png(report["confusion"], Manifest.load(val).classes, out / "confusion.png",
                           f"{recipe.name} {title}: top-1 {report['top1']:.3f}")
        log.info(f"{title}: top-1 {report['top1']:.4f}, top-5 {report['top5']:.4f} on {report['samples']} "
                 f"validation images")
    return report
