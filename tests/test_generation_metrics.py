"""Generation metrics on real shard sets built from the embedded MNIST images: real digits against
real digits score a small FID and a high conditional accuracy, wrong classes only lower the
latter, noise ruins FID and precision; the reference features come from the cache; the
evaluators refuse what they cannot read, in one line."""
import dataclasses
import io
import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from dpt_scale.data.sources import SOURCES
from dpt_scale.errors import UserError
from dpt_scale.metrics import generation
from dpt_scale.metrics.evaluators import EVALUATORS
from dpt_scale.metrics.generation import generation_metrics
from dpt_scale.recipe import load_recipe
from dpt_scale.recipe.schema import Data, Evaluate
from dpt_scale.shards.manifest import Manifest
from dpt_scale.shards.writer import ShardSetWriter
from helpers import REPO, assert_one_line_error, run_cli, torchrun

KEYS = {"fid", "kid_mean", "kid_std", "precision", "recall", "conditional_accuracy", "samples",
        "reference_samples", "evaluator"}


def encode(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def write_set(directory, items, classes=None, per_shard=100, source="mnist"):
    """items: (key, HxW or HxWx3 uint8 array, cls). Their images come from the embedded MNIST (or are
    RGB noise), and the set's provenance says so, as an imported set's does: `auto` reads it."""
    with ShardSetWriter(directory, classes=classes or [str(c) for c in range(10)], max_samples=per_shard,
                        meta={"source": source}) as writer:
        for key, array, label in items:
            shape = (1, *array.shape) if array.ndim == 2 else (array.shape[2], *array.shape[:2])
            writer.write({"__key__": key, "png": encode(array), "cls": label}, shape)
    return directory


def write_recipe(tmp_path, **evaluate):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"name": "gen-test", "out": str(tmp_path / "run"),
                                    "data": {"root": str(tmp_path / "data")},
                                    "classifier": {"pseudo_label": {"workers": 0}},
                                    "evaluate": {"kid_subset_size": 100, **evaluate}}))
    return path


@pytest.fixture(scope="module")
def mnist():
    return SOURCES["mnist"](Data()).splits


@pytest.fixture(scope="module")
def digits(tmp_path_factory, mnist):
    """500 validation digits as the reference; 500 other validation digits as the 'generated'
    images, with their true classes (held out from the evaluator's training, so that conditional
    accuracy is not a memory test); the same images with every class wrong; 500 noise images."""
    root = tmp_path_factory.mktemp("digits")
    write_set(root / "data" / "val", mnist["val"][0::4])
    held_out = mnist["val"][2::4]
    write_set(root / "run" / "samples", held_out)
    write_set(root / "wrong", [(k, a, (c + 1) % 10) for k, a, c in held_out])
    rng = np.random.default_rng(0)
    write_set(root / "noise", [(f"noise{i:04d}", rng.integers(0, 256, (28, 28), dtype=np.uint8), i % 10)
                               for i in range(500)])
    return root, load_recipe(write_recipe(root))


def test_real_digits_score_well_and_wrong_classes_or_noise_do_not(digits):
    root, recipe = digits
    real = generation_metrics(recipe)
    assert KEYS <= set(real) and real["evaluator"] == "mnist"  # auto: 1x28x28 reference
    assert real["samples"] == 500 and real["reference_samples"] == 500
    assert 0 <= real["fid"] < 5 and real["conditional_accuracy"] > 0.9
    assert real["precision"] > 0.7 and real["recall"] > 0.7
    assert abs(real["kid_mean"]) < 0.05

    wrong = generation_metrics(recipe, root / "wrong")
    assert wrong["conditional_accuracy"] < 0.1  # the evaluator disagrees with every conditioning class ...
    for key in ("fid", "kid_mean", "precision", "recall"):  # ... while the images are the same
        assert wrong[key] == pytest.approx(real[key], abs=1e-9)

    noise = generation_metrics(recipe, root / "noise")
    assert noise["fid"] > 20 * max(real["fid"], 1) and noise["kid_mean"] > 20 * max(real["kid_mean"], 0.05)
    assert noise["precision"] < 0.05


def test_reference_features_come_from_the_cache(tmp_path, mnist, monkeypatch):
    write_set(tmp_path / "data" / "val", mnist["val"][1::10][:60], per_shard=20)
    write_set(tmp_path / "run" / "samples", mnist["train"][1::50][:60], per_shard=20)
    recipe = load_recipe(write_recipe(tmp_path))
    extracted, original = [], generation.set_features

    def counted(evaluator, directory, *args):
        extracted.append(directory)
        return original(evaluator, directory, *args)

    monkeypatch.setattr(generation, "set_features", counted)
    first = generation_metrics(recipe)
    cached = list((tmp_path / "run" / "evaluation" / "cache").glob("reference-mnist-*.pt"))
    assert len(cached) == 1 and extracted == [tmp_path / "data" / "val", tmp_path / "run" / "samples"]

    # Only the manifest is left of the reference set: its features can only come from the cache.
    for tar in (tmp_path / "data" / "val").glob("*.tar"):
        tar.unlink()
    extracted.clear()
    assert generation_metrics(recipe) == first
    assert extracted == [tmp_path / "run" / "samples"]

    # A different reference set (other checksums) is extracted anew, never mistaken for the cached one.
    write_set(tmp_path / "data" / "val", mnist["val"][2::10][:60], per_shard=20)
    other = generation_metrics(recipe)
    assert len(list((tmp_path / "run" / "evaluation" / "cache").glob("reference-mnist-*.pt"))) == 2
    assert other["fid"] != first["fid"] and extracted[-2] == tmp_path / "data" / "val"


def rgb_items(n, size=32, seed=0):
    rng = np.random.default_rng(seed)
    return [(f"rgb{i:03d}", rng.integers(0, 256, (size, size, 3), dtype=np.uint8), i % 4) for i in range(n)]


def test_evaluate_on_two_ranks_matches_one_and_reports_generation(tmp_path, mnist):
    write_set(tmp_path / "data" / "val", mnist["val"][3::10][:100], per_shard=25)
    write_set(tmp_path / "run" / "samples", mnist["train"][3::50][:100], per_shard=25)
    path = write_recipe(tmp_path)
    result = torchrun("-m", "dpt_scale", "-q", "evaluate", path)
    printed = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(printed) == {"generation"}  # no classifier weights: only the samples are evaluated
    assert set(printed["generation"]) == {"fid", "kid_mean", "precision", "recall", "conditional_accuracy"}
    saved = json.loads((tmp_path / "run" / "evaluation" / "metrics.json").read_text())["generation"]
    assert KEYS <= set(saved) and saved["fid"] == printed["generation"]["fid"]
    assert saved["samples"] == 100 and saved["reference_samples"] == 100 and saved["conditional_accuracy"] > 0.9
    # Each rank read half the shards; gathered in shard order, they give one process's numbers.
    alone = generation_metrics(load_recipe(path, [f"out={tmp_path}/alone"]), tmp_path / "run" / "samples")
    for key in ("fid", "kid_mean", "kid_std", "precision", "recall", "conditional_accuracy"):
        assert saved[key] == pytest.approx(alone[key], rel=1e-5, abs=1e-7), key


def test_inception_without_weights_is_a_one_line_error(tmp_path):
    write_set(tmp_path / "data" / "val", rgb_items(8), classes=["a", "b", "c", "d"])
    write_set(tmp_path / "run" / "samples", rgb_items(8, seed=1), classes=["a", "b", "c", "d"])
    result = run_cli("evaluate", str(write_recipe(tmp_path)))  # auto: RGB 32 px -> inception
    assert_one_line_error(result, "--set evaluate.inception_weights=", "pt_inception-2015-12-05",
                          "nothing is downloaded")
    recipe = load_recipe(write_recipe(tmp_path, evaluator="inception", inception_weights=str(tmp_path / "none.pth")))
    with pytest.raises(UserError, match="none.pth"):
        generation_metrics(recipe)


def test_mnist_evaluator_refuses_other_images(tmp_path):
    write_set(tmp_path / "data" / "val", rgb_items(8), classes=["a", "b", "c", "d"])
    write_set(tmp_path / "run" / "samples", rgb_items(8, seed=1), classes=["a", "b", "c", "d"])
    with pytest.raises(UserError, match=r"3x32x32.*--set evaluate.evaluator=inception"):
        generation_metrics(load_recipe(write_recipe(tmp_path, evaluator="mnist")))


def test_missing_sets_name_the_command_that_makes_them(tmp_path, mnist):
    recipe = load_recipe(write_recipe(tmp_path))
    with pytest.raises(UserError, match="dpt-scale sample"):
        generation_metrics(recipe)
    write_set(tmp_path / "run" / "samples", mnist["train"][:8])
    with pytest.raises(UserError, match="dpt-scale data import"):
        generation_metrics(recipe)


def test_inception_features_of_grayscale_and_rgb_images(tmp_path, mnist, monkeypatch):
    """The inception evaluator with randomly initialised weights (the real file cannot be
    downloaded here): 2048-d features, grayscale read as RGB, no logits."""
    from torch_fidelity import feature_extractor_inceptionv3 as tf_inception

    with monkeypatch.context() as patch:  # build the network once without any weights file
        patch.setattr(tf_inception, "load_state_dict_from_url", lambda *a, **k: {})
        patch.setattr(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
        torch.manual_seed(0)
        network = tf_inception.FeatureExtractorInceptionV3("random", ["2048"])
    weights = tmp_path / "random_inception.pth"
    torch.save(network.state_dict(), weights)

    cfg = Evaluate(evaluator="inception", inception_weights=str(weights))
    write_set(tmp_path / "val", mnist["val"][:4])
    evaluator = EVALUATORS["inception"](cfg, Manifest.load(tmp_path / "val"), torch.device("cpu"))
    gray = torch.from_numpy(mnist["val"][0][1])[None, None]  # one image: Inception costs ~0.1 s each here
    features, logits = evaluator(gray)
    assert evaluator.name == "inception" and features.shape == (1, 2048) and logits is None
    assert features.abs().sum() > 0 and torch.equal(features, evaluator(gray.repeat(1, 3, 1, 1))[0])


def test_an_evaluator_without_class_head_reports_no_conditional_accuracy(tmp_path, mnist, monkeypatch):
    """As inception: features only (here the mnist evaluator's, to keep the test fast)."""
    def features_only(cfg, reference, device):
        evaluator = EVALUATORS["mnist"](cfg, reference, device)
        return dataclasses.replace(evaluator, extract=lambda images: (evaluator(images)[0], None), classes=None)

    monkeypatch.setitem(EVALUATORS, "inception", features_only)
    write_set(tmp_path / "data" / "val", mnist["val"][:40])
    write_set(tmp_path / "run" / "samples", mnist["train"][:40])
    metrics = generation_metrics(load_recipe(write_recipe(tmp_path, evaluator="inception")))
    assert metrics["conditional_accuracy"] is None and metrics["samples"] == 40 and metrics["fid"] < 50


def test_the_shipped_mnist_evaluator_scores_its_recorded_accuracy(mnist):
    from dpt_scale.models.classifier import load_classifier

    path = REPO / "dpt_scale" / "assets" / "mnist_evaluator.pt"
    model = load_classifier(path)
    images = torch.from_numpy(np.stack([a for _, a, _ in mnist["val"]]))[:, None]
    labels = torch.tensor([c for _, _, c in mnist["val"]])
    with torch.no_grad():
        top1 = (model(images).argmax(1) == labels).float().mean().item()
    assert top1 >= 0.985 and top1 == pytest.approx(torch.load(path, weights_only=False)["val_top1"], abs=1e-6)
    assert path.stat().st_size < 3e6


def test_in_training_fid_is_logged_from_the_ema_model(tmp_path, mnist):
    """train-diffusion with diffusion.fid_samples scores its EMA samples at every sample_every step
    against the reference (and writes the grid), through the same evaluator as `evaluate`."""
    write_set(tmp_path / "data" / "train", mnist["train"][:200])
    write_set(tmp_path / "data" / "val", mnist["val"][:200])
    recipe = tmp_path / "train.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "fid-probe", "out": str(tmp_path / "run"), "data": {"root": str(tmp_path / "data"),
                                                                    "loader": {"workers": 0, "streams": 2}},
        "classifier": {"pseudo_label": {"workers": 0}}, "evaluate": {"kid_subset_size": 50},
        "diffusion": {"model": {"size": "tiny", "patch_size": 4}, "labels": "ground_truth", "fid_samples": 60,
                      "train": {"steps": 2, "micro_batch": 8, "sample_every": 1, "checkpoint_every": 2}}}))
    result = run_cli("-q", "train-diffusion", str(recipe))
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(l) for l in (tmp_path / "run" / "diffusion" / "fid.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [1, 2]
    assert all(l["samples"] == 60 and l["fid"] > 0 and 0 <= l["conditional_accuracy"] <= 1 for l in lines)
    assert (tmp_path / "run" / "diffusion" / "samples" / "step-00000002.png").is_file()


def test_diffusion_probe_samples_the_ema_weights_and_scores_them(tmp_path, mnist):
    """The stage-2 probe alone, outside a trainer: the grid and the FID come from the EMA weights it
    is handed (not the model being trained), the same weights give the same grid, and the FID line
    says how many unguided samples it scored and with which evaluator."""
    import torch.distributed as dist

    from dpt_scale.diffusion.probe import GRID_PER_CLASS, DiffusionProbe
    from dpt_scale.diffusion.schedules import build_schedule
    from dpt_scale.engine.metrics import Metrics
    from dpt_scale.models import build_uvit

    write_set(tmp_path / "data" / "val", mnist["val"][:200])
    recipe = load_recipe(None, [f"out={tmp_path / 'run'}", f"data.root={tmp_path / 'data'}",
                                "classifier.pseudo_label.workers=0", "evaluate.kid_subset_size=20",
                                "diffusion.fid_samples=30", "diffusion.train.sample_every=1", "sample.batch=16"])
    settings = dict(size="tiny", img_size=28, patch_size=4, in_chans=1, num_classes=10)
    classes = [str(c) for c in range(10)]

    class Trainer:  # what the probe reads of the trainer
        rank, device = 0, torch.device("cpu")
        metrics = Metrics(tmp_path, 3, 0, enabled=False)  # no trackers

        def __init__(self, seed):
            torch.manual_seed(seed)
            weights = build_uvit(**settings).state_dict()
            self.ema = type("EMA", (), {"full_state_dict": lambda _: weights})()

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        probe = DiffusionProbe(recipe, settings, build_schedule(recipe.diffusion.schedule), classes, None,
                               tmp_path / "diffusion")
        grids = {}
        for step, seed in [(1, 0), (2, 0), (3, 1)]:
            probe(Trainer(seed), step)
            grids[step] = np.asarray(Image.open(tmp_path / "diffusion" / "samples" / f"step-{step:08d}.png"))
    finally:
        dist.destroy_process_group()
    assert grids[1].shape[:2] == (10 * 30 + 2, GRID_PER_CLASS * 30 + 2)  # one row per class, 2 px padding
    assert np.array_equal(grids[1], grids[2]) and not np.array_equal(grids[1], grids[3])
    lines = [json.loads(l) for l in (tmp_path / "diffusion" / "fid.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [1, 2, 3] and lines[0]["fid"] == pytest.approx(lines[1]["fid"])
    assert all(l["samples"] == 30 and l["evaluator"] == "mnist" and l["fid"] > 0 for l in lines)
