"""The end of `dpt-scale run`: <out>/report.md and <out>/report.json, figures in <out>/report/.

Everything is read back from the files the stages wrote (markers, eval.json, the pseudo-label and
shard manifests, metrics.jsonl, fid.jsonl, evaluation/metrics.json), so a report can be remade at
any time and shows whatever the run holds.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

from dpt_scale.layout import CLASSIFIER_STAGES, layout
from dpt_scale.pipeline.markers import read_marker
from dpt_scale.pipeline.stages import PIPELINE
from dpt_scale.pretrain.backbone import pretrain_dir, uses_pretrain
from dpt_scale.recipe import Recipe
from dpt_scale.shards.manifest import MANIFEST, Manifest, write_json

log = logging.getLogger(__name__)
GRID_ROWS = 16  # classes shown one row each in the pseudo-image grid
HEADLINE = {"stage1_top1": "stage-1 top-1", "stage4_top1": "stage-4 top-1", "stage4_gain": "stage 4 - stage 1",
            "fid": "FID of the pseudo images", "conditional_accuracy": "conditional accuracy of the pseudo images",
            "pseudo_label_agreement": "pseudo-label agreement with true labels",
            "backbone_knn_top1": "stage-0 backbone: k-NN top-1 on validation images"}
STAGE_COLUMNS = ("stage", "what", "state", "wall time", "results")
EVALUATED = ("fid", "kid_mean", "precision", "recall", "spread_ratio", "conditional_accuracy", "evaluator",
             "evaluator_top1", "samples", "sampled_with")


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _jsonl(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except OSError:
        return []


def _count(shard_set: Path) -> int | None:
    return Manifest.load(shard_set).num_samples if (shard_set / MANIFEST).is_file() else None


def results(recipe: Recipe) -> dict[str, dict]:
    """Each stage's figures, from its outputs: {stage: {name: value}} (stages without outputs left out)."""
    run = layout(recipe)
    found: dict[str, dict] = {}
    counts = {"train": _count(run.train), "val": _count(run.val)}
    if counts["train"]:
        found["import"] = {f"{split}_images": n for split, n in counts.items() if n is not None}
    if run.labelled.is_file():
        keys = [k for k in run.labelled.read_text().splitlines() if k and not k.startswith("#")]
        found["subset"] = {"labelled_images": len(keys)}
    knn = _jsonl(pretrain_dir(recipe) / "knn.jsonl") if uses_pretrain(recipe) else []
    if knn:
        found["pretrain"] = {"knn_top1": knn[-1]["knn_top1"], "steps": knn[-1]["step"]}
    for stage, which in (("train-classifier", "stage1"), ("retrain", "retrain")):
        scores = _json(run.classifier(which) / "eval.json")
        if scores:
            found[stage] = {"top1": scores["top1"], "top5": scores["top5"]}
    labels = _json(run.pseudo_labels / MANIFEST)
    if labels:
        found["pseudo-label"] = {"agreement": labels.get("agreement"), "selected": labels["selection"]["selected"],
                                 "mean_confidence": labels["mean_confidence"]}
    fid = _jsonl(run.diffusion / "fid.jsonl")
    losses = _jsonl(run.diffusion / "metrics.jsonl")
    if losses:
        found["train-diffusion"] = {"steps": losses[-1]["step"], "final_loss": losses[-1]["loss"]}
        if fid:  # unguided EMA samples, fewer than the final evaluation's: a trend, not the result
            found["train-diffusion"].update({f"in_training_fid ({fid[-1]['samples']} unguided)": fid[-1]["fid"],
                                             "in_training_evaluator": fid[-1].get("evaluator")})
    images = _count(run.samples)
    if images is not None:
        found["sample"] = {"images": images}
    generation = (_json(run.evaluation / "metrics.json") or {}).get("generation")
    if generation:
        found["evaluate"] = {k: generation.get(k) for k in EVALUATED}
    return found


def headline(found: dict) -> dict:
    get = lambda stage, key: found.get(stage, {}).get(key)  # noqa: E731
    head = {"stage1_top1": get("train-classifier", "top1"), "stage4_top1": get("retrain", "top1"),
            "fid": get("evaluate", "fid"), "conditional_accuracy": get("evaluate", "conditional_accuracy"),
            "pseudo_label_agreement": get("pseudo-label", "agreement"),
            "backbone_knn_top1": get("pretrain", "knn_top1")}
    if head["stage1_top1"] is not None and head["stage4_top1"] is not None:
        head["stage4_gain"] = head["stage4_top1"] - head["stage1_top1"]
    return head


def write_report(recipe: Recipe) -> Path:
    run = layout(recipe)
    figures = run.figures
    figures.mkdir(parents=True, exist_ok=True)
    found = results(recipe)
    stages = []
    for name, stage in PIPELINE.items():
        marker = read_marker(recipe, name)
        if marker is None and name not in found:
            continue
        stages.append({"stage": name, "summary": stage.summary, "state": (marker or {}).get("state", "no marker"),
                       "wall_s": (marker or {}).get("wall_s"), "results": found.get(name, {})})
    images = _figures(recipe, figures)
    report = {"recipe": recipe.name, "out": str(run.out), "written": time.strftime("%Y-%m-%d %H:%M:%S"),
              "headline": headline(found), "evaluated_with": _evaluated_with(found.get("evaluate", {})),
              "stages": stages, "figures": images}
    write_json(run.report_json, report, indent=1)
    run.report.write_text(_markdown(report))
    log.info(f"report: {run.report}")
    _log_report(recipe, report)
    return run.report


def _figures(recipe: Recipe, figures: Path) -> list[str]:
    run, made = layout(recipe), []
    trained = {"train-classifier": run.classifier(), "train-diffusion": run.diffusion,
               "retrain": run.classifier("retrain")}
    curves = {stage: _jsonl(path / "metrics.jsonl") for stage, path in trained.items()}
    if uses_pretrain(recipe):
        curves = {"pretrain": _jsonl(pretrain_dir(recipe) / "metrics.jsonl"), **curves}
    probes = {"backbone k-NN top-1 (validation)": ("knn_top1", _jsonl(pretrain_dir(recipe) / "knn.jsonl")
                                                  if uses_pretrain(recipe) else []),
              "in-training FID (unguided EMA samples)": ("fid", _jsonl(run.diffusion / "fid.jsonl"))}
    if any(curves.values()):
        _plot_losses(curves, probes, figures / "losses.png")
        made.append("report/losses.png")
    grids = sorted((run.diffusion / "samples").glob("step-*.png"))
    if grids:  # the last in-training grid: one row per class, EMA model
        shutil.copyfile(grids[-1], figures / "diffusion-grid.png")
        made.append("report/diffusion-grid.png")
    manifest, grid = run.samples / MANIFEST, figures / "samples.png"
    if manifest.is_file():
        if not grid.is_file() or grid.stat().st_mtime < manifest.stat().st_mtime:  # else: the same images
            from dpt_scale.shards.grid import sample_grid

            # one row per class where that fits on a page; ImageNet's 1,000 classes get a plain grid
            few = Manifest.load(run.samples).num_classes <= GRID_ROWS
            sample_grid(run.samples, grid, per_class=10 if few else None, n=64)
        made.append("report/samples.png")
    for stage in CLASSIFIER_STAGES:
        if (run.classifier(stage) / "confusion.png").is_file():
            made.append(f"{run.classifier(stage).name}/confusion.png")
    return made


def _plot_losses(curves: dict[str, list[dict]], probes: dict[str, tuple[str, list[dict]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(stage, "loss", rows) for stage, rows in curves.items() if rows]
    panels += [(title, key, rows) for title, (key, rows) in probes.items() if rows]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    for ax, (title, key, rows) in zip(axes[0], panels):
        ax.plot([r["step"] for r in rows], [r[key] for r in rows], marker="." if len(rows) < 30 else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _evaluated_with(generation: dict) -> str:
    """How the final generation figures were made: the evaluator (and its own top-1 on real images,
    the ceiling of a conditional accuracy) and the samples."""
    if not generation:
        return "-"
    ceiling = generation.get("evaluator_top1")
    how = generation.get("sampled_with") or {}
    return ", ".join([f"{generation.get('evaluator')} evaluator" + (f" ({100 * ceiling:.1f}% on real images)"
                                                                     if ceiling else ""),
                      f"{generation.get('samples')} samples"] +
                     ([f"{how.get('solver')} {how.get('steps')} steps, guidance {how.get('guidance')}"] if how else []))


def _headline_rows(head: dict) -> list[tuple[str, object]]:
    return [(k, v) for k, v in head.items() if v is not None or k in ("stage1_top1",)]


def _stage_rows(report: dict) -> list[list[str]]:
    rows = []
    for s in report["stages"]:
        wall = "-" if s["wall_s"] is None else f"{s['wall_s']:.0f} s"
        figures = ", ".join(f"{k} {_fmt(v)}" for k, v in s["results"].items()
                            if v is not None and not isinstance(v, dict))
        rows.append([s["stage"], s["summary"], s["state"], wall, figures or "-"])
    return rows


def _log_report(recipe: Recipe, report: dict) -> None:
    """The headline and stage tables to the W&B report run (engine/trackers.py), when the recipe has one."""
    from dpt_scale.engine.trackers import log_report

    head = report["headline"]
    log_report(recipe, layout(recipe).figures,
               tables={"report/headline": (["figure", "value"], [[HEADLINE[k], v] for k, v in _headline_rows(head)]),
                       "report/stages": (list(STAGE_COLUMNS), _stage_rows(report))},
               summary=head)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
    return "-" if value is None else str(value)


def _markdown(report: dict) -> str:
    head = report["headline"]
    lines = [f"# DPT run report: {report['recipe']}", "", f"Outputs under `{report['out']}`, written "
             f"{report['written']}.", "", "| | |", "|---|---|"]
    lines += [f"| {HEADLINE[k]} | {_fmt(v)} |" for k, v in _headline_rows(head)]
    if head.get("fid") is not None:
        lines += ["", f"Pseudo-image figures: {report['evaluated_with']}."]
    if "stage4_gain" in head:
        verdict = "beats" if head["stage4_gain"] > 0 else "does not beat"
        lines += ["", f"Stage 4 {verdict} stage 1 ({_fmt(head['stage4_top1'])} vs {_fmt(head['stage1_top1'])}) on this "
                  "one seed; `dpt-scale study` runs several, with controls, and gives the spread."]
    lines += ["", "## Stages", "", "| " + " | ".join(STAGE_COLUMNS) + " |", "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in _stage_rows(report)]
    lines += ["", "## Figures", ""] + [f"![{f}]({f})" for f in report["figures"]]
    return "\n".join(lines) + "\n"
