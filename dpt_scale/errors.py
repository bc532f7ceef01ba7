"""Errors a user can fix. The CLI prints them as one line, with no traceback."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


class UserError(Exception):
    """Bad input: the message names the problem and the fix, on one line."""


class RecipeError(UserError):
    """A recipe that cannot be read, or keys/values that do not fit the schema."""


class ShardError(UserError):
    """A shard set that is missing, truncated, corrupt or does not match its manifest."""


def check_writable(folder: str | os.PathLike, change: str) -> None:
    """Refuse, before any work and leaving nothing behind, an output folder that cannot be made or
    written; `change` says how to name another one (e.g. "pass --set out=DIR"). The nearest existing
    folder is probed by making and removing a folder in it: os.access can say yes where writing then
    fails (network filesystems with rules of their own, e.g. root-squashed NFS; /proc)."""
    folder = Path(folder)
    existing = next(p for p in (folder, *folder.parents) if p.exists())  # a relative path ends at "."
    problem = "is a file, not a folder" if not existing.is_dir() else None
    if problem is None:
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".dpt-scale-probe-", dir=existing))
        except OSError as exc:
            problem = f"is not writable ({os.strerror(exc.errno).lower()})"
    if problem:
        raise UserError(f"cannot write {folder}: {existing} {problem}; {change} with a folder you can write")
