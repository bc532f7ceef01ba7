"""`dpt-scale run`: the smoke pipeline end to end, skipping, resuming after a kill, and exactly the
downstream stages redone after a recipe change."""
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

from dpt_scale.pipeline.markers import read_marker
from dpt_scale.pipeline.run import plan
from dpt_scale.pipeline.stages import STAGES, parts_of
from dpt_scale.recipe import load_recipe
from dpt_scale.shards.manifest import Manifest
from helpers import REPO, assert_one_line_error, run_cli

SMOKE = str(REPO / "recipes" / "mnist-smoke.yaml")
ALL = ["import", "subset", "train-classifier", "pseudo-label", "train-diffusion", "sample", "retrain", "evaluate"]


def smoke(out: Path, *overrides: str):
    return load_recipe(SMOKE, [f"out={out}", *overrides])


def actions(out: Path, *overrides: str, **flags) -> dict[str, str]:
    return {step.stage.name: step.action for step in plan(smoke(out, *overrides), **flags)}


def redone(out: Path, *overrides: str) -> set[str]:
    return {name for name, action in actions(out, *overrides).items() if action != "skip"}


def ids(out: Path) -> dict[str, str]:
    recipe = smoke(out)
    return {name: read_marker(recipe, name)["id"] for name in ALL}


def sample_checksums(out: Path) -> list[str]:
    return [s.sha256 for s in Manifest.load(out / "samples").shards]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """One uninterrupted smoke run (about a minute on two cores)."""
    out = tmp_path_factory.mktemp("pipeline") / "run"
    result = run_cli("-q", "run", SMOKE, "--set", f"out={out}", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("report.md")
    return out


def copy_of(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run, out, symlinks=True)
    return out


def test_the_smoke_pipeline_runs_every_stage_and_writes_its_report(finished_run):
    report = json.loads((finished_run / "report.json").read_text())
    assert [s["stage"] for s in report["stages"]] == ALL
    assert all(s["state"] == "done" and s["wall_s"] is not None for s in report["stages"])
    head = report["headline"]
    for key in ("stage1_top1", "stage4_top1", "fid", "conditional_accuracy", "pseudo_label_agreement"):
        assert isinstance(head[key], float), key
    assert 0.1 < head["stage1_top1"] <= 1 and head["fid"] > 0  # trained, and measured: not placeholders
    assert head["stage4_gain"] == pytest.approx(head["stage4_top1"] - head["stage1_top1"])
    for figure in report["figures"]:
        assert (finished_run / figure).stat().st_size > 1000, figure
    assert {"report/losses.png", "report/samples.png", "report/diffusion-grid.png"} <= set(report["figures"])
    markdown = (finished_run / "report.md").read_text()
    assert "| train-diffusion | stage 2 | done |" in markdown and "stage-4 top-1" in markdown
    assert Manifest.load(finished_run / "samples").num_samples == 100  # 10 per class
    assert run_cli("-q", "shards", "verify", str(finished_run / "samples")).returncode == 0


def test_a_rerun_skips_every_finished_stage(finished_run):
    before = ids(finished_run)
    weights = finished_run / "classifier" / "weights.pt"
    mtime = weights.stat().st_mtime_ns
    result = run_cli("run", SMOKE, "--set", f"out={finished_run}")
    assert result.returncode == 0, result.stderr[-2000:]
    for name in ALL:
        assert f"  {name:<16}  skip" in result.stdout, result.stdout
    assert ids(finished_run) == before and weights.stat().st_mtime_ns == mtime


def test_a_recipe_change_redoes_exactly_the_stages_downstream_of_it(finished_run):
    assert redone(finished_run) == set()
    assert redone(finished_run, "data.loader.workers=0", "diffusion.train.log_every=7") == set()  # speed only
    assert redone(finished_run, "evaluate.kid_subset_size=50") == {"evaluate"}
    assert redone(finished_run, "sample.guidance=3") == {"sample", "retrain", "evaluate"}
    assert redone(finished_run, "diffusion.train.lr=0.002") == {"train-diffusion", "sample", "retrain", "evaluate"}
    assert redone(finished_run, "classifier.pseudo_label.threshold=0.5") == {
        "pseudo-label", "train-diffusion", "sample", "retrain", "evaluate"}
    assert redone(finished_run, "classifier.retrain.pseudo_fraction=[0.4]") == {"retrain", "evaluate"}
    assert redone(finished_run, "data.labelled.seed=1") == set(ALL) - {"import"}
    # the oracle run does not read the pseudo-labels, so it does not wait for them
    assert actions(finished_run, "diffusion.labels=ground_truth")["pseudo-label"] == "skip"


def test_a_changed_key_reruns_those_stages_and_keeps_the_others(finished_run, tmp_path):
    out = copy_of(finished_run, tmp_path)
    before, checksums = ids(out), sample_checksums(out)
    weights = out / "diffusion" / "weights.pt"
    mtime = weights.stat().st_mtime_ns
    result = run_cli("-q", "run", SMOKE, "--set", f"out={out}", "--set", "sample.guidance=3")
    assert result.returncode == 0, result.stderr[-2000:]
    after = ids(out)
    for name in ALL:
        assert (after[name] == before[name]) == (name not in ("sample", "retrain", "evaluate")), name
    assert weights.stat().st_mtime_ns == mtime
    assert sample_checksums(out) != checksums  # the new guidance made new images
    assert redone(out, "sample.guidance=3") == set()


def test_a_run_killed_mid_stage_resumes_and_ends_as_the_uninterrupted_one(finished_run, tmp_path):
    out = tmp_path / "killed"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    process = subprocess.Popen([sys.executable, "-m", "dpt_scale", "-q", "run", SMOKE, "--set", f"out={out}"],
                               cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    checkpoint = out / "diffusion" / "checkpoints" / "latest"
    deadline = time.time() + 600
    while not checkpoint.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)  # in stage 2, after its first checkpoint
    process.wait()
    assert checkpoint.exists(), "the run ended before stage 2 wrote a checkpoint"
    assert actions(out) == {**{n: "skip" for n in ALL[:4]}, "train-diffusion": "resume",
                            **{n: "run" for n in ALL[5:]}}
    result = run_cli("-q", "run", SMOKE, "--set", f"out={out}", timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    assert sample_checksums(out) == sample_checksums(finished_run)  # same pseudo images, byte for byte
    ours, theirs = (json.loads((o / "report.json").read_text())["headline"] for o in (out, finished_run))
    assert ours == theirs


def test_from_and_only_rerun_the_named_stages(finished_run, tmp_path):
    assert actions(finished_run, start="sample") == {**{n: "leave" for n in ALL[:5]},
                                                     **{n: "redo" for n in ALL[5:]}}
    assert actions(finished_run, only="pseudo-label") == {**{n: "leave" for n in ALL},
                                                          "pseudo-label": "redo"}
    out = copy_of(finished_run, tmp_path)
    before = ids(out)
    result = run_cli("-q", "run", SMOKE, "--set", f"out={out}", "--only", "evaluate")
    assert result.returncode == 0, result.stderr[-2000:]
    after = ids(out)
    assert after["evaluate"] != before["evaluate"] and {**after, "evaluate": None} == {**before, "evaluate": None}
    assert redone(out) == set()  # nothing reads the evaluation


def test_stages_that_cannot_run_are_one_line_errors(tmp_path):
    empty = tmp_path / "empty"
    assert_one_line_error(run_cli("run", SMOKE, "--set", f"out={empty}", "--only", "sample"),
                          "sample reads the outputs of train-diffusion", "has not finished")
    assert_one_line_error(run_cli("run", SMOKE, "--set", f"out={empty}", "--from", "encode"),
                          "--from encode", "does not apply to this recipe")
    assert not (empty / "stages").exists()


def test_stage_hashes_leave_out_keys_that_only_change_speed():
    parts = parts_of(load_recipe(SMOKE, []), STAGES["train-classifier"])
    assert {"seed", "classifier.train.lr", "data.loader.streams", "classifier.model.name"} <= set(parts)
    assert not {"data.loader.workers", "classifier.train.log_every", "classifier.train.checkpoint_every"} & set(parts)
    assert not any(k.startswith(("classifier.retrain", "classifier.pseudo_label", "diffusion")) for k in parts)


def test_bad_flags_of_every_one_shot_command_leave_a_finished_run_byte_identical(finished_run, capsys):
    import hashlib

    from test_cli_flags import BAD, CASES, refused

    def snapshot() -> dict[str, str]:
        return {str(p.relative_to(finished_run)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(finished_run.rglob("*")) if p.is_file()}

    before = snapshot()
    for command, flag in CASES:
        for value in BAD:
            refused(command, flag, value, finished_run, finished_run / "samples", capsys)
    assert snapshot() == before
    assert not finished_run.with_name(finished_run.name + "-study").exists()
