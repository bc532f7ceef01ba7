"""A study's results: <study>/study.json, study.md and study.png, read back from each arm's
report.json, so they can be remade at any time from whatever the arms hold.

Every figure is given per seed and as mean ± sample std over the seeds; the paired differences
(one per seed, same labelled images and seed on both sides) come with a 95% confidence interval
from Student's t, which at 3 seeds is wide: that width is the honest answer at that many seeds.
"""
from __future__ import annotations

import json
import math
import textwrap
import time
from pathlib import Path

from dpt_scale.recipe import Recipe
from dpt_scale.shards.manifest import write_json

# (name in study.json, arm, key of the arm's report headline, what it is)
FIGURES = [
    ("stage1_top1", "dpt", "stage1_top1", "stage 1 (the recipe's classifier)"),
    ("dpt_top1", "dpt", "stage4_top1", "DPT stage 4"),
    ("self_training_top1", "self_training", "stage4_top1", "self-training stage 4"),
    ("oracle_top1", "oracle", "stage4_top1", "stage 4 with stage 2 on true labels"),
    ("supervised_top1", "supervised", "stage1_top1", "supervised, labelled images only"),
    ("pseudo_label_agreement", "dpt", "pseudo_label_agreement", "pseudo-label agreement with true labels"),
    ("fid", "dpt", "fid", "FID of the pseudo images"),
    ("conditional_accuracy", "dpt", "conditional_accuracy", "conditional accuracy of the pseudo images"),
    ("recall", "dpt", "recall", "recall of the pseudo images"),
    ("spread_ratio", "dpt", "spread_ratio", "within-class spread, pseudo / real"),
    ("oracle_fid", "oracle", "fid", "FID, stage 2 on true labels"),
    ("oracle_conditional_accuracy", "oracle", "conditional_accuracy", "conditional accuracy, stage 2 on true labels"),
]
# paired differences: (name, minuend, subtrahend, what)
DIFFERENCES = [
    ("dpt_minus_stage1", "dpt_top1", "stage1_top1", "DPT stage 4 - stage 1"),
    ("self_training_minus_stage1", "self_training_top1", "stage1_top1", "self-training stage 4 - stage 1"),
    ("dpt_minus_self_training", "dpt_top1", "self_training_top1",
     "DPT - self-training (what the diffusion model adds)"),
    ("oracle_minus_dpt", "oracle_top1", "dpt_top1", "oracle - DPT (cost of stage-2 pseudo-labels)"),
    ("stage1_minus_supervised", "stage1_top1", "supervised_top1", "stage 1 - supervised"),
]


def _headline(out: Path) -> dict:
    try:
        report = json.loads((out / "report.json").read_text())
    except (OSError, ValueError):
        return {}
    head = dict(report.get("headline", {}))
    for stage in report.get("stages", []):  # figures the headline leaves out
        if stage["stage"] == "evaluate":
            head.setdefault("recall", stage["results"].get("recall"))
            head.setdefault("spread_ratio", stage["results"].get("spread_ratio"))
    return head


def t_quantile(n: int) -> float:
    """Student's t 0.975 quantile for n - 1 degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(0.975, n - 1))


def summarise(values: list[float | None]) -> dict:
    known = [v for v in values if v is not None]
    n = len(known)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "ci95": None}
    mean = sum(known) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in known) / (n - 1)) if n > 1 else None
    half = t_quantile(n) * std / math.sqrt(n) if std is not None else None
    return {"n": n, "mean": mean, "std": std, "ci95": [mean - half, mean + half] if half is not None else None}


def collect(seeds: list[int], recipes: dict[tuple[int, str], Recipe]) -> dict:
    arms = {name for _, name in recipes}
    per_seed = {}
    for seed in seeds:
        heads = {name: _headline(Path(recipes[seed, name].out)) for name in arms if (seed, name) in recipes}
        row = {name: heads.get(arm, {}).get(key) for name, arm, key, _ in FIGURES}
        for name, a, b, _ in DIFFERENCES:
            row[name] = row[a] - row[b] if row[a] is not None and row[b] is not None else None
        per_seed[seed] = row
    names = [f[0] for f in FIGURES] + [d[0] for d in DIFFERENCES]
    summary = {name: summarise([per_seed[s][name] for s in seeds]) for name in names}
    return {"per_seed": per_seed, "summary": summary}


def write_study(root: Path, recipe: Recipe, seeds: list[int], arms: list, recipes: dict) -> Path:
    found = collect(seeds, recipes)
    study = {"recipe": recipe.name, "written": time.strftime("%Y-%m-%d %H:%M:%S"), "seeds": seeds,
             "arms": {arm.name: arm.what for arm in arms},
             "runs": {f"{seed}/{name}": r.out for (seed, name), r in recipes.items()}, **found}
    write_json(root / "study.json", study, indent=1)
    _plot(found, seeds, root / "study.png")
    (root / "study.md").write_text(_markdown(study))
    return root / "study.md"


def _points(value) -> str:
    return "-" if value is None else f"{100 * value:+.2f}"


def _in_percent(name: str) -> bool:
    return name.endswith("top1") or name.endswith("agreement")


def _cell(name: str, value) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.2f}" if _in_percent(name) else f"{value:.1f}" if name.endswith("fid") else f"{value:.3f}"


def _mean_std(name: str, s: dict) -> str:
    if s["mean"] is None:
        return "-"
    if s["std"] is None:
        return _cell(name, s["mean"])
    return f"{_cell(name, s['mean'])} ± {_cell(name, s['std'])}"


def _markdown(study: dict) -> str:
    seeds, summary, per_seed = study["seeds"], study["summary"], study["per_seed"]
    present = [f for f in FIGURES if summary[f[0]]["n"]]
    lines = [f"# Study: {study['recipe']}", "", f"Seeds {', '.join(map(str, seeds))} (each sets the run seed and the "
             f"labelled-subset seed); written {study['written']}. Top-1 and agreement in %.", "", "Arms:", ""]
    lines += [f"- `{name}`: {what}" for name, what in study["arms"].items()]
    lines += ["", "## Per seed", "", "| figure | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std |",
              "|---|" + "---:|" * (len(seeds) + 1)]
    for name, _, _, what in present:
        cells = [_cell(name, per_seed[s][name]) for s in seeds]
        lines.append(f"| {what} | " + " | ".join(cells) + f" | {_mean_std(name, summary[name])} |")
    lines += ["", "## Paired differences (points of top-1)", "", "| difference | " +
              " | ".join(f"seed {s}" for s in seeds) + " | mean ± std | 95% CI | reading |", "|---|" + "---:|" *
              (len(seeds) + 2) + "---|"]
    for name, _, _, what in DIFFERENCES:
        s = summary[name]
        if not s["n"]:
            continue
        cells = [_points(per_seed[seed][name]) for seed in seeds]
        ci = "-" if s["ci95"] is None else f"[{100 * s['ci95'][0]:+.2f}, {100 * s['ci95'][1]:+.2f}]"
        std = "" if s["std"] is None else f" ± {100 * s['std']:.2f}"
        lines.append(f"| {what} | " + " | ".join(cells) + f" | {100 * s['mean']:+.2f}{std} | {ci} | {_reading(s)} |")
    lines += ["", "![study](study.png)", ""]
    return "\n".join(lines)


def _reading(s: dict) -> str:
    """What the interval says, mechanically, so that no table oversells its seeds."""
    if s["ci95"] is None:
        return f"{s['n']} seed: no spread, no finding"
    low, high = s["ci95"]
    if low > 0:
        return "above zero at 95%"
    if high < 0:
        return "below zero at 95%"
    return "not distinguishable from zero"


def _tick(label: str) -> str:
    """Axis labels wrapped narrow enough that neighbours do not overlap."""
    return textwrap.fill(label, 16)


def _plot(found: dict, seeds: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_seed, summary = found["per_seed"], found["summary"]
    bars = [(n, what) for n, _, _, what in FIGURES if n.endswith("top1") and summary[n]["n"]]
    diffs = [(n, what) for n, _, _, what in DIFFERENCES if summary[n]["n"]]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    for i, (name, _) in enumerate(bars):
        ax.scatter([i] * len(seeds), _percent([per_seed[s][name] for s in seeds]), color="C0", zorder=3)
        ax.errorbar([i + 0.15], [100 * summary[name]["mean"]], yerr=[100 * (summary[name]["std"] or 0)], fmt="s",
                    color="C3", capsize=4)
    for s in seeds:  # each seed's arms joined: the comparison is paired
        ax.plot(range(len(bars)), _percent([per_seed[s][n] for n, _ in bars]), color="0.7", lw=0.8, zorder=1)
    ax.set_xticks(range(len(bars)), [_tick(w.split(" (")[0]) for _, w in bars], fontsize=7)
    ax.set_ylabel("top-1 (%)")
    ax.set_title("per seed (dots) and mean ± std")
    ax.grid(alpha=0.3)
    ax = axes[1]
    for i, (name, _) in enumerate(diffs):
        ax.scatter([i] * len(seeds), _percent([per_seed[s][name] for s in seeds]), color="C0", zorder=3)
        ci = summary[name]["ci95"]
        if ci is not None:
            ax.errorbar([i + 0.15], [100 * summary[name]["mean"]], yerr=[[100 * (summary[name]["mean"] - ci[0])],
                                                                         [100 * (ci[1] - summary[name]["mean"])]],
                        fmt="s", color="C3", capsize=4)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(range(len(diffs)), [_tick(w.split(" (")[0]) for _, w in diffs], fontsize=7)
    ax.set_ylabel("points of top-1")
    ax.set_title("paired differences: seeds and mean, 95% CI")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _percent(values: list) -> list[float]:
    return [100 * v if v is not None else float("nan") for v in values]
