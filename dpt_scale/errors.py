"""Errors a user can fix. The CLI prints them as one line, with no traceback."""
from __future__ import annotations

import os
from pathlib import Path


class UserError(Exception):
    """Bad input: the message names the problem and the fix, on one line."""


class RecipeError(UserError):
    """A recipe that cannot be read, or keys/values that do not fit the schema."""


class ShardError(UserError):
    """A shard set that is missing, truncated, corrupt or does not match its manifest."""


def check_writable(folder: str | os.PathLike, change: str) -> None:
    """Refuse, before any work and without creating anything, an output folder that cannot be made
    or written; `change` says how to name another one (e.g. "pass --set out=DIR")."""
    folder = Path(folder)
    existing = next(p for p in (folder, *folder.parents) if p.exists())  # a relative path ends at "."
    problem = ("is a file, not a folder" if not existing.is_dir() else
               "is not writable" if not os.access(existing, os.W_OK) else None)
    if problem:
        raise UserError(f"cannot write {folder}: {existing} {problem}; {change} with a folder you can write")
