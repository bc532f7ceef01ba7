"""Errors a user can fix. The CLI prints them as one line, with no traceback."""


class UserError(Exception):
    """Bad input: the message names the problem and the fix, on one line."""


class RecipeError(UserError):
    """A recipe that cannot be read, or keys/values that do not fit the schema."""


class ShardError(UserError):
    """A shard set that is missing, truncated, corrupt or does not match its manifest."""
