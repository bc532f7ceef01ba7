"""The few-label linear-probe path end to end on the embedded MNIST (recipes/mnist-probe-smoke.yaml):
stage 0 in the pipeline and exactly what its settings reach, stage 4 with exactly K pseudo images
per class, the self-training control, and `dpt-scale study` over two seeds, killed and resumed."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from dpt_scale.pipeline.run import plan
from dpt_scale.recipe import load_recipe
from dpt_scale.shards.manifest import Manifest
from dpt_scale.shards.tar import iter_samples
from helpers import REPO, assert_one_line_error, run_cli

SMOKE = str(REPO / "recipes" / "mnist-probe-smoke.yaml")
AFTER_PRETRAIN = ["train-classifier", "pseudo-label", "train-diffusion", "sample", "retrain", "evaluate"]


def actions(out: Path, *overrides: str) -> dict[str, str]:
    return {s.stage.name: s.action for s in plan(load_recipe(SMOKE, [f"out={out}", *overrides]))}


def classes_of(shard_set: Path) -> list[int]:
    manifest = Manifest.load(shard_set)
    return [int(s["cls"]) for e in manifest.shards for s in iter_samples(shard_set / e.name, fields=frozenset({"cls"}))]


@pytest.fixture(scope="module")
def probe_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("probe") / "run"
    result = run_cli("-q", "run", SMOKE, "--set", f"out={out}", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_the_pipeline_pretrains_first_and_a_pretrain_key_redoes_what_reads_the_backbone(probe_run):
    assert list(actions(probe_run)) == ["import", "subset", "pretrain", *AFTER_PRETRAIN]
    assert set(actions(probe_run).values()) == {"skip"}
    changed = actions(probe_run, "pretrain.simclr.temperature=0.3")
    assert changed == {"import": "skip", "subset": "skip", "pretrain": "redo", **{n: "redo" for n in AFTER_PRETRAIN}}
    assert actions(probe_run, "sample.guidance=3")["pretrain"] == "skip"
    assert set(actions(probe_run, "pretrain.knn.every=5").values()) == {"skip"}  # evaluation only
    report = json.loads((probe_run / "report.json").read_text())
    assert 0 < report["headline"]["backbone_knn_top1"] <= 1
    assert "mnist evaluator" in report["evaluated_with"] and "guidance 6.0" in report["evaluated_with"]
    assert "report/losses.png" in report["figures"]
    diffusion = next(s for s in report["stages"] if s["stage"] == "train-diffusion")["results"]
    assert "in_training_fid (100 unguided)" in diffusion  # not to be read as the final FID


def test_stage4_takes_exactly_k_pseudo_images_per_class(probe_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(probe_run, out, symlinks=True)
    assert {n for n, a in actions(out, "classifier.retrain.per_class=4").items() if a != "skip"} == \
        {"retrain", "evaluate"}
    result = run_cli("-q", "run", SMOKE, "--set", f"out={out}", "--set", "classifier.retrain.per_class=4",
                     "--until", "retrain")
    assert result.returncode == 0, result.stderr[-2000:]
    taken = classes_of(out / "retrain" / "pseudo" / "set0")
    assert sorted(taken) == sorted(list(range(10)) * 4)
    features = Manifest.load(out / "retrain" / "features" / "pseudo0")
    assert features.num_samples == 40 and features.class_histogram == [4] * 10
    # more than the set holds is one line
    too_many = run_cli("-q", "retrain", SMOKE, "--set", f"out={out}", "--set", "classifier.retrain.per_class=11")
    assert_one_line_error(too_many, "fewer than classifier.retrain.per_class 11")


def test_the_self_training_control_takes_the_most_confident_real_images(probe_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(probe_run, out, symlinks=True)
    sets = ["--set", f"out={out}", "--set", "classifier.retrain.source=real", "--set", "classifier.retrain.per_class=5"]
    assert [s.stage.name for s in plan(load_recipe(SMOKE, sets[1::2]))] == \
        ["import", "subset", "pretrain", "train-classifier", "pseudo-label", "retrain", "evaluate"]
    result = run_cli("-q", "run", SMOKE, *sets)
    assert result.returncode == 0, result.stderr[-2000:]
    chosen = out / "retrain" / "self_training"
    labelled = set((out / "labelled.txt").read_text().split())
    side = {}
    for path in sorted((out / "pseudo_labels").glob("*.labels.json")):
        data = json.loads(path.read_text())
        side.update({k: (label, conf) for k, label, conf in zip(data["keys"], data["labels"], data["confidence"])})
    picked = {s["__key__"]: int(s["cls"]) for e in Manifest.load(chosen).shards
              for s in iter_samples(chosen / e.name, fields=frozenset({"cls"}))}
    assert len(picked) == 50 and not picked.keys() & labelled
    for key, label in picked.items():
        assert side[key][0] == label  # labelled with its pseudo-label
        # nothing left out of its pseudo-class was more confident
        assert all(conf <= side[key][1] or k in picked or k in labelled
                   for k, (lab, conf) in side.items() if lab == label)
    assert json.loads((out / "report.json").read_text())["headline"]["stage4_top1"] is not None


def test_a_study_runs_each_arm_per_seed_shares_what_it_can_and_resumes_after_a_kill(tmp_path):
    root = tmp_path / "study"
    args = [sys.executable, "-m", "dpt_scale", "-q", "study", SMOKE, "--seeds", "0,1", "--arms",
            "dpt,self_training,supervised", "--out", str(root)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    process = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    marker = root / "seed-1" / "dpt" / "stages" / "train-diffusion.json"
    deadline = time.time() + 900
    while not marker.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)  # in seed 1's stage 2
    process.wait()
    assert marker.exists(), "the study ended before seed 1 reached stage 2"
    result = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [p.name for p in root.glob("pretrain-*")] and len(list(root.glob("pretrain-*"))) == 1  # one backbone
    assert (root / "data" / "train" / "manifest.json").is_file() and not (root / "seed-0" / "dpt" / "data").exists()
    subsets = {s: (root / f"seed-{s}" / "dpt" / "labelled.txt").read_text() for s in (0, 1)}
    assert subsets[0] != subsets[1]  # the seed draws the labelled images too
    study = json.loads((root / "study.json").read_text())
    assert study["seeds"] == [0, 1] and set(study["arms"]) == {"dpt", "self_training", "supervised"}
    for seed in ("0", "1"):
        row = study["per_seed"][seed]
        assert row["dpt_minus_stage1"] == pytest.approx(row["dpt_top1"] - row["stage1_top1"])
        assert row["self_training_top1"] is not None and row["supervised_top1"] is not None
    summary = study["summary"]["dpt_minus_stage1"]
    assert summary["n"] == 2 and summary["ci95"][0] <= summary["mean"] <= summary["ci95"][1]
    assert (root / "study.png").stat().st_size > 5000 and "| DPT stage 4 |" in (root / "study.md").read_text()
    # everything is done: a rerun changes nothing
    again = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and json.loads((root / "study.json").read_text())["per_seed"] == study["per_seed"]


def test_bad_study_input_is_one_line(tmp_path):
    out = ["--out", str(tmp_path / "s")]
    for seeds, fragment in [("", "whole numbers"), ("0,x", "whole numbers"), ("1,1", "twice"), ("-1", "0 or more"),
                            ("99999999999999999999", "below 2**63")]:
        assert_one_line_error(run_cli("study", SMOKE, "--seeds", seeds, *out), "--seeds", fragment)
    assert_one_line_error(run_cli("study", SMOKE, "--arms", "dpt,ablation", *out), "unknown arm 'ablation'")
    other = tmp_path / "other"
    other.mkdir()
    (other / "recipe.yaml").write_text(yaml.safe_dump({"name": "someone-else"}))
    assert_one_line_error(run_cli("study", SMOKE, "--out", str(other)), "another recipe", "someone-else")
    assert not (tmp_path / "s").exists()
