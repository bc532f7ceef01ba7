"""Recipes: typed loading, base inheritance, --set overrides, and one-line errors."""
import re

import pytest
import yaml

from dpt_scale.errors import RecipeError
from dpt_scale.recipe import dump_recipe, load_recipe
from helpers import assert_one_line_error, run_cli


def write(path, text):
    path.write_text(text)
    return path


def test_defaults_without_a_file():
    recipe = load_recipe()
    assert recipe.data.source == "mnist" and recipe.data.shard_samples == 1000
    assert recipe.data_root == "runs/dpt/data"


def test_base_recipe_then_file_then_flags_then_set(tmp_path):
    write(tmp_path / "base.yaml", "name: base\nseed: 1\ndata:\n  image_size: 32\n  labelled:\n    per_class: 2\n")
    child = write(tmp_path / "child.yaml", "base: base.yaml\nname: child\ndata:\n  labelled:\n    seed: 7\n")
    recipe = load_recipe(child, ["data.labelled.per_class=5", "seed=3"], {"data.root": ("/x", "--out")})
    assert recipe.name == "child"  # the file overrides its base
    assert recipe.data.image_size == 32  # inherited
    assert recipe.data.labelled.seed == 7 and recipe.data.labelled.per_class == 5  # merged, then --set
    assert recipe.seed == 3 and recipe.data.root == "/x"


def test_set_values_take_the_type_of_their_key():
    recipe = load_recipe(None, ["name=007", "data.val_fraction=0", "data.paths=[a, b]", "data.image_size=null"])
    assert recipe.name == "007"  # a string key keeps the text
    assert recipe.data.val_fraction == 0.0 and isinstance(recipe.data.val_fraction, float)
    assert recipe.data.paths == ["a", "b"] and recipe.data.image_size is None


def test_resolved_recipe_round_trips(tmp_path):
    recipe = load_recipe(None, ["data.image_size=64", "data.loader.on_corrupt=skip"])
    again = load_recipe(write(tmp_path / "r.yaml", dump_recipe(recipe)))
    assert again == recipe


@pytest.mark.parametrize("text, fragments", [
    ("data:\n  shard_sampls: 3\n", ["unknown key 'data.shard_sampls'", "did you mean 'data.shard_samples'"]),
    ("shard_samples: 3\n", ["unknown key 'shard_samples'", "did you mean 'data.shard_samples'"]),
    ("data:\n  image_size: big\n", ["'data.image_size' expects int", "'big'"]),
    ("data:\n  format: gif\n", ["'data.format' must be one of", "'gif'"]),
    ("data:\n  quality: 0\n", ["'data.quality' must be at least 1"]),
    ("data: [1, 2]\n", ["'data' must be a mapping"]),
    ("data:\n  image_size: 3\n bad", ["malformed YAML at line"]),
    ("base: nowhere.yaml\n", ["recipe not found", "nowhere.yaml"]),
])
def test_recipe_errors_name_the_key_and_the_fix(tmp_path, text, fragments):
    path = write(tmp_path / "r.yaml", text)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    for fragment in fragments:
        assert fragment in message


def test_base_cycle_is_an_error(tmp_path):
    write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(RecipeError, match="cycle"):
        load_recipe(tmp_path / "a.yaml")


@pytest.mark.parametrize("override, fragment", [
    ("data.labeled.per_class=2", "did you mean 'data.labelled'"),
    ("data.shard_samples=many", "'data.shard_samples' expects int, got 'many'"),
    ("data", "expected KEY=VALUE"),
])
def test_set_errors(override, fragment):
    with pytest.raises(RecipeError, match=fragment) as info:
        load_recipe(None, [override])
    assert f"--set {override}" in str(info.value)


def test_cli_prints_one_line_for_recipe_errors(tmp_path):
    result = run_cli("data", "import", "mnist", "--out", str(tmp_path / "d"), "--set", "data.shard_sampls=3")
    assert result.returncode == 2
    assert_one_line_error(result, "unknown key 'data.shard_sampls'", "data.shard_samples")
    assert not (tmp_path / "d").exists()  # nothing was written
    result = run_cli("data", "import", "mnist", "--recipe", str(tmp_path / "missing.yaml"))
    assert_one_line_error(result, "recipe not found", "missing.yaml")


def test_cli_prints_and_saves_the_resolved_recipe(tmp_path):
    recipe_file = write(tmp_path / "r.yaml", "name: demo\ndata:\n  shard_samples: 4000\n")
    out = tmp_path / "data"
    result = run_cli("data", "import", "mnist", "--recipe", str(recipe_file), "--out", str(out),
                     "--set", "data.format=webp", "--workers", "2")
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout.split("# resolved recipe\n", 1)[1].split("\n\n", 1)[0])
    saved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert printed == saved
    assert saved["name"] == "demo" and saved["data"]["shard_samples"] == 4000
    assert saved["data"]["format"] == "webp" and saved["data"]["root"] == str(out)


@pytest.mark.parametrize("override, fragment", [
    ("sample.guidance=.nan", "'sample.guidance' must be a finite number"),
    ("diffusion.train.lr=.inf", "'diffusion.train.lr' must be a finite number"),
    ("diffusion.train.betas=[2.0, 0.5]", "'diffusion.train.betas[0]' must be below 1.0"),
    ("diffusion.train.betas=[0.9]", "'diffusion.train.betas' takes exactly 2 values"),
    ("out=", "'out' must not be empty"),
    ("classifier.retrain.pseudo_fraction=[0.6, 0.6]", "add up to 1.2, more than 1.0"),
])
def test_values_outside_a_key_rules_are_refused(override, fragment):
    with pytest.raises(RecipeError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        load_recipe(None, [override])


@pytest.mark.parametrize("overrides, fragment", [
    (["diffusion.train.warmup_steps=2000", "diffusion.train.steps=1000"],
     "'diffusion.train.warmup_steps' 2000 is more than 'diffusion.train.steps' 1000"),
    (["classifier.train.offload=cpu", "classifier.train.zero_stage=0"], "'classifier.train.offload' cpu needs ZeRO"),
    (["pretrain.train.ema_decay=1.0", "pretrain.train.ema_warmup=false"], "keeps the EMA at its first weights"),
    (["diffusion.train.global_batch=100", "diffusion.train.micro_batch=64"],
     "'diffusion.train.global_batch' 100 is not a multiple of micro_batch 64"),
    (["diffusion.train.global_batch=128", "diffusion.train.micro_batch=32", "diffusion.train.grad_accum=3"],
     "not a multiple of micro_batch 32 x grad_accum 3"),
    (["sample.steps=1001"], "'sample.steps' 1001 is more than the 1000 steps"),
    (["diffusion.fid_samples=500", "diffusion.train.sample_every=0"], "'diffusion.fid_samples' 500 is never used"),
    (["classifier.model.mean=[0.5, 0.5]"], "'classifier.model.mean' has 2 values"),
    (["data.channels=1", "classifier.model.std=[0.2, 0.2, 0.2]"], "'classifier.model.std' has 3 values; give one "
     "per image channel (1)"),
    (["classifier.model.mean=[0.5]", "classifier.model.std=[0.2, 0.2, 0.2]"], "'classifier.model.mean' has 1 values "
     "and 'classifier.model.std' 3"),
    (["seed=-1"], "'seed' must be at least 0"),
    (["diffusion.train.steps=99999999999999999999"], "'diffusion.train.steps' is too large"),
])
def test_keys_that_must_agree_are_checked_when_the_recipe_loads(overrides, fragment):
    with pytest.raises(RecipeError, match=re.escape(fragment)) as caught:
        load_recipe(None, overrides)
    assert "\n" not in str(caught.value)


def test_stage_four_training_keys_change_stage_one_settings():
    recipe = load_recipe(None, ["classifier.train.lr=0.01", "classifier.retrain.train.steps=5",
                                "classifier.retrain.train.deepspeed={\"wall_clock_breakdown\": true}"])
    retrain, stage1 = recipe.classifier.retrain.train, recipe.classifier.train
    assert (retrain.steps, retrain.lr, retrain.micro_batch) == (5, 0.01, stage1.micro_batch)
    assert retrain.deepspeed == {"wall_clock_breakdown": True} and stage1.steps != 5
    assert load_recipe(None, []).classifier.retrain.train is None  # unset: stage 1's, as they are


def test_the_solver_step_bound_is_the_schedules_own():
    from dpt_scale.diffusion.schedules import SCHEDULES
    from dpt_scale.recipe.rules import SCHEDULE_STEPS

    assert {schedule().num_timesteps for schedule in SCHEDULES.values()} == {SCHEDULE_STEPS}
    load_recipe(None, [f"sample.steps={SCHEDULE_STEPS}", "sample.solver=ddpm"])  # the bound itself is fine


def test_a_float_yaml_reads_as_text_takes_the_key_type():
    assert load_recipe(None, ["diffusion.train.lr=2e-3"]).diffusion.train.lr == 0.002


def test_recipe_files_are_read_strictly(tmp_path):
    twice = write(tmp_path / "twice.yaml", "name: x\nsample: {steps: 3}\nseed: 1\nsample:\n  guidance: 2\n")
    with pytest.raises(RecipeError, match="key 'sample' is given twice \\(lines 2 and 4\\)"):
        load_recipe(twice)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(RecipeError, match="not UTF-8 text \\(byte 0xe9 at offset 9\\)"):
        load_recipe(latin)
    assert load_recipe(write(tmp_path / "e.yaml", "diffusion:\n  train:\n    lr: 2e-3\n")).diffusion.train.lr == 0.002
