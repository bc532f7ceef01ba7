"""Stages 1 and 4 and pseudo-labelling on small real shard sets: the hidden-label guarantee,
pseudo-label resume after SIGKILL, sidecars aligned with shards, the retraining mix, the linear
probe on a local backbone file, and clear errors."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import timm
import torch
import yaml

from dpt_scale.shards.manifest import Manifest
from dpt_scale.shards.tar import iter_samples
from dpt_scale.shards.writer import ShardSetWriter
from helpers import REPO, assert_one_line_error, jpeg, make_shard_set, png, run_cli, torchrun

CLASSES = 4


def write_recipe(tmp_path, name="r.yaml", **classifier):
    """test_resnet on 16x16 images: 4 classes, 2 labelled images per class."""
    data = tmp_path / "data"
    if not (data / "train").exists():
        make_shard_set(data / "train", [40, 40, 40, 40, 40, 40], num_classes=CLASSES, size=16)
        make_shard_set(data / "val", [30, 30], num_classes=CLASSES, size=16)
    body = {"name": "cls-test", "out": str(tmp_path / "run"), "seed": 0,
            "data": {"root": str(data), "labelled": {"per_class": 2}, "loader": {"workers": 0, "streams": 2}},
            "classifier": {"method": "fixmatch", "model": {"name": "test_resnet"},
                           "fixmatch": {"unlabelled_ratio": 2, "threshold": 0.3},
                           "pseudo_label": {"batch": 16, "workers": 0},
                           "train": {"steps": 4, "micro_batch": 4, "checkpoint_every": 2, "log_every": 1,
                                     "zero_stage": 0}}}
    for key, value in classifier.items():
        body["classifier"][key] = value if not isinstance(value, dict) else {**body["classifier"].get(key, {}),
                                                                             **value}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(body))
    return path


def cli(*args, check=True, timeout=300):
    result = run_cli("-q", *map(str, args), timeout=timeout)
    if check:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def exported(path):
    payload = torch.load(path, weights_only=False)
    return {**{f"w.{k}": v for k, v in payload["weights"].items()},
            **{f"ema.{k}": v for k, v in payload["ema"].items()}}


def relabel(src, dst, change):
    """A copy of a shard set with the same images and `change(key, label)` as each label."""
    manifest = Manifest.load(src)
    with ShardSetWriter(dst, classes=manifest.classes, prefix="part", max_samples=10**9) as writer:
        for entry in manifest.shards:
            for sample in iter_samples(src / entry.name):
                writer.write({"__key__": sample["__key__"], "png": sample["png"],
                              "cls": change(sample["__key__"], int(sample["cls"]))}, (1, 16, 16))
            writer.end_shard()


def test_hidden_labels_never_reach_stage_one(tmp_path):
    path = write_recipe(tmp_path)
    cli("data", "subset", "--recipe", path)  # fixes the labelled keys: <out>/labelled.txt
    labelled = {k for k in (tmp_path / "run" / "labelled.txt").read_text().splitlines() if not k.startswith("#")}
    assert len(labelled) == 2 * CLASSES
    cli("train-classifier", path)
    reference = exported(tmp_path / "run" / "classifier" / "weights.pt")

    def train_on(change, name):
        relabel(tmp_path / "data" / "train", tmp_path / name / "train", change)
        (tmp_path / "other" / name).mkdir(parents=True)
        (tmp_path / "other" / name / "labelled.txt").write_text((tmp_path / "run" / "labelled.txt").read_text())
        cli("train-classifier", path, "--set", f"data.root={tmp_path / name}", "--set", f"out={tmp_path}/other/{name}")
        return exported(tmp_path / "other" / name / "classifier" / "weights.pt")

    # Every hidden label moves to another class: stage 1 must not change by a single bit.
    permuted = train_on(lambda k, c: c if k in labelled else (c + 1) % CLASSES, "permuted")
    assert permuted.keys() == reference.keys()
    assert all(torch.equal(permuted[k], reference[k]) for k in reference)
    # The control: changing one *labelled* image's label does change the model (the test can fail).
    one = sorted(labelled)[0]
    control = train_on(lambda k, c: (c + 1) % CLASSES if k == one else c, "control")
    assert not all(torch.equal(control[k], reference[k]) for k in reference)


def read_sidecars(directory):
    return {p.name: json.loads(p.read_text()) for p in sorted(directory.glob("*.labels.json"))}


def test_pseudo_labels_resume_after_sigkill_and_match_the_shards(tmp_path):
    path = write_recipe(tmp_path, train={"steps": 2})
    cli("train-classifier", path)
    cli("pseudo-label", path)
    out = tmp_path / "run" / "pseudo_labels"
    reference = read_sidecars(out)
    train = tmp_path / "data" / "train"
    manifest = Manifest.load(train)
    # Sidecars: one per shard, its keys those of the shard in order, every label a class.
    assert sorted(reference) == sorted(e.name.replace(".tar", ".labels.json") for e in manifest.shards)
    for entry in manifest.shards:
        side = reference[entry.name.replace(".tar", ".labels.json")]
        assert side["keys"] == [s["__key__"] for s in iter_samples(train / entry.name, fields=frozenset())]
        assert side["sha256"] == entry.sha256
        assert all(0 <= l < CLASSES for l in side["labels"]) and all(0 <= c <= 1 for c in side["confidence"])
    summary = json.loads((out / "manifest.json").read_text())
    assert sum(summary["counts"]) == manifest.num_samples and 0 <= summary["agreement"] <= 1

    # Kill a fresh run once some sidecars exist, then restart: the same sidecars, the finished ones kept.
    for p in out.iterdir():
        p.unlink()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "dpt_scale", "-q", "pseudo-label", str(path), "--set",
                             "classifier.pseudo_label.batch=1"], cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and len(list(out.glob("*.labels.json"))) < 2:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    survived = read_sidecars(out)
    assert 0 < len(survived) < len(reference), "the kill should land part-way through"
    assert not (out / "manifest.json").exists()  # an unfinished run has no manifest
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.labels.json")}
    cli("pseudo-label", path)
    resumed = read_sidecars(out)
    assert resumed.keys() == reference.keys()
    for name, side in resumed.items():
        # a shard labelled in batches of 1 may differ from batches of 16 in the last bit of a confidence
        assert {**side, "confidence": None} == {**reference[name], "confidence": None}
        assert side["confidence"] == pytest.approx(reference[name]["confidence"], abs=2e-6)
    assert all(out.joinpath(name).stat().st_mtime_ns == t for name, t in mtimes.items())  # not redone
    assert not list(out.glob("*.tmp"))


def test_two_ranks_write_the_same_pseudo_labels_as_one(tmp_path):
    path = write_recipe(tmp_path, train={"steps": 2})
    cli("train-classifier", path)
    cli("pseudo-label", path)
    one = read_sidecars(tmp_path / "run" / "pseudo_labels")
    for p in (tmp_path / "run" / "pseudo_labels").glob("*.labels.json"):
        p.unlink()
    torchrun("-m", "dpt_scale", "-q", "pseudo-label", path)
    two = read_sidecars(tmp_path / "run" / "pseudo_labels")
    assert one.keys() == two.keys()
    for name in one:
        assert one[name]["keys"] == two[name]["keys"] and one[name]["labels"] == two[name]["labels"]
        assert one[name]["confidence"] == pytest.approx(two[name]["confidence"], abs=1e-5)


@pytest.mark.parametrize("workers", [0, 2])
def test_the_shard_reader_gives_each_shards_images_in_order_and_names_a_damaged_one(tmp_path, workers):
    """map_shards, under pseudo-labelling, evaluation and encoding: every shard's keys, labels and
    pixels in sample order (JPEGs decoded in place; a CMYK one takes the general decoder), and a
    sample that does not decode stops it with the shard, the key and the verify command."""
    from dpt_scale.errors import ShardError
    from dpt_scale.shards.decode import decode_image
    from dpt_scale.shards.map_shards import map_shards

    def write(directory, blobs):
        with ShardSetWriter(directory, classes=["a", "b", "c"], max_samples=5, image_field="jpg") as w:
            for i, data in enumerate(blobs):
                w.write({"__key__": f"k{i:02d}", "jpg": data, "cls": i % 3}, (3, 16, 16))
        return directory

    blobs = [jpeg(i, 16, "CMYK" if i == 6 else "RGB") for i in range(12)]
    good = write(tmp_path / "good", blobs)
    parts = list(map_shards(lambda x: x.flatten(1), good, [2, 0, 1], batch_size=2, device=torch.device("cpu"),
                            workers=workers, read_labels=True))
    assert sorted(p.shard for p in parts) == [0, 1, 2]
    for part in parts:
        numbers = range(5 * part.shard, min(5 * part.shard + 5, 12))
        assert part.keys == [f"k{i:02d}" for i in numbers]
        assert part.labels.tolist() == [i % 3 for i in numbers]
        assert torch.equal(part.outputs, torch.stack([decode_image(blobs[i], 3) for i in numbers]).flatten(1))
    # Batches are decoded into reused buffers: one that a function's output still holds (here the
    # batch itself, kept until its shard is complete) must not be refilled under it.
    kept = list(map_shards(lambda x: x, good, [0, 1, 2], batch_size=2, device=torch.device("cpu"), workers=workers))
    for part in kept:
        numbers = range(5 * part.shard, min(5 * part.shard + 5, 12))
        assert torch.equal(part.outputs, torch.stack([decode_image(blobs[i], 3) for i in numbers]))
    damaged = write(tmp_path / "damaged", [b[:200] if i == 7 else b for i, b in enumerate(blobs)])
    with pytest.raises(ShardError, match=r"shard-000001\.tar: sample 'k07' has no readable \.jpg .*shards verify"):
        list(map_shards(lambda x: x.flatten(1), damaged, [0, 1, 2], 2, torch.device("cpu"), workers=workers))


def pseudo_set(directory, n, tag):
    """A 'generated' shard set: keys tagged so a test can tell which set a sample came from."""
    with ShardSetWriter(directory, classes=[f"c{c}" for c in range(CLASSES)], max_samples=25) as writer:
        for i in range(n):
            writer.write({"__key__": f"{tag}{i:05d}", "png": png(1000 + i, 16), "cls": i % CLASSES}, (1, 16, 16))


def test_retraining_mixes_real_and_pseudo_sets_in_the_recipes_proportions(tmp_path):
    from dpt_scale.classification import METHODS
    from dpt_scale.data.labelled import LabelledBank
    from dpt_scale.data.subset import make_subset
    from dpt_scale.recipe import load_recipe
    from dpt_scale.stages.train_classifier import _mixture, _pseudo_sets

    path = write_recipe(tmp_path)
    pseudo_set(tmp_path / "genA", 100, "A")
    pseudo_set(tmp_path / "genB", 100, "B")
    recipe = load_recipe(path, [f"classifier.retrain.pseudo=[{tmp_path}/genA,{tmp_path}/genB]",
                                "classifier.retrain.pseudo_fraction=[0.25,0.5]", "classifier.train.micro_batch=8"])
    train = tmp_path / "data" / "train"
    make_subset(recipe, train, tmp_path / "labelled.txt")
    bank = LabelledBank.from_subset(train, tmp_path / "labelled.txt")
    method = METHODS["fixmatch"](recipe.classifier)
    pseudo = _pseudo_sets(recipe, Manifest.load(train), 16, bank.keys, tmp_path / "retrain")
    mixture = _mixture(recipe, 8, method, bank, pseudo, 0, 1, 16, 1, train)
    counts, real_keys = {"real": 0, "A": 0, "B": 0}, set()
    batches = mixture.batches()
    for _ in range(20):
        batch = next(batches)
        for name, part in batch.items():
            if name in ("labelled", "pseudo0", "pseudo1"):
                for key in part["key"]:
                    counts["A" if key.startswith("A") else "B" if key.startswith("B") else "real"] += 1
                    real_keys |= {key} if name == "labelled" else set()
        assert batch["unlabelled"]["image"].shape == (16, 2, 1, 16, 16)  # ratio 2: weak and strong views
        assert (batch["unlabelled"]["cls"] == -1).all()  # unlabelled: no label reaches training
    batches.close()
    total = sum(counts.values())
    assert total == 20 * 8
    assert counts["A"] / total == pytest.approx(0.25, abs=0.02) and counts["B"] / total == pytest.approx(0.5, abs=0.02)
    assert real_keys <= set(bank.keys) and len(bank.keys) == 2 * CLASSES  # real: the labelled subset only


def test_stage4_shares_that_round_a_source_away_are_refused(tmp_path):
    from dpt_scale.errors import UserError
    from dpt_scale.recipe import load_recipe
    from dpt_scale.stages.train_classifier import _pseudo_sets

    path = write_recipe(tmp_path)
    pseudo_set(tmp_path / "gen", 20, "G")
    train = Manifest.load(tmp_path / "data" / "train")
    for shares in ("[0.97]", "[0.03]"):  # of 8: no real image left / no pseudo image taken
        recipe = load_recipe(path, [f"classifier.retrain.pseudo=[{tmp_path}/gen]", "classifier.train.micro_batch=8",
                                    f"classifier.retrain.pseudo_fraction={shares}"])
        with pytest.raises(UserError, match="raise the micro_batch or change the shares"):
            _pseudo_sets(recipe, train, 16, [], tmp_path / "retrain")
    recipe = load_recipe(path, [f"classifier.retrain.pseudo=[{tmp_path}/gen]", "classifier.train.micro_batch=8",
                                "classifier.retrain.pseudo_fraction=[1.0]"])  # pseudo images only: asked for
    assert len(_pseudo_sets(recipe, train, 16, [], tmp_path / "retrain")) == 1


def test_retrain_reports_top1_next_to_stage_one(tmp_path):
    path = write_recipe(tmp_path, method="supervised", train={"steps": 3})
    pseudo_set(tmp_path / "gen", 60, "G")
    cli("train-classifier", path)
    cli("retrain", path, "--set", f"classifier.retrain.pseudo=[{tmp_path}/gen]")
    report = json.loads((tmp_path / "run" / "retrain" / "eval.json").read_text())
    first = json.loads((tmp_path / "run" / "classifier" / "eval.json").read_text())
    assert report["stage1_top1"] == first["top1"] and 0 <= report["top1"] <= 1
    assert (tmp_path / "run" / "retrain" / "confusion.png").stat().st_size > 1000
    result = cli("evaluate", path)
    scores = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(scores) == {"stage1", "retrain"} and scores["retrain"]["top1"] == report["top1"]


def test_linear_probe_on_a_local_backbone_file(tmp_path):
    backbone = tmp_path / "backbone.pth"
    torch.manual_seed(0)
    torch.save(timm.create_model("test_vit", num_classes=0).state_dict(), backbone)
    path = write_recipe(tmp_path, method="linear_probe",
                        model={"name": "test_vit", "pretrained": str(backbone), "input_size": 32},
                        train={"steps": 6, "lr": 0.05, "weight_decay": 0.0})
    cli("train-classifier", path)
    out = tmp_path / "run" / "classifier"
    feats = Manifest.load(out / "features" / "labelled")
    assert feats.num_samples == 2 * CLASSES and feats.image is None  # features of the labelled images only
    from dpt_scale.models import load_classifier

    model = load_classifier(out / "weights.pt")
    pretrained = torch.load(backbone)
    # The backbone is the file's, untouched (timm adapts the stem to 1 channel and the position
    # embedding to 32 px); only the head and the centring were learnt.
    kept = {k: v for k, v in pretrained.items() if k not in ("patch_embed.proj.weight", "pos_embed")}
    assert kept and all(torch.equal(model.net.state_dict()[k], v) for k, v in kept.items())
    assert model.feature_mean.abs().sum() > 0
    assert json.loads((out / "eval.json").read_text())["samples"] == 60
    # Stage 4: the pseudo images' features are extracted the same way, then the probe is retrained.
    pseudo_set(tmp_path / "gen", 30, "G")
    cli("retrain", path, "--set", f"classifier.retrain.pseudo=[{tmp_path}/gen]")
    assert Manifest.load(tmp_path / "run" / "retrain" / "features" / "pseudo0").num_samples == 30
    assert "stage1_top1" in json.loads((tmp_path / "run" / "retrain" / "eval.json").read_text())


def test_missing_backbone_and_empty_subset_are_one_line_errors(tmp_path):
    path = write_recipe(tmp_path, method="linear_probe", model={"name": "test_vit", "pretrained": "nowhere.pth"})
    assert_one_line_error(cli("train-classifier", path, check=False), "nowhere.pth", "not found")
    path = write_recipe(tmp_path, name="s.yaml")
    (tmp_path / "run").mkdir(exist_ok=True)
    (tmp_path / "run" / "labelled.txt").write_text("# no keys at all\n")
    assert_one_line_error(cli("train-classifier", path, check=False), "labelled.txt", "no keys")
    (tmp_path / "run" / "labelled.txt").write_text("s99999\n")
    assert_one_line_error(cli("train-classifier", path, check=False), "s99999", "data subset")
    assert_one_line_error(cli("pseudo-label", path, check=False), "weights.pt", "train-classifier")
