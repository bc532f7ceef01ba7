"""Experiment trackers (engine/trackers.py) on a tiny U-ViT: an offline W&B run and the TensorBoard
events hold what the training stage logged; a stage killed after a checkpoint and run again goes on
in the same W&B run and shows no TensorBoard step twice; the report is a W&B run of its own; a
tracker that the recipe asks for but is not installed is one line before any work. No network:
W&B runs offline, its files under tmp_path."""
import io
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from PIL import Image

from dpt_scale.cli import main
from dpt_scale.recipe import load_recipe
from helpers import make_shard_set, run_cli, torchrun_command

wandb_pb = pytest.importorskip("wandb.proto.wandb_internal_pb2")
event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


@pytest.fixture(autouse=True)
def offline_wandb(tmp_path, monkeypatch):
    """W&B's own settings, cache and staging folders under tmp_path; its run files go to the stages'."""
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / name.lower()))
    for name in ("WANDB_DIR", "WANDB_MODE", "WANDB_API_KEY", "WANDB_PROJECT", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(name, raising=False)


def recipe(tmp_path, **train):
    """A tiny U-ViT on 200 8x8 images, logging every step to TensorBoard and an offline W&B run."""
    make_shard_set(tmp_path / "data" / "train", [50, 60, 40, 50])
    body = {"name": "trackers", "out": str(tmp_path / "run"), "seed": 0,
            "data": {"root": str(tmp_path / "data"), "loader": {"workers": 0, "streams": 2}},
            "diffusion": {"model": {"size": "tiny", "patch_size": 2}, "labels": "ground_truth",
                          "train": {"steps": 8, "micro_batch": 8, "checkpoint_every": 4, "log_every": 1,
                                    "sample_every": 0, **train}},
            "logging": {"tensorboard": True, "wandb": {"project": "x", "mode": "offline"}}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def losses(folder: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows}


# ---------------------------------------------------------------- reading what the trackers wrote

def wandb_records(run_dir: Path):
    """The records of an offline W&B run's .wandb file: W&B's framing of a LevelDB log (7-byte file
    header; 32 KiB blocks of chunks, each `crc32 | length | type`) around protobuf Records."""
    data = next(run_dir.glob("run-*.wandb")).read_bytes()
    assert data[:4] == b":W&B"
    position, block, pending = 7, 32768, b""
    while position + 7 <= len(data):
        if block - position % block < 7:  # too little room for a chunk header: the block is padded
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def offline_run(run_dir: Path) -> dict:
    """{"id", "job_type", "group", "config", "history": {step: row}} of an offline W&B run."""
    run = {"config": {}, "history": {}}
    for record in wandb_records(run_dir):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.update(id=record.run.run_id, job_type=record.run.job_type, group=record.run.run_group,
                       project=record.run.project)
            updates = record.run.config.update
        elif kind == "config":
            updates = record.config.update
        elif kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            run["history"][row["_step"]] = row
            continue
        else:
            continue
        run["config"].update({item.key: json.loads(item.value_json) for item in updates if item.key != "_wandb"})
    return run


def offline_runs(folder: Path) -> list[Path]:
    """A stage's offline W&B run folders, oldest first (offline-run-<time>-<id>[-n])."""
    return sorted((folder / "wandb").glob("offline-run-*"))


def run_ids(folder: Path) -> list[str]:
    return [next(p.glob("run-*.wandb")).stem.removeprefix("run-") for p in offline_runs(folder)]


def tensorboard(path: Path):
    """The events of a folder of event files, as TensorBoard shows them, or of one file."""
    events = event_accumulator.EventAccumulator(str(path), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


# ---------------------------------------------------------------- tests

def test_a_killed_stage_resumes_its_wandb_run_and_tensorboard_shows_each_step_once(tmp_path):
    """Two ranks (only rank 0 logs), SIGKILLed after the checkpoint at step 10, then run again."""
    path = recipe(tmp_path, steps=30, checkpoint_every=10, sample_every=15)
    stage = tmp_path / "run" / "diffusion"
    command = torchrun_command("-m", "dpt_scale", "-q", "train-diffusion", path)
    proc = subprocess.Popen(command, env=dict(os.environ, PYTHONUNBUFFERED="1"), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (stage / "metrics.jsonl").is_file() and max(losses(stage), default=0) >= 13:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read()[-2000:]
    # the launcher, both ranks and W&B's service process, as a lost node would lose them (torchrun
    # starts each rank in a session of its own: a signal to the launcher's group does not reach them)
    for process in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
        process.send_signal(signal.SIGKILL)
    proc.wait()
    run_id = (stage / "wandb-run-id").read_text().strip()
    assert run_ids(stage) == [run_id]

    result = subprocess.run(torchrun_command("-m", "dpt_scale", "-q", "train-diffusion", path),
                            env=dict(os.environ, PYTHONUNBUFFERED="1"), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = losses(stage)
    assert sorted(expected) == list(range(1, 31))

    # one W&B run: the id kept in the stage's folder, one offline folder per launch (rank 0 only)
    assert run_ids(stage) == [run_id, run_id]
    resumed = offline_run(offline_runs(stage)[-1])
    assert (resumed["id"], resumed["job_type"], resumed["group"], resumed["project"]) == \
        (run_id, "train-diffusion", "trackers", "x")
    assert resumed["config"] == yaml.safe_load((stage / "recipe.yaml").read_text())  # the resolved recipe
    assert resumed["config"]["logging"]["wandb"] == {"project": "x", "mode": "offline", "entity": None, "group": None}
    # the whole curve: the steps up to the checkpoint from metrics.jsonl, the rest as they were trained
    history = resumed["history"]
    assert {step: row["loss"] for step, row in history.items() if "loss" in row} == expected
    assert all(history[step]["images_per_s"] > 0 for step in expected)
    grids = {step: row["samples/path"] for step, row in history.items() if "samples/path" in row}
    assert sorted(grids) == [15, 30]
    assert all((offline_runs(stage)[-1] / "files" / grid).is_file() for grid in grids.values())

    # TensorBoard: one event file per launch, the first cut off mid-run, the second from the
    # checkpoint on; read together, every step once, with the same losses
    files = sorted((stage / "tensorboard").glob("events.out.tfevents.*"))
    steps = [[e.step for e in tensorboard(f).Scalars("loss")] for f in files]
    assert len(steps) == 2 and 10 <= steps[0][-1] < 30 and steps[1] == list(range(11, 31))
    events = tensorboard(stage / "tensorboard")
    scalars = events.Scalars("loss")
    assert [e.step for e in scalars] == list(range(1, 31))
    assert [e.value for e in scalars] == pytest.approx([expected[s] for s in range(1, 31)], rel=1e-6)
    assert [e.step for e in events.Images("samples")] == [15, 30]


def test_in_training_fid_reaches_both_trackers(tmp_path):
    """The diffusion probe's FID and conditional accuracy, beside the losses, on embedded MNIST digits."""
    from dpt_scale.data.sources import SOURCES
    from dpt_scale.recipe.schema import Data
    from dpt_scale.shards.writer import ShardSetWriter

    splits = SOURCES["mnist"](Data()).splits
    for split in ("train", "val"):
        with ShardSetWriter(tmp_path / "mnist" / split, classes=[str(c) for c in range(10)], max_samples=100,
                            meta={"source": "mnist"}) as writer:  # the provenance `evaluate.evaluator: auto` reads
            for key, image, label in splits[split][:200]:
                buffer = io.BytesIO()
                Image.fromarray(image).save(buffer, format="PNG")
                writer.write({"__key__": key, "png": buffer.getvalue(), "cls": label}, (1, *image.shape))
    path = recipe(tmp_path, steps=2, sample_every=2)
    result = run_cli("-q", "train-diffusion", str(path), "--set", f"data.root={tmp_path / 'mnist'}",
                     "--set", "diffusion.model.patch_size=4", "--set", "diffusion.fid_samples=20",
                     "--set", "evaluate.kid_subset_size=10", "--set", "classifier.pseudo_label.workers=0")
    assert result.returncode == 0, result.stderr[-3000:]
    stage = tmp_path / "run" / "diffusion"
    fid = json.loads((stage / "fid.jsonl").read_text().splitlines()[-1])
    history = offline_run(offline_runs(stage)[-1])["history"]
    assert history[2]["in_training/fid"] == pytest.approx(fid["fid"])
    assert history[2]["in_training/conditional_accuracy"] == pytest.approx(fid["conditional_accuracy"])
    scalars = tensorboard(stage / "tensorboard").Scalars("in_training/fid")
    assert [(e.step, e.value) for e in scalars] == [(2, pytest.approx(fid["fid"]))]


def test_the_report_is_a_wandb_run_of_its_own_that_a_new_report_continues(tmp_path):
    from dpt_scale.pipeline.report import write_report

    run = tmp_path / "run"
    for folder, top1 in (("classifier", 0.9), ("retrain", 0.95)):
        (run / folder).mkdir(parents=True)
        (run / folder / "eval.json").write_text(json.dumps({"top1": top1, "top5": 1.0}))
    cfg = load_recipe(None, [f"out={run}", "name=trackers", "logging.wandb.project=x"])
    write_report(cfg)
    write_report(cfg)  # e.g. `dpt-scale run` again after a later stage ran
    runs = offline_runs(run / "report")
    run_id = (run / "report" / "wandb-run-id").read_text().strip()
    assert run_ids(run / "report") == [run_id, run_id]
    report = offline_run(runs[-1])
    assert report["job_type"] == "report" and report["group"] == "trackers"
    (row,) = report["history"].values()
    headline = json.loads((runs[-1] / "files" / row["report/headline/path"]).read_text())
    shown = dict(map(tuple, headline["data"]))
    assert shown["stage-1 top-1"] == 0.9 and shown["stage-4 top-1"] == 0.95
    assert shown["stage 4 - stage 1"] == pytest.approx(0.05)
    stages = json.loads((runs[-1] / "files" / row["report/stages/path"]).read_text())
    assert stages["columns"] == ["stage", "what", "state", "wall time", "results"]
    assert ["retrain", "stage 4", "no marker", "-", "top1 0.9500, top5 1.0000"] in stages["data"]


@pytest.mark.parametrize("module, key, extra", [("wandb", "logging.wandb.project=x", ".[wandb]"),
                                                ("tensorboard", "logging.tensorboard=true", ".[tensorboard]")])
@pytest.mark.parametrize("command", ["train-diffusion", "run"])
def test_a_tracker_asked_for_but_not_installed_is_one_line_before_any_work(tmp_path, monkeypatch, capsys,
                                                                          module, key, extra, command):
    monkeypatch.setitem(sys.modules, module, None)  # `import MODULE` now fails, as where it is not installed
    out = tmp_path / "run"
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"out": str(out), "data": {"root": str(tmp_path / "data")}}))
    assert main(["-q", command, str(path), "--set", key]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: {key.split('=')[0]} ") and f'pip install -e "{extra}"' in line
    assert not out.exists()


def test_tensorboard_auto_without_the_package_leaves_just_metrics_jsonl(tmp_path, monkeypatch):
    from dpt_scale.engine.metrics import Metrics

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with Metrics(tmp_path, 2, 0, enabled=True, recipe=load_recipe(None)) as metrics:
        metrics.log(1, loss=0.5)
    assert losses(tmp_path) == {1: 0.5} and not (tmp_path / "tensorboard").exists()


def test_logging_keys_never_make_a_stage_run_again():
    from dpt_scale.pipeline.stages import STAGES, parts_of

    plain = load_recipe(None)
    tracked = load_recipe(None, ["logging.tensorboard=false", "logging.wandb.project=x", "logging.wandb.mode=online",
                                 "logging.wandb.group=g", "logging.wandb.entity=e"])
    for stage in STAGES.values():
        assert parts_of(tracked, stage) == parts_of(plain, stage), stage.name
