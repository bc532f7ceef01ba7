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
