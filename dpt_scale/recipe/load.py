"""Load a recipe: YAML file(s) -> base inheritance -> `--set` overrides -> typed `Recipe`.

Written by hand rather than with OmegaConf or pydantic because every mistake must come out as one
line naming the full key path, the file or flag it came from and the closest valid key; and a
`--set` value is parsed with the type of the key it targets (`--set name=007` stays a string).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import operator
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from dpt_scale.errors import RecipeError
from dpt_scale.recipe.rules import check_rules
from dpt_scale.recipe.schema import Recipe, Train

BASE_KEY = "base"  # a recipe may name a base recipe (path relative to itself) that it overrides
INT64 = 2**63
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def load_recipe(path: str | os.PathLike | None = None, overrides: typing.Sequence[str] = (),
                preset: dict[str, tuple[Any, str]] | None = None) -> Recipe:
    """Build a recipe from an optional file, then `preset` (command-line flags: key path -> value
    and the flag's name), then `--set KEY=VALUE` overrides, later ones winning."""
    layers = _read_chain(Path(path), seen=()) if path is not None else []
    for key, (value, flag) in (preset or {}).items():
        layers.append((_check(Recipe, _nest(key, value), flag), flag))
    for item in overrides:
        key, value = _split_override(item)
        where = f"--set {item}" if item.isprintable() else f"--set {item!r}"  # an error stays one line
        layers.append((_check(Recipe, _nest(key, value), where), where))
    merged: dict = {}
    for layer, _ in layers:
        _merge(merged, layer)
    recipe = _build(Recipe, merged)
    retrain = recipe.classifier.retrain
    if isinstance(retrain.train, dict):  # stage 4's keys, over stage 1's (its default)
        stage1 = dataclasses.asdict(recipe.classifier.train)
        _merge(stage1, retrain.train)
        retrain.train = Train(**stage1)
    check_rules(recipe)
    return recipe


def recipe_dict(recipe) -> dict:
    return dataclasses.asdict(recipe)


def flatten(tree: dict, prefix: str = "") -> dict:
    """A nested recipe dict as {dotted key: value}; a raw DeepSpeed block stays one value."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value and key != "deepspeed":
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def dump_recipe(recipe) -> str:
    return yaml.safe_dump(recipe_dict(recipe), sort_keys=False, default_flow_style=False)


def save_recipe(recipe, path: str | os.PathLike) -> None:
    """Write the resolved recipe (atomically: temporary name, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(dump_recipe(recipe))
    os.replace(tmp, path)


# ---------------------------------------------------------------- reading files

def _read_chain(path: Path, seen: tuple[Path, ...]) -> list[tuple[dict, str]]:
    if not path.is_file():
        raise RecipeError(f"recipe not found: {path}" + (f" (named as base by {seen[-1]})" if seen else "")
                          + "; check the path (the shipped recipes are in recipes/)")
    if path.resolve() in seen:
        raise RecipeError(f"recipe {path}: base recipes form a cycle ({' -> '.join(map(str, seen))} -> {path})")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(f"recipe {path}: not UTF-8 text (byte {raw[exc.start]:#04x} at offset {exc.start}); "
                          "save it as UTF-8") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except _DuplicateKey as exc:
        raise RecipeError(f"recipe {path}: key '{exc.key}' is given twice (lines {exc.first} and {exc.second}); "
                          "keep one (a second block would silently replace the first)") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError(f"recipe {path}: malformed YAML{where}: {problem}") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {path}: expected a mapping of keys at the top, got {type(data).__name__}")
    chain = []
    base = data.pop(BASE_KEY, None)
    if base is not None:
        if not isinstance(base, str):
            raise RecipeError(f"recipe {path}: '{BASE_KEY}' must be a path to another recipe, got {base!r}")
        chain = _read_chain(path.parent / base, seen + (path.resolve(),))
    return chain + [(_check(Recipe, data, f"recipe {path}"), f"recipe {path}")]


class _DuplicateKey(Exception):
    def __init__(self, key, first: int, second: int):
        super().__init__(key)
        self.key, self.first, self.second = key, first, second


class _StrictLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key repeated in one mapping is an error (PyYAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            self.flatten_mapping(node)
            lines = {}
            for key_node, _ in node.value:
                key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
                if key is not None and key in lines and key != "<<":
                    raise _DuplicateKey(key, lines[key], key_node.start_mark.line + 1)
                lines[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def _split_override(item: str) -> tuple[str, Any]:
    key, eq, raw = item.partition("=")
    if not eq or not key.strip() or not key.isprintable():
        shown = item if item.isprintable() else repr(item)
        raise RecipeError(f"--set {shown}: expected KEY=VALUE, e.g. --set data.image_size=64")
    key = key.strip()
    target = _type_at(Recipe, key.split("."))
    if target is not None and _accepts_str(target) and not _accepts_none(target):
        return key, raw  # a string key takes the text as written
    try:
        return key, yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        return key, raw


# ---------------------------------------------------------------- checking against the schema

def _check(cls: type, data: Any, where: str, prefix: str = "") -> dict:
    """Return `data` with values coerced to the schema's types; raise on unknown keys or bad types."""
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: '{prefix.rstrip('.') or '<top>'}' must be a mapping of keys, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    out = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in fields:
            raise RecipeError(f"{where}: unknown key '{path}'{_suggest(path)}")
        out[key] = _coerce(hints[key], value, fields[key].metadata, where, path)
    return out


def _coerce(tp: Any, value: Any, meta: typing.Mapping, where: str, path: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _check(tp, value, where, path + ".")
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, meta, where, path)
            except RecipeError as exc:
                errors.append(exc)
        raise errors[0]
    if origin is Literal:
        if value in args and type(value) in {type(a) for a in args}:
            return value
        raise RecipeError(f"{where}: '{path}' must be one of {', '.join(map(repr, args))}; got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(f"{where}: '{path}' expects a list, got {value!r} ({type(value).__name__})")
        if "length" in meta and len(value) != meta["length"]:
            raise RecipeError(f"{where}: '{path}' takes exactly {meta['length']} values, got {len(value)}: {value!r}")
        items = [_coerce(args[0], v, meta.get("items", {}), where, f"{path}[{i}]") for i, v in enumerate(value)]
        if "sum_max" in meta and sum(items) > meta["sum_max"]:
            raise RecipeError(f"{where}: the values of '{path}' add up to {sum(items):g}, more than {meta['sum_max']}")
        return items
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: '{path}' expects a mapping, got {value!r}")
        return value
    if tp is Any:
        return value
    if tp is float and isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        value = float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string; the field says it is a number
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(tp)
    if ok is None:
        raise TypeError(f"schema type {tp!r} of '{path}' is not supported by the loader")
    if not ok:
        raise RecipeError(f"{where}: '{path}' expects {tp.__name__}, got {value!r} ({type(value).__name__})")
    value = float(value) if tp is float else value
    if tp is int and not -INT64 <= value < INT64:  # torch, numpy and DeepSpeed take 64-bit integers
        raise RecipeError(f"{where}: '{path}' is too large, got {value!r}; give a value below 2**63")
    if tp is float and not math.isfinite(value):
        raise RecipeError(f"{where}: '{path}' must be a finite number, got {value!r}")
    if tp is str and meta.get("nonempty") and not value.strip():
        raise RecipeError(f"{where}: '{path}' must not be empty")
    for bound, holds, says in (("min", operator.ge, "at least"), ("max", operator.le, "at most"),
                               ("above", operator.gt, "above"), ("below", operator.lt, "below")):
        if bound in meta and not holds(value, meta[bound]):
            raise RecipeError(f"{where}: '{path}' must be {says} {meta[bound]}, got {value!r}")
    return value


def _build(cls: type, data: dict):
    hints = typing.get_type_hints(cls)
    return cls(**{name: _build(hints[name], value) if dataclasses.is_dataclass(hints[name]) else value
                  for name, value in data.items()})


# ---------------------------------------------------------------- key paths

def _type_at(cls: type, parts: list[str]) -> Any:
    """The schema type at a dotted key path, or None if the path does not exist."""
    tp: Any = cls
    for part in parts:
        if not dataclasses.is_dataclass(tp):
            return None
        hints = typing.get_type_hints(tp)
        if part not in hints:
            return None
        tp = hints[part]
    return tp


def _accepts_str(tp: Any) -> bool:
    return tp is str or (typing.get_origin(tp) in (Union, types.UnionType) and str in typing.get_args(tp))


def _accepts_none(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType) and type(None) in typing.get_args(tp)


def all_keys(cls: type = Recipe, prefix: str = "") -> list[str]:
    keys = []
    for name, tp in typing.get_type_hints(cls).items():
        keys.append(prefix + name)
        if dataclasses.is_dataclass(tp):
            keys.extend(all_keys(tp, f"{prefix}{name}."))
    return keys


def _suggest(path: str) -> str:
    keys = all_keys()
    leaf = path.rsplit(".", 1)[-1]
    same_leaf = [k for k in keys if k.rsplit(".", 1)[-1] == leaf]
    close = same_leaf or difflib.get_close_matches(path, keys, n=1, cutoff=0.6) or \
        [k for k in keys if difflib.get_close_matches(leaf, [k.rsplit(".", 1)[-1]], cutoff=0.75)][:1]
    if close:
        return f" (did you mean '{close[0]}'?)"
    parent = path.rpartition(".")[0]
    siblings = [k for k in keys if k.rpartition(".")[0] == parent]
    return f" (valid keys here: {', '.join(siblings)})"


def _nest(dotted: str, value: Any) -> dict:
    out: Any = value
    for part in reversed(dotted.split(".")):
        out = {part: out}
    return out


def _merge(into: dict, layer: dict) -> None:
    for key, value in layer.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value
