"""The command registry: each module of this package registers its subcommands with `@command`,
and `dpt_scale.cli` builds the parser from COMMANDS."""
from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

from dpt_scale.recipe import dump_recipe, load_recipe


@dataclass
class Command:
    name: str  # "data import": group and subcommand, or a single word
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]


COMMANDS: dict[str, Command] = {}


def command(name: str, help: str, arguments: Callable[[argparse.ArgumentParser], None]):
    def register(run):
        COMMANDS[name] = Command(name, help, arguments, run)
        return run
    return register


def count(least: int = 1, most: int = 2**31):
    """An argparse type for a count flag (-n, --workers, ...): a whole number in [least, most],
    else argparse's one-line usage error naming the flag."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if not least <= value <= most:
            raise argparse.ArgumentTypeError(f"must be {least} to {most}, got {value}")
        return value
    parse.__name__ = "count"  # argparse names the type in its message
    return parse


class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints the usage block too; one line is enough
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def recipe_arguments(parser: argparse.ArgumentParser, required: bool = False) -> None:
    if required:
        parser.add_argument("recipe", metavar="RECIPE", help="YAML recipe (see recipes/)")
    else:
        parser.add_argument("--recipe", metavar="RECIPE", help="YAML recipe; flags and --set override it")
    parser.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
                        help="override a recipe key, e.g. --set data.image_size=64 (repeatable)")


def resolve_recipe(args: argparse.Namespace, preset: dict | None = None):
    """Load the recipe with flags and overrides applied, and print it."""
    recipe = load_recipe(args.recipe, args.overrides, preset)
    if not getattr(args, "quiet", False):
        print("# resolved recipe\n" + dump_recipe(recipe), flush=True)
    return recipe
