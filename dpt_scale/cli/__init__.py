"""The `dpt-scale` command. Subcommands live in this package's modules and register themselves
with `@command`; this module only builds the parser and turns user errors into one line."""
from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

from dpt_scale.errors import UserError
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


class _Parser(argparse.ArgumentParser):
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


def build_parser() -> argparse.ArgumentParser:
    from dpt_scale.cli import data, shards, stages, submit  # noqa: F401  (importing registers their commands)

    # -q works before or after the subcommand: every parser knows it, the innermost given wins.
    quiet = _Parser(add_help=False)
    quiet.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                       help="print only warnings and errors")
    parser = _Parser(prog="dpt-scale", description="Dual Pseudo Training at scale.", parents=[quiet])
    top = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    for name, cmd in COMMANDS.items():
        group, _, sub = name.partition(" ")
        if sub:
            if group not in groups:
                groups[group] = top.add_parser(group, help=f"{group} commands").add_subparsers(
                    dest="subcommand", required=True, parser_class=_Parser, metavar="SUBCOMMAND")
            p = groups[group].add_parser(sub, help=cmd.help, description=cmd.help, parents=[quiet])
        else:
            p = top.add_parser(name, help=cmd.help, description=cmd.help, parents=[quiet])
        cmd.arguments(p)
        p.set_defaults(run=cmd.run)
    return parser


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        return message if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {message}"


def _drop_local_rank(argv: list[str]) -> list[str]:
    """The `deepspeed` launcher appends --local_rank=N; LOCAL_RANK in the environment says the same."""
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
        elif arg.split("=", 1)[0] in ("--local_rank", "--local-rank"):
            skip = "=" not in arg  # the value may come as the next argument
            value = arg.split("=", 1)[1] if "=" in arg else argv[i + 1]
            os.environ.setdefault("LOCAL_RANK", value)
        else:
            out.append(arg)
    return out


# A full disk (or quota, or file-size limit) is the user's to fix, and every command resumes after it.
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# So is a file or folder the command may not open or write (its permissions, an immutable flag, a
# read-only mount) that the checks before the work could not foresee, e.g. a stage's own folder.
_NOT_ALLOWED = (errno.EACCES, errno.EPERM, errno.EROFS)


def _dead_worker(exc: RuntimeError) -> str | None:
    """The short reason when a worker process of ours (an import or verify pool's, a DataLoader's)
    died under us, else None."""
    from concurrent.futures.process import BrokenProcessPool

    text = str(exc)
    if isinstance(exc, BrokenProcessPool) or text.startswith("DataLoader worker"):
        return text.splitlines()[0].rstrip(".")[:160] if text else type(exc).__name__
    return None


def _lost_rank(exc: RuntimeError) -> str | None:
    """The short reason when a collective failed because another rank went away, else None. gloo
    raises a plain RuntimeError naming the socket error; NCCL a DistBackendError."""
    from dpt_scale.distributed import rank_and_world

    if rank_and_world()[1] < 2:
        return None
    dist = sys.modules.get("torch.distributed")
    text = str(exc)
    for reason in ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "Connection refused"):
        if reason in text:
            return reason.lower()
    if dist is not None and isinstance(exc, getattr(dist, "DistError", ())):
        return text.splitlines()[0][:160] if text else type(exc).__name__
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(_drop_local_rank(sys.argv[1:] if argv is None else argv))
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    quiet = getattr(args, "quiet", False)
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, handlers=[handler], force=True)
    try:
        code = args.run(args) or 0
        from dpt_scale.distributed import leave_process_group

        leave_process_group()
        return code
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        died = _dead_worker(exc)
        if died is not None:
            print(f"error: a worker process died ({died}): it was killed, or ran out of memory; run the same command "
                  "again (with fewer workers if memory is short) and it resumes from what was finished",
                  file=sys.stderr)
            return 1
        reason = _lost_rank(exc)
        if reason is None:
            raise
        from dpt_scale.distributed import rank_and_world

        rank, world = rank_and_world()
        print(f"error: rank {rank} of {world} lost contact with another rank ({reason}): a rank died or was killed "
              "(see its log); run the same command again and it resumes from the last checkpoint", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `dpt-scale shards ls DIR | head`: the reader left, nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 1
    except OSError as exc:
        if exc.errno in _NOT_ALLOWED and exc.filename:
            print(f"error: {os.strerror(exc.errno).lower()}: {exc.filename}; give yourself access to it (or point "
                  "the output elsewhere) and run the same command again; finished work is kept and it resumes",
                  file=sys.stderr)
            return 2
        if exc.errno not in _NO_SPACE:
            raise
        where = f" writing {exc.filename}" if exc.filename else ""
        print(f"error: {os.strerror(exc.errno)}{where}: free space (or point the output elsewhere) and run the "
              "same command again; finished shards and checkpoints are kept and it resumes", file=sys.stderr)
        return 2
