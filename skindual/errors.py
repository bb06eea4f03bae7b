"""User-facing errors.

A `UserError` is a mistake the user can fix (a bad flag, a missing file, a bad
credential).  Jobs catch it at the top level and print its one-line message
without a traceback (see `skindual.cli.run_job`).  Everything else is a bug and
keeps its traceback.
"""


class UserError(Exception):
    """A mistake in the user's input: the message names the file, flag or value and says what to do."""


class DataError(UserError):
    """Bad input data: a missing or unreadable image, a bad mask, an unknown class."""


class StorageError(UserError):
    """A storage location that cannot be used: bad credentials, missing bucket, unreachable endpoint."""
