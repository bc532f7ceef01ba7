"""The bad-input catalogue (docs/reliability.md): each case runs the real CLI on one bad input and
expects a non-zero exit, exactly one line on stderr naming the problem and the fix, no traceback,
and every file that existed before the command (shard sets, an earlier run's outputs, another
run's folder) left byte for byte as it was.

Every case runs in a fresh copy of one small world (relative paths, the CLI's working directory):

    r.yaml            tiny recipe: data.root data, out run (test_resnet, tiny U-ViT, ground-truth labels)
    data/train, val   40 + 8 grayscale 8x8 images, 4 classes
    run/              an earlier run's outputs: recipe.yaml, labelled.txt, classifier/eval.json
    run-eval/samples  a finished sample set (a copy of data/val)
    sets/, roots/     broken shard sets; roots/NAME/train for the stages that read <data.root>/train
    weights/          a U-ViT export of another size, reference U-ViT state dicts of other shapes,
                      a state_dict of another architecture, junk
    other/, photos/   a folder holding another recipe's run; a folder of unrelated files
    afile             a file where a folder is expected
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from dpt_scale.data.subset import per_class_subset, read_labels, write_subset
from dpt_scale.shards.manifest import Manifest
from dpt_scale.shards.writer import ShardSetWriter
from helpers import assert_one_line_error, make_shard_set, png, run_cli

RECIPE = {"name": "bad-inputs", "out": "run", "seed": 0,
          "data": {"root": "data", "labelled": {"per_class": 2}, "loader": {"workers": 0, "streams": 2}},
          "classifier": {"method": "supervised", "model": {"name": "test_resnet"},
                         "pseudo_label": {"batch": 16, "workers": 0},
                         "train": {"steps": 2, "micro_batch": 4, "zero_stage": 0}},
          "diffusion": {"model": {"size": "tiny"}, "labels": "ground_truth",
                        "train": {"steps": 2, "micro_batch": 8, "zero_stage": 0}},
          "sample": {"per_class": 2, "steps": 2, "batch": 4}}
UVIT = {"size": "tiny", "img_size": 8, "patch_size": 2, "in_chans": 1, "num_classes": 4, "conv": True,
        "mlp_time_embed": False, "qkv_bias": False, "attention": "auto", "grad_checkpointing": False}


@dataclass
class Case:
    id: str
    args: tuple[str, ...]
    problem: str  # a fragment of the line naming the problem ...
    fix: str  # ... and one of the fix it names


CASES = [
    # recipes and flags
    Case("malformed-yaml", ("run", "malformed.yaml"), "malformed YAML at line 3", "column 2"),
    Case("recipe-not-found", ("run", "missing.yaml"), "recipe not found: missing.yaml", "check the path"),
    Case("unknown-key", ("train-diffusion", "unknown-key.yaml"), "unknown key 'diffusion.train.stpes'",
         "did you mean 'diffusion.train.steps'"),
    Case("mistyped-key", ("sample", "mistyped-key.yaml"), "'sample.steps'", "expects int, got 'ten'"),
    Case("set-without-equals", ("train-diffusion", "r.yaml", "--set", "diffusion.train.steps"),
         "--set diffusion.train.steps", "expected KEY=VALUE"),
    Case("set-unknown-key", ("sample", "r.yaml", "--set", "sample.guidence=2"), "unknown key 'sample.guidence'",
         "did you mean 'sample.guidance'"),
    Case("negative-steps", ("train-diffusion", "r.yaml", "--set", "diffusion.train.steps=-5"),
         "'diffusion.train.steps'", "must be at least 0, got -5"),
    Case("negative-guidance", ("sample", "r.yaml", "--set", "sample.guidance=-1"), "'sample.guidance'",
         "must be at least 0.0"),
    Case("zero-sampler-steps", ("sample", "r.yaml", "--set", "sample.steps=0"), "'sample.steps'",
         "must be at least 1, got 0"),
    Case("unknown-attention", ("train-diffusion", "r.yaml", "--set", "diffusion.model.attention=flash"),
         "'diffusion.model.attention'", "must be one of 'auto', 'xformers', 'sdpa', 'math'"),
    Case("unknown-uvit-size", ("train-diffusion", "r.yaml", "--set", "diffusion.model.size=XL"),
         "'diffusion.model.size'", "must be one of 'tiny', 'mini', 'S', 'M', 'L', 'H'"),
    Case("unknown-stage", ("run", "r.yaml", "--from", "trian"), "invalid choice: 'trian'",
         "choose from 'import', 'subset'"),
    # data sources and shard sets (`data subset` would replace run/labelled.txt)
    Case("missing-source-path", ("data", "import", "idx", "nowhere-images", "nowhere-labels", "--out", "imported"),
         "IDX file not found: nowhere-images", "give the IMAGES and LABELS files"),
    Case("k-larger-than-every-class", ("data", "subset", "--recipe", "r.yaml", "--per-class", "100"),
         "fewer than --per-class 100 (4 classes are short)", "lower --per-class"),
    Case("empty-shard-set", ("data", "subset", "--recipe", "r.yaml", "--shards", "sets/empty"),
         "sets/empty is an empty shard set (0 samples)", "import images into it"),
    Case("no-labels", ("data", "subset", "--recipe", "r.yaml", "--shards", "sets/unlabelled"),
         "no sample carries a label", "import the images with their labels"),
    Case("duplicate-keys", ("data", "subset", "--recipe", "r.yaml", "--shards", "sets/duplicates"),
         "key 'k1' is in both shard-000000.tar and shard-000001.tar", "shards verify sets/duplicates"),
    Case("manifest-mismatch", ("data", "subset", "--recipe", "r.yaml", "--shards", "sets/miscounted"),
         "holds 20 samples but the manifest lists 25", "shards verify sets/miscounted"),
    Case("missing-shard", ("data", "subset", "--recipe", "r.yaml", "--shards", "sets/shard-missing"),
         "part-000001.tar: shard is missing", "restore or re-import the set"),
    Case("truncated-shard", ("data", "subset", "--recipe", "r.yaml", "--shards", "sets/truncated"),
         "part-000000.tar: truncated", "shards verify sets/truncated"),
    Case("damaged-manifest", ("shards", "stat", "sets/damaged-manifest"), "manifest.json is damaged",
         "re-create the shard set or restore the file"),
    Case("subset-list-missing", ("data", "subset", "--recipe", "r.yaml", "--from-list", "nowhere.txt"),
         "list file not found: nowhere.txt", "a text file of keys or file names"),
    Case("subset-list-names-missing-keys", ("data", "subset", "--recipe", "list-missing.yaml"),
         "2 listed name(s) match no sample", "check that the list belongs to this data set"),
    # output folders
    Case("import-out-is-a-file", ("data", "import", "mnist", "--out", "afile/data"), "afile is a file, not a folder",
         "pass --out DIR"),
    Case("run-out-is-a-file", ("run", "r.yaml", "--set", "out=afile/run"), "afile is a file, not a folder",
         "pass --set out=DIR"),
    Case("run-out-holds-another-run", ("run", "r.yaml", "--set", "out=other"),
         "other holds another run (other/recipe.yaml names 'another-recipe'", "pass another --set out=DIR"),
    Case("run-out-holds-unrelated-files", ("run", "r.yaml", "--set", "out=photos"),
         "photos holds files that are not a dpt-scale run (holiday.jpg, notes.txt)", "pass another --set out=DIR"),
    Case("stage-out-holds-another-run", ("train-classifier", "r.yaml", "--set", "out=other"),
         "other holds another run (other/recipe.yaml names 'another-recipe'", "pass another --set out=DIR"),
    Case("stage-out-holds-unrelated-files", ("sample", "r.yaml", "--set", "out=photos"),
         "photos holds files that are not a dpt-scale run (holiday.jpg, notes.txt)", "pass another --set out=DIR"),
    # stages: the training data, the checkpoints, the weights (each imports torch: a few seconds)
    Case("impossible-batch", ("train-classifier", "r.yaml", "--set", "classifier.train.global_batch=2"),
         "'classifier.train.global_batch' 2 is not a multiple of micro_batch 4", "give a multiple of 4"),
    Case("wrong-channel-count", ("train-classifier", "r.yaml", "--set", "data.channels=3"),
         "data.channels: 3 but the images are 1-channel", "re-import with `dpt-scale data import"),
    Case("non-image-member", ("train-classifier", "r.yaml", "--set", "data.root=roots/not-images"),
         "shard-000000.tar: labelled sample 's00005' does not decode", "shards verify roots/not-images/train"),
    Case("no-image-members", ("train-diffusion", "r.yaml", "--set", "data.root=roots/text"),
         "roots/text/train have no image member", "make the set with `dpt-scale data import`"),
    Case("no-labels-for-ground-truth", ("train-diffusion", "r.yaml", "--set", "data.root=roots/unlabelled"),
         "40 of 40 samples have no label", "use diffusion.labels=pseudo"),
    Case("unknown-model-name", ("train-classifier", "r.yaml", "--set", "classifier.model.name=test_resnt"),
         "unknown timm model 'test_resnt'", "did you mean test_resnet"),
    Case("pretrained-wrong-architecture", ("train-classifier", "r.yaml", "--set",
                                           "classifier.model.pretrained=weights/vit.pth"),
         "weights/vit.pth do not fit timm's test_resnet: 75 of its 75 backbone tensors are missing from the file "
         "and 2 of the file's are unexpected", "set classifier.model.name"),
    Case("pretrained-not-weights", ("train-classifier", "r.yaml", "--set",
                                    "classifier.model.pretrained=weights/junk.pth"),
         "weights/junk.pth do not load as a state_dict", "torch.save(model.state_dict()"),
    Case("sample-before-training", ("sample", "r.yaml"), "diffusion weights not found: run/diffusion/weights.pt",
         "run `dpt-scale train-diffusion` first"),
    Case("uvit-of-another-size", ("sample", "r.yaml", "--set", "sample.checkpoint=weights/uvit-mini.pt"),
         "does not match the recipe's model: it has size='mini' (recipe: 'tiny')", "make diffusion.model match"),
    Case("retrain-before-sample", ("retrain", "r.yaml"), "no pseudo images at run/samples",
         "run `dpt-scale sample` (stage 3) first"),
    Case("evaluator-weights-missing", ("evaluate", "r.yaml", "--set", "out=run-eval", "--set",
                                       "evaluate.evaluator=inception", "--set",
                                       "evaluate.inception_weights=weights/none.pth"),
         "Inception weights not found: weights/none.pth", "--set evaluate.inception_weights="),
    # diffusion.init: a U-ViT checkpoint made elsewhere, refused before any training
    Case("init-missing", ("train-diffusion", "r.yaml", "--set", "diffusion.init=weights/none.pth"),
         "diffusion.init not found: weights/none.pth", "nothing is downloaded"),
    Case("init-not-weights", ("train-diffusion", "r.yaml", "--set", "diffusion.init=weights/junk.pth"),
         "diffusion.init weights/junk.pth does not load as a state dict", "torch.save(nnet.state_dict(), ...)"),
    Case("init-not-a-u-vit", ("train-diffusion", "r.yaml", "--set", "diffusion.init=weights/vit.pth"),
         "are missing from the file (e.g. decoder_pred.bias", "is it a U-ViT checkpoint?"),
    Case("init-another-size", ("train-diffusion", "r.yaml", "--set", "diffusion.init=weights/uvit-ref-mini.pth"),
         "it is 128 wide and 6 deep (size mini)", "set diffusion.model.size=mini"),
    Case("init-another-class-count", ("train-diffusion", "r.yaml", "--set",
                                      "diffusion.init=weights/uvit-ref-10-classes.pth"),
         "label_emb.weight is [11, 64] there and [5, 64] here", "fine-tune on a training set with the checkpoint's"),
    Case("init-another-patch-size", ("train-diffusion", "r.yaml", "--set",
                                     "diffusion.init=weights/uvit-ref-patch-4.pth"),
         "its patch size is 4", "set diffusion.model.patch_size=4"),
    Case("init-another-channel-count", ("train-diffusion", "r.yaml", "--set",
                                        "diffusion.init=weights/uvit-ref-rgb.pth"),
         "it takes 3-channel inputs, the training set's are 1-channel", "data.channels"),
    Case("init-another-image-size", ("train-diffusion", "r.yaml", "--set",
                                     "diffusion.init=weights/uvit-ref-16px.pth"),
         "pos_embed is [1, 66, 64] there and [1, 18, 64] here", "train on 16x16 inputs"),
    Case("zero-steps-without-init", ("train-diffusion", "r.yaml", "--set", "diffusion.train.steps=0"),
         "'diffusion.train.steps' is 0, which trains nothing", "set diffusion.init to a checkpoint"),
    # shards export
    Case("export-target-holds-files", ("shards", "export", "data/val", "--to", "imagefolder", "photos"),
         "photos holds other files (holiday.jpg, notes.txt)", "name a new folder"),
    Case("export-target-exists", ("shards", "export", "data/val", "--to", "npz", "afile"),
         "afile exists", "or remove it first"),
    Case("export-not-a-shard-set", ("shards", "export", "photos", "--to", "npz", "val.npz"),
         "photos has no manifest.json", "`dpt-scale data import` makes one"),
    Case("export-unknown-format", ("shards", "export", "data/val", "--to", "png", "val-png"),
         "unknown export format --to 'png'", "choose npz"),
    Case("export-unlabelled-as-class-folders", ("shards", "export", "sets/unlabelled", "--to", "imagefolder", "png"),
         "4 of 4 samples have no label, so they have no class folder", "pass --flat"),
]


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    return path


def shard_set(directory: Path, keys: list[str], member=lambda i: {"png": png(i)}, image=(1, 8, 8), per_shard=20):
    with ShardSetWriter(directory, classes=["c0", "c1", "c2", "c3"], prefix="shard", max_samples=per_shard) as w:
        for i, key in enumerate(keys):
            w.write({"__key__": key, **member(i)}, image)
    return directory


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return build_world(tmp_path_factory.mktemp("world"))


def build_world(w: Path) -> Path:
    import torch

    write(w / "r.yaml", yaml.safe_dump(RECIPE))
    write(w / "malformed.yaml", "data:\n  image_size: 3\n bad\n")
    write(w / "unknown-key.yaml", "base: r.yaml\ndiffusion:\n  train:\n    stpes: 3\n")
    write(w / "mistyped-key.yaml", "base: r.yaml\nsample:\n  steps: ten\n")
    write(w / "list-missing.yaml", "base: r.yaml\ndata:\n  labelled:\n    list: keys.txt\n")
    write(w / "keys.txt", "# a list of another data set\ns00001\nn01440764_10026.JPEG\nc9/s99999\n")

    make_shard_set(w / "data" / "train", [20, 20])
    make_shard_set(w / "data" / "val", [8])
    labels = read_labels(w / "data" / "train")
    keys = per_class_subset(labels, Manifest.load(w / "data" / "train").classes, 2, 0)
    write_subset(w / "run" / "labelled.txt", keys, labels, ["an earlier run's labelled subset"])
    write(w / "run" / "recipe.yaml", yaml.safe_dump(RECIPE))
    write(w / "run" / "classifier" / "eval.json", json.dumps({"top1": 0.5}))
    shutil.copytree(w / "data" / "val", w / "run-eval" / "samples")

    sets, train = w / "sets", [f"s{i:05d}" for i in range(40)]
    labelled = lambda i: {"png": png(i), "cls": i % 4}  # noqa: E731
    shard_set(sets / "empty", [])
    shard_set(sets / "unlabelled", [f"k{i}" for i in range(4)])
    shard_set(sets / "duplicates", ["k0", "k1", "k1", "k2"], labelled, per_shard=2)
    for name in ("miscounted", "shard-missing", "truncated", "damaged-manifest"):
        shutil.copytree(w / "data" / "train", sets / name)
    manifest = json.loads((sets / "miscounted" / "manifest.json").read_text())
    manifest["shards"][0]["samples"] = 25
    write(sets / "miscounted" / "manifest.json", json.dumps(manifest))
    (sets / "shard-missing" / "part-000001.tar").unlink()
    shard = sets / "truncated" / "part-000000.tar"
    write(shard, shard.read_bytes()[: shard.stat().st_size // 2])
    write(sets / "damaged-manifest" / "manifest.json", '{"shards": [')

    roots = w / "roots"
    shard_set(roots / "not-images" / "train", train, lambda i: {"png": b"plain text, not a PNG", "cls": i % 4})
    shard_set(roots / "text" / "train", train, lambda i: {"txt": b"a caption", "cls": i % 4}, image=None)
    shard_set(roots / "unlabelled" / "train", train)

    (w / "weights").mkdir()
    torch.save({"kind": "diffusion", "settings": {**UVIT, "size": "mini"}, "weights": {}, "ema": {}},
               w / "weights" / "uvit-mini.pt")
    torch.save({"cls_token": torch.zeros(1, 1, 8), "blocks.0.attn.qkv.weight": torch.zeros(24, 8)},
               w / "weights" / "vit.pth")
    write(w / "weights" / "junk.pth", b"these bytes are not a checkpoint")
    from dpt_scale.models import build_uvit
    from dpt_scale.models.uvit_reference import to_reference

    for name, changes in {"mini": {"size": "mini"}, "10-classes": {"num_classes": 10}, "patch-4": {"patch_size": 4},
                          "rgb": {"in_chans": 3}, "16px": {"img_size": 16}}.items():
        torch.save(to_reference(build_uvit(**{**UVIT, **changes}).state_dict()), w / "weights" / f"uvit-ref-{name}.pth")

    write(w / "other" / "recipe.yaml", yaml.safe_dump({**RECIPE, "name": "another-recipe"}))
    write(w / "other" / "stages" / "import.json", json.dumps({"stage": "import", "state": "done"}))
    write(w / "other" / "data" / "train" / "manifest.json", "{}")
    write(w / "photos" / "holiday.jpg", b"\xff\xd8\xff\xe0 a photo")
    write(w / "photos" / "notes.txt", "not a run")
    write(w / "afile", "a file, not a folder")
    return w


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_and_leaves_existing_files_alone(case, world, tmp_path):
    here = tmp_path / "w"
    shutil.copytree(world, here)
    before = snapshot(here)
    result = run_cli("-q", *case.args, cwd=here)
    line = assert_one_line_error(result, case.problem, case.fix)
    assert result.returncode == 2, line
    after = snapshot(here)
    assert {k: after.get(k) for k in before} == before, "a file that existed before was changed or removed"
    assert set(after) == set(before), f"new files: {sorted(set(after) - set(before))}"


def set_writable(folder: Path, writable: bool) -> bool:
    """Read-only permissions, or for root (whom permissions do not stop) the immutable flag; False
    where that flag is not to be had."""
    if os.geteuid() != 0:
        folder.chmod(0o755 if writable else 0o555)
        return True
    return subprocess.run(["chattr", "-i" if writable else "+i", str(folder)], capture_output=True).returncode == 0


@contextlib.contextmanager
def unwritable(*folders: Path):
    locked = []
    try:
        for folder in folders:
            if not set_writable(folder, False):
                pytest.skip("running as root on a filesystem without the immutable flag: no folder is unwritable")
            locked.append(folder)
        yield
    finally:
        for folder in locked:
            assert set_writable(folder, True)


def test_a_folder_that_cannot_be_written_is_one_line_before_or_during_the_work(world, tmp_path):
    here = tmp_path / "w"
    shutil.copytree(world, here)
    (here / "locked").mkdir()
    before = snapshot(here)
    with unwritable(here / "locked", here / "run"):
        # Found before any work: the folder `run` would make its output in.
        result = run_cli("-q", "run", "r.yaml", "--set", "out=locked/run", cwd=here)
        assert_one_line_error(result, "cannot write locked/run: locked is not writable (", "pass --set out=DIR")
        # Found while working: a command that writes into an existing folder it may not write.
        result = run_cli("-q", "data", "subset", "--recipe", "r.yaml", cwd=here)
        line = assert_one_line_error(result, ": run/labelled.txt", "give yourself access to it")
        assert result.returncode == 2 and ("permission denied" in line or "operation not permitted" in line), line
    assert snapshot(here) == before


def test_the_catalogue_has_the_cases_the_issue_asks_for():
    assert len(CASES) >= 28 and len({c.id for c in CASES}) == len(CASES)
    table = (Path(__file__).parents[1] / "docs" / "reliability.md").read_text()
    for case in CASES:
        assert f"`{case.id}`" in table, f"{case.id} is not in docs/reliability.md"
