"""Every recipe key against values just outside what it takes: through the real `--set` path and
the real file loader, each ends in a Recipe or in one RecipeError naming the key, never another
exception. The boundary cases run for every key; hypothesis adds seeded random text on top."""
from __future__ import annotations

import dataclasses
import math

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dpt_scale.errors import RecipeError
from dpt_scale.recipe import Recipe, load_recipe
from dpt_scale.recipe.load import all_keys

LEAVES = [k for k in all_keys() if not dataclasses.is_dataclass(
    __import__("dpt_scale.recipe.load", fromlist=["_type_at"])._type_at(Recipe, k.split(".")))]
BOUNDARY = [".nan", ".inf", "-.inf", "nan", "1e400", "-1", "0", "-0.0", "1e-3", "2e-3", "10000000000000000000000",
            "''", "", "ü", "no", "yes", "null", "[]", "[1]", "[1, 2, 3]", "[.nan, 0.5]", "[0.5, .inf]", "{}", "{a: 1}",
            "true", "0x10", "1_000", "'007'", "-", "~", "[[1]]"]


def outcome(load) -> Recipe | None:
    try:
        return load()
    except RecipeError as exc:
        return exc


def assert_sound(key: str, result) -> None:
    if isinstance(result, RecipeError):
        message = str(result)
        assert "\n" not in message and key.split(".")[-1] in message, message
        return
    flat = {}
    for name, value in _walk(dataclasses.asdict(result)):
        flat[name] = value
        if isinstance(value, float):
            assert math.isfinite(value), f"{key}: accepted a non-finite {name}={value}"
    assert result.out.strip(), f"{key}: accepted an empty out"


def _walk(tree: dict, prefix: str = ""):
    for name, value in tree.items():
        if isinstance(value, dict) and name not in ("deepspeed", "kwargs", "supervised"):
            yield from _walk(value, f"{prefix}{name}.")
        elif isinstance(value, list):
            for i, v in enumerate(value):
                yield f"{prefix}{name}[{i}]", v
        else:
            yield prefix + name, value


@pytest.mark.parametrize("key", LEAVES)
def test_every_key_takes_or_refuses_boundary_values_in_one_line(key, tmp_path):
    for raw in BOUNDARY:
        assert_sound(key, outcome(lambda: load_recipe(None, [f"{key}={raw}"])))
        path = tmp_path / "r.yaml"
        try:
            value = yaml.safe_load(raw) if raw else None
        except yaml.YAMLError:
            continue
        node: dict = {}
        *parents, leaf = key.split(".")
        at = node
        for part in parents:
            at = at.setdefault(part, {})
        at[leaf] = value
        path.write_text(yaml.safe_dump(node, allow_unicode=True))
        assert_sound(key, outcome(lambda: load_recipe(path)))


@settings(max_examples=300, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=st.sampled_from(LEAVES), raw=st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=12))
def test_random_text_for_any_key_is_taken_or_refused_in_one_line(key, raw):
    assert_sound(key, outcome(lambda: load_recipe(None, [f"{key}={raw}"])))
