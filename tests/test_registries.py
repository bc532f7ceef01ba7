"""The recipe schema names its choices without importing torch (a bad recipe is reported before
the slow imports); each choice list must stay the registry it stands for."""
from __future__ import annotations

import typing

import pytest

from dpt_scale.recipe import schema


def choices(cls: type, field: str) -> set:
    hint = typing.get_type_hints(cls)[field]
    args = typing.get_args(hint)
    literal = next((a for a in args if typing.get_origin(a) is typing.Literal), hint)  # Literal[...] | None
    return set(typing.get_args(literal))


def registry(name: str) -> set:
    module, attr = name.rsplit(".", 1)
    return set(getattr(__import__(module, fromlist=[attr]), attr))


@pytest.mark.parametrize("cls, field, registry_name, extra", [
    (schema.Data, "source", "dpt_scale.data.sources.SOURCES", set()),
    (schema.UViTModel, "size", "dpt_scale.models.uvit.UVIT_SIZES", set()),
    (schema.UViTModel, "attention", "dpt_scale.models.attention.BACKENDS", {"auto"}),
    (schema.Diffusion, "schedule", "dpt_scale.diffusion.schedules.SCHEDULES", set()),
    (schema.Classifier, "method", "dpt_scale.classification.METHODS", set()),
    (schema.Sample, "solver", "dpt_scale.diffusion.sampling.SOLVERS", set()),
    (schema.Evaluate, "evaluator", "dpt_scale.metrics.evaluators.EVALUATORS", {"auto"}),
])
def test_schema_choices_are_the_registry(cls, field, registry_name, extra):
    assert choices(cls, field) == registry(registry_name) | extra


def test_data_import_offers_every_source():
    from dpt_scale.cli import build_parser

    parser = build_parser()
    action = next(a for a in parser._subparsers._group_actions[0].choices["data"]._subparsers._group_actions[0]
                  .choices["import"]._actions if a.dest == "source")
    assert set(action.choices) == registry("dpt_scale.data.sources.SOURCES")


def _imports(path) -> set[str]:
    """The dpt_scale modules a file imports, at module level or inside functions."""
    import ast
    import importlib.util

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("dpt_scale")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("dpt_scale"):
            for alias in node.names:  # `from dpt_scale.cli import data` imports the module dpt_scale.cli.data
                name = f"{node.module}.{alias.name}"
                found.add(name if importlib.util.find_spec(node.module).submodule_search_locations is not None
                          and importlib.util.find_spec(name) is not None else node.module)
    return found


def test_no_module_imports_itself_back():
    """No import circle, lazy imports included: each layer reads only those below it."""
    from pathlib import Path

    import dpt_scale

    root = Path(dpt_scale.__file__).parent
    modules = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    graph = {name: _imports(path) & modules.keys() - {name} for name, path in modules.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: finished

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in sorted(graph[name]):
            if state.get(dep) == 1:
                circle = path[path.index(dep):] + [dep] if dep in path else [name, dep]
                raise AssertionError("import circle: " + " -> ".join(circle))
            if dep not in state:
                visit(dep, path + [dep])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert "dpt_scale.cli" in graph and "dpt_scale.stage_job" in graph
