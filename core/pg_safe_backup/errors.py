"""One error tree for the package: a root and two branches, "never retried" and "try again".

Every domain exception derives from one branch (and keeps its builtin base, ``ValueError`` or
``RuntimeError``, where callers catch it by that), so the Airflow faces map a failure to
``AirflowFailException`` or ``AirflowException`` in one place instead of listing classes.

This module imports nothing of the package, and nothing at all beyond the standard library: every room
may import it, ``files/`` included, without depending on anything but this file (``files/`` stays a leaf
family: like PostgreSQL's ``elog.h``, the error vocabulary sits below everything that reports errors).
"""

from __future__ import annotations


class PgSafeBackupError(Exception):
    """Root of every error this package raises on purpose; the message says what and why, in one line."""


class PermanentError(PgSafeBackupError):
    """The backup is unusable or the request is wrong (a bad parameter, flag or file): running the same
    thing again gives the same answer, so it is never retried."""


class TransientError(PgSafeBackupError):
    """Try again: a server that could not be reached, storage that could not be written, a WAL file not
    archived yet, a check that could not run. No verdict was reached; a later run may succeed."""


def retryable(err: BaseException) -> bool:
    """Whether running again could succeed: a :class:`TransientError` that is not also a
    :class:`PermanentError` (a narrower refusal under a transient family, e.g. a destination that is not
    empty under the copy's errors, is never retried). An exception outside the tree gives False: the
    caller decides for those (``OSError`` from storage, say).

    :param err: the exception raised.
    """
    return isinstance(err, TransientError) and not isinstance(err, PermanentError)


def error_line(err: BaseException) -> str:
    """``err`` as the one line a command prints (``pg-safe-backup wal-push: error: ...``): its message on one
    line; an ``OSError`` of the system's by its reason and file name."""
    text = " ".join(str(err).split()) or err.__class__.__name__
    if isinstance(err, OSError) and not isinstance(err, PgSafeBackupError) and err.filename:
        text = f"{err.strerror or err.__class__.__name__}: {err.filename}"
    return text
