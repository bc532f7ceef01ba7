"""A DataLoader worker's exception reaches the main process wrapped in the worker's traceback. The
readers hand a user's error over as data instead, and the main process raises it as it was: one
line naming the shard and member, as if the worker had been the main process."""
from __future__ import annotations

from dpt_scale.errors import ShardError, UserError


def as_item(exc: UserError) -> dict:
    return {"error": (isinstance(exc, ShardError), str(exc))}


def raise_if_error(item: dict) -> None:
    if "error" in item:
        is_shard_error, message = item["error"]
        raise (ShardError if is_shard_error else UserError)(message)
