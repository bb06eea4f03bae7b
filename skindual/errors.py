"""User-facing errors.

A `UserError` is a mistake the user can fix (a bad flag, a missing file, a bad
credential).  Jobs catch it at the top level and print its one-line message
without a traceback (see `skindual.cli.run_job`), also when it was raised in a Ray
task, actor or training worker and reaches the driver wrapped in Ray's own error
(`user_error_in`).  Everything else is a bug and keeps its traceback.
"""

import re

_WRAPPED = re.compile(r"^skindual\.errors\.(?:UserError|DataError|StorageError): (.+)$", re.MULTILINE)


class UserError(Exception):
    """A mistake in the user's input: the message names the file, flag or value and says what to do."""


class DataError(UserError):
    """Bad input data: a missing or unreadable image, a bad mask, an unknown class."""


class StorageError(UserError):
    """A storage location that cannot be used: bad credentials, missing bucket, unreachable endpoint."""


def user_error_in(exc: BaseException) -> UserError | None:
    """The `UserError` behind `exc`: itself, one in its cause chain (a Ray task's ``cause``), or one whose
    traceback Ray put in its message (an actor's ``__init__``, a training worker); else None."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, UserError):
            return current
        cause = getattr(current, "cause", None)
        if isinstance(cause, BaseException) and id(cause) not in seen:
            current = cause
            continue
        found = _WRAPPED.findall(str(current))
        if found:
            return UserError(found[-1].strip())
        current = current.__cause__ or current.__context__
    return None
