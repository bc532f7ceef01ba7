"""A valid evaluator on any data set: `auto` never reads another data set's images through the
shipped MNIST evaluator, `make-evaluator` trains one on a set's true labels that `auto` then finds,
its own top-1 travels with it, and the within-class spread tells varied samples from near-copies."""
import pytest
import torch
import yaml
from test_generation_metrics import write_set

from dpt_scale.data.sources import SOURCES
from dpt_scale.metrics.generation import diversity, generation_metrics, within_class_spread
from dpt_scale.recipe import load_recipe
from dpt_scale.recipe.schema import Data
from helpers import assert_one_line_error, run_cli


@pytest.fixture(scope="module")
def mnist():
    return SOURCES["mnist"](Data()).splits


def other_digits(items):
    """Another 1x28x28 data set: the digits inverted (white ground), with their classes."""
    return [(f"other-{k}", 255 - a, c) for k, a, c in items]


def write_recipe(tmp_path, **evaluate):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({
        "name": "eval-test", "out": str(tmp_path / "run"), "data": {"root": str(tmp_path / "data"),
                                                                    "loader": {"workers": 0, "streams": 2}},
        "classifier": {"pseudo_label": {"workers": 0, "batch": 64}},
        "evaluate": {"kid_subset_size": 50, **evaluate}}))
    return path


def test_auto_refuses_the_shipped_evaluator_for_another_28px_set_and_finds_a_made_one(tmp_path, mnist):
    write_set(tmp_path / "data" / "train", other_digits(mnist["train"][:400]), source="idx")
    write_set(tmp_path / "data" / "val", other_digits(mnist["val"][:200]), source="idx")
    write_set(tmp_path / "run" / "samples", other_digits(mnist["val"][200:300]), source=None)
    path = write_recipe(tmp_path, trained={"steps": 60, "micro_batch": 32})
    result = run_cli("evaluate", str(path))
    assert_one_line_error(result, "no evaluator for these images", "dpt-scale make-evaluator")

    result = run_cli("-q", "make-evaluator", str(path))
    assert result.returncode == 0, result.stderr[-3000:]
    made = sorted((tmp_path / "data").glob("evaluator-*.pt"))
    assert len(made) == 1
    payload = torch.load(made[0], weights_only=False)
    assert payload["evaluation_only"] and payload["val_samples"] == 200 and 0.5 < payload["val_top1"] <= 1

    metrics = generation_metrics(load_recipe(path))
    assert metrics["evaluator"] == "trained" and metrics["evaluator_top1"] == payload["val_top1"]
    # real held-out images of the same set: the conditional accuracy of a good evaluator is high
    assert metrics["conditional_accuracy"] > 0.5 and metrics["spread_ratio"] == pytest.approx(1, abs=0.5)
    # the mnist evaluator may still be chosen by name; it says what it is reading
    result = run_cli("evaluate", str(path), "--set", "evaluate.evaluator=mnist")
    assert result.returncode == 0 and "trained on the embedded MNIST" in result.stderr


def test_near_copies_have_little_within_class_spread():
    torch.manual_seed(0)
    real = torch.randn(200, 8)
    labels = torch.arange(200) % 4
    varied = {"features": real, "labels": labels}

    class Fake:
        def __init__(self, features):
            self.features, self.labels = features, labels

    assert diversity(Fake(torch.randn(200, 8)), varied)["spread_ratio"] == pytest.approx(1, abs=0.25)
    copies = real[labels] + 0.01 * torch.randn(200, 8)  # one prototype per class, barely varied
    assert diversity(Fake(copies), varied)["spread_ratio"] < 0.01
    assert set(within_class_spread(real, labels)) == {0, 1, 2, 3}


def test_make_evaluator_refuses_a_set_without_labels_or_validation_images(tmp_path, mnist):
    write_set(tmp_path / "data" / "train", other_digits(mnist["train"][:40]), source="idx")
    assert_one_line_error(run_cli("make-evaluator", str(write_recipe(tmp_path))), "no validation shards")
    assert not list((tmp_path / "data").glob("evaluator-*"))
