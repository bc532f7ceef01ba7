"""Stage 0 on small real shard sets: no label is read (every label permuted, the same backbone to
the bit), a SIGKILLed run resumes to the uninterrupted losses, every method trains a backbone that
stage 1 loads, the pipeline redoes exactly what a pretrain setting reaches, and bad settings are
one line."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from dpt_scale.shards.manifest import Manifest
from dpt_scale.shards.tar import iter_samples
from dpt_scale.shards.writer import ShardSetWriter
from helpers import REPO, assert_one_line_error, make_shard_set, run_cli

CLASSES = 4
VIT = {"name": "test_vit", "kwargs": {"patch_size": 4}}


def write_recipe(tmp_path, name="r.yaml", method="simclr", model=None, **pretrain):
    data = tmp_path / "data"
    if not (data / "train").exists():
        make_shard_set(data / "train", [40, 40, 40, 40, 40, 40], num_classes=CLASSES, size=16)
        make_shard_set(data / "val", [30, 30], num_classes=CLASSES, size=16)
    train = {"steps": 6, "micro_batch": 16, "checkpoint_every": 3, "log_every": 1, "zero_stage": 0, "lr": 1e-3}
    body = {"name": "pretrain-test", "out": str(tmp_path / "run"), "seed": 0,
            "data": {"root": str(data), "labelled": {"per_class": 2}, "loader": {"workers": 0, "streams": 2}},
            "pretrain": {"method": method, "knn": {"every": 3, "k": 5}, "train": {**train, **pretrain.pop("train", {})},
                         "msn": {"prototypes": 16, "projection": [32, 16]}, "simclr": {"projection": [32, 16]},
                         **pretrain},
            "classifier": {"method": "linear_probe",
                           "model": {"pretrained": "pretrain", **(model or {"name": "test_resnet"})},
                           "pseudo_label": {"batch": 16, "workers": 0},
                           "train": {"steps": 4, "micro_batch": 4, "checkpoint_every": 4, "log_every": 1,
                                     "zero_stage": 0, "lr": 0.05, "weight_decay": 0.0}}}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(body))
    return path


def cli(*args, check=True, timeout=300):
    result = run_cli("-q", *map(str, args), timeout=timeout)
    if check:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def backbone(run):
    return torch.load(run / "pretrain" / "backbone.pt", weights_only=True)


def losses(run):
    return [json.loads(line)["loss"] for line in (run / "pretrain" / "metrics.jsonl").read_text().splitlines()]


def relabel(src, dst, change):
    manifest = Manifest.load(src)
    with ShardSetWriter(dst, classes=manifest.classes, prefix="part", max_samples=10**9) as writer:
        for entry in manifest.shards:
            for sample in iter_samples(src / entry.name):
                writer.write({"__key__": sample["__key__"], "png": sample["png"],
                              "cls": change(sample["__key__"], int(sample["cls"]))}, (1, 16, 16))
            writer.end_shard()


def test_pretraining_reads_no_label(tmp_path):
    path = write_recipe(tmp_path)
    cli("pretrain", path)
    reference = backbone(tmp_path / "run")
    assert reference["pretrain"]["model"] == "test_resnet" and reference["pretrain"]["method"] == "simclr"
    # Every training label moves to another class: the backbone must not change by a single bit.
    relabel(tmp_path / "data" / "train", tmp_path / "permuted" / "train", lambda k, c: (c + 1) % CLASSES)
    (tmp_path / "permuted" / "val").symlink_to(tmp_path / "data" / "val")
    cli("pretrain", path, "--set", f"data.root={tmp_path / 'permuted'}", "--set", f"out={tmp_path / 'other'}")
    permuted = backbone(tmp_path / "other")
    assert permuted["state_dict"].keys() == reference["state_dict"].keys()
    assert all(torch.equal(permuted["state_dict"][k], v) for k, v in reference["state_dict"].items())
    # The control: another seed does change it (the comparison can fail).
    cli("pretrain", path, "--set", "pretrain.seed=1", "--set", f"out={tmp_path / 'seed1'}")
    assert not all(torch.equal(backbone(tmp_path / "seed1")["state_dict"][k], v)
                   for k, v in reference["state_dict"].items())


def test_a_killed_pretrain_resumes_to_the_uninterrupted_losses(tmp_path):
    """MSN: the views, the masks and the target network (the EMA) all come back on resume."""
    path = write_recipe(tmp_path, method="msn", model=VIT, train={"steps": 12, "checkpoint_every": 4})
    cli("pretrain", path, "--set", f"out={tmp_path / 'whole'}")
    whole = losses(tmp_path / "whole")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "dpt_scale", "-q", "pretrain", str(path)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = tmp_path / "run" / "pretrain" / "checkpoints"
    deadline = time.time() + 240
    while not any(checkpoints.glob("step-*/COMPLETE")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    assert any(checkpoints.glob("step-*/COMPLETE")), "the run ended before its first checkpoint"
    cli("pretrain", path)
    assert losses(tmp_path / "run") == whole
    assert backbone(tmp_path / "run")["pretrain"]["steps"] == 12


@pytest.mark.parametrize("method, model", [("rotation", None), ("rotation_enhance", None), ("msn", VIT)])
def test_each_method_trains_a_backbone_that_stage_one_probes(tmp_path, method, model):
    path = write_recipe(tmp_path, method=method, model=model)
    # no backbone yet: one line naming the command that makes it
    assert_one_line_error(cli("train-classifier", path, check=False), "dpt-scale pretrain")
    cli("pretrain", path)
    knn = [json.loads(line) for line in (tmp_path / "run" / "pretrain" / "knn.jsonl").read_text().splitlines()]
    assert [r["step"] for r in knn] == [3, 6] and all(0 <= r["knn_top1"] <= 1 for r in knn)
    cli("train-classifier", path)
    from dpt_scale.models import load_classifier

    probe = load_classifier(tmp_path / "run" / "classifier" / "weights.pt")
    weights = backbone(tmp_path / "run")["state_dict"]
    assert all(torch.equal(probe.net.state_dict()[k], v) for k, v in weights.items())  # frozen, as pretrained


def test_bad_pretrain_settings_are_one_line_and_write_nothing(tmp_path):
    path = write_recipe(tmp_path)
    for sets, fragments in [
        (["pretrain.method=byol"], ("pretrain.method", "byol", "simclr")),
        (["classifier.model.name=resnet_nope"], ("unknown timm model", "resnet_nope")),
        (["pretrain.method=msn"], ("msn", "VisionTransformer", "classifier.model.name")),
        (["pretrain.rotation_enhance.enhancements=[none, sepia]", "pretrain.method=rotation_enhance"], ("sepia",)),
    ]:
        result = cli("pretrain", path, *[a for s in sets for a in ("--set", s)], check=False)
        assert result.returncode == 2
        assert_one_line_error(result, *fragments)
        assert not (tmp_path / "run").exists()
    # A backbone pretrained as one architecture, given to another.
    cli("pretrain", path)
    other = write_recipe(tmp_path, "o.yaml", model={"name": "test_vit",
                                                     "pretrained": str(tmp_path / "run" / "pretrain" / "backbone.pt")})
    result = cli("train-classifier", other, "--set", f"out={tmp_path / 'o'}", check=False)
    assert_one_line_error(result, "stage-0 backbone of test_resnet", "not test_vit")
    # A pretrain folder holding another backbone is refused, not resumed.
    result = cli("pretrain", path, "--set", "pretrain.simclr.temperature=0.2", check=False)
    assert_one_line_error(result, "other settings", "pretrain.simclr.temperature")
