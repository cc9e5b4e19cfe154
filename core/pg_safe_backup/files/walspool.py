"""The spool of ``wal-push --parallel``: one record per file pushed ahead, written once that file is durable
in the archive, that answers PostgreSQL's later ``archive_command`` call for it at once (pgBackRest's
asynchronous archive-push keeps such ``.ok`` files in its spool path).

A record names the archive and the file as it was when it was read: its size, inode and modification time
(``os.stat``). A completed WAL segment is never written again while it is ``.ready``; a file recycled,
replaced or rewritten since then has another inode or time, so its record does not answer and the call
pushes it (whose own check compares content). A record is used once. A record is ``key=value`` lines.

The background pusher (:func:`pg_safe_backup.wal_archive.pusher`) leaves ``NAME.error`` (one line) for a
file it could not push: PostgreSQL's call for that file prints it and exits 1, and the pusher tries the file
again once the line is taken.

Imports only ``os`` and files/walheader.py (``os``, ``struct``): the answering call
(:mod:`pg_safe_backup.__main__`) costs little more than Python's start, so pushing ahead pays off however
fast segments come.
"""

from __future__ import annotations

import os
import time

from pg_safe_backup.files.walheader import fsync_path

#: The spool's default folder, in pg_wal/: a base backup leaves pg_wal/'s contents out (basebackup.c), so
#: no backup carries its records.
SPOOL_FOLDER = "pg_safe_backup_spool"
#: A spool record's suffix.
SPOOL_SUFFIX = ".pushed"
#: The suffix of the line the background pusher leaves for a file it could not push (for PostgreSQL's call).
ERROR_SUFFIX = ".error"
#: What the calls want of the background pusher (:func:`want`).
WANTED_FILE = "pusher.wanted"


def archive_location(archive: str) -> str:
    """How a store names ``archive`` (its ``where``), known without opening it: a spool record is compared
    with it before any store is opened.

    :param archive: ``--archive``'s value.
    """
    if archive.startswith("file://"):
        return os.path.abspath(archive[len("file://") :])
    if "://" in archive:
        return archive.rstrip("/")
    return os.path.abspath(archive)


def spool_folder(path: str | os.PathLike[str], spool_dir: str | os.PathLike[str] | None = None) -> str:
    """Where the records of ``path``'s cluster are: ``spool_dir``, else pg_wal/:data:`SPOOL_FOLDER`.

    :param path: the file PostgreSQL asks to archive (``%p``).
    :param spool_dir: ``--spool-dir``.
    """
    if spool_dir:
        return os.fspath(spool_dir)
    return os.path.join(os.path.dirname(os.path.abspath(path)), SPOOL_FOLDER)


def record_path(spool: str | os.PathLike[str], name: str) -> str:
    """The record of file ``name`` in ``spool``."""
    return os.path.join(spool, f"{name}{SPOOL_SUFFIX}")


def file_state(path: str | os.PathLike[str]) -> dict[str, int]:
    """What a record keeps of ``path`` (taken before it is read for the push)."""
    st = os.stat(path)
    return {"size": st.st_size, "ino": st.st_ino, "mtime_ns": st.st_mtime_ns}


def write_record(spool: str | os.PathLike[str], name: str, state: dict[str, int], where: str) -> None:
    """Record durably that file ``name`` (as ``state`` was) is in the archive ``where``: call it only once the
    file is durable there. The record is fsynced, renamed into place, and the folder fsynced.

    :param spool: the spool folder (made when missing).
    :param name: the file's name (``%f``).
    :param state: :func:`file_state` of the file before it was read.
    :param where: :func:`archive_location` of the archive.
    """
    os.makedirs(spool, exist_ok=True)
    final = record_path(spool, name)
    temp = os.path.join(spool, f".{name}{SPOOL_SUFFIX}.{os.getpid()}.tmp")
    body = {"name": name, **state, "archive": where}
    with open(temp, "w") as f:
        f.write(format_record(body))
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, final)
    fsync_path(spool)


def answered(path: str | os.PathLike[str], where: str, spool: str | os.PathLike[str]) -> bool:
    """Whether a push ahead already archived ``path`` into ``where``: its record names this archive and the
    file is as it was when pushed (size, inode, modification time). The record is used once (removed).

    :param path: the file PostgreSQL asks to archive.
    :param where: the archive it asks for (:func:`archive_location`).
    :param spool: the spool folder.
    """
    record = record_path(spool, os.path.basename(path))
    try:
        with open(record) as f:
            body = parse_record(f.read())
    except FileNotFoundError:
        return False
    except (OSError, ValueError):
        body = {}
    try:
        os.unlink(record)  # used once; if it does not match, the push that follows decides
    except FileNotFoundError:
        pass
    if body.get("archive") != where:
        return False
    try:
        now = file_state(path)
    except OSError:
        return False
    return all(body.get(k) == str(v) for k, v in now.items())


def format_record(body: dict[str, object]) -> str:
    """A record's text: a ``key=value`` line per field (no JSON: its import, with ``re`` and ``enum``'s,
    would cost each answering call more than the rest of it)."""
    for key, value in body.items():
        if "\n" in f"{key}{value}" or "=" in key:
            raise ValueError(f"a spool record cannot hold {key!r}")
    return "".join(f"{key}={value}\n" for key, value in body.items())


def parse_record(text: str) -> dict[str, str]:
    """The fields of a record's text (:func:`format_record`), each a string.

    :raises ValueError: a line that is not ``key=value``.
    """
    body = {}
    for line in text.splitlines():
        key, equals, value = line.partition("=")
        if not equals:
            raise ValueError(f"not a spool record line: {line!r}")
        body[key] = value
    return body


def write_error(spool: str | os.PathLike[str], name: str, line: str, wanted: str) -> None:
    """Leave ``line`` (why file ``name`` could not be pushed) for PostgreSQL's call for it, which reports it
    and takes it (:func:`take_error`); the pusher tries the file again once it is taken. Not fsynced: a
    lost error only means one more try.

    :param wanted: what the pusher pushed for (:func:`want`): the line answers only a call that wants it.
    """
    _put(spool, f"{name}{ERROR_SUFFIX}", format_record({"wanted": wanted, "line": " ".join(line.split())}))


def take_error(spool: str | os.PathLike[str], name: str, wanted: str) -> str | None:
    """The pusher's line for file ``name``, removed; None when there is none, or it was a pusher's for
    something else than ``wanted`` (removed too: the file is pushed again)."""
    error = os.path.join(spool, f"{name}{ERROR_SUFFIX}")
    try:
        with open(error) as f:
            text = f.read()
        os.unlink(error)
    except FileNotFoundError:
        return None
    try:
        body = parse_record(text)
    except ValueError:
        return None
    if body.get("wanted") != wanted:
        return None
    return body.get("line") or f"{name}: the background pusher could not push it"


def want(spool: str | os.PathLike[str], wanted: str) -> None:
    """Say what a waiting call wants of the pusher (the archive, compression, key id and N, as one line) and
    that it waits now (the file's time). Not fsynced: it steers, it records nothing."""
    path = os.path.join(spool, WANTED_FILE)
    try:
        with open(path) as f:
            same = f.read() == wanted
    except FileNotFoundError:
        same = False
    if same:
        os.utime(path)
        return
    _put(spool, WANTED_FILE, wanted)


def _put(spool: str | os.PathLike[str], name: str, text: str) -> None:
    """``text`` into ``spool``/``name``, whole or not at all (a dotted temporary name, renamed); not
    fsynced: what it holds steers the pusher, it records nothing."""
    temp = os.path.join(spool, f".{name}.{os.getpid()}.tmp")
    with open(temp, "w") as f:
        f.write(text)
    os.replace(temp, os.path.join(spool, name))


def wanted(spool: str | os.PathLike[str]) -> tuple[str | None, float]:
    """What the calls want of the pusher and how many seconds ago one last waited (None: none asked)."""
    path = os.path.join(spool, WANTED_FILE)
    try:
        with open(path) as f:
            asked = f.read()
            age = time.time() - os.fstat(f.fileno()).st_mtime
    except FileNotFoundError:
        return None, float("inf")
    return asked, age


def listing(spool: str | os.PathLike[str]) -> tuple[set[str], set[str]]:
    """The names of the files ``spool`` holds a record of, and those it holds an error of."""
    recorded: set[str] = set()
    failed: set[str] = set()
    try:
        entries = os.listdir(spool)
    except FileNotFoundError:
        return recorded, failed
    for entry in entries:
        if entry.startswith("."):
            continue  # a record or an error being written
        if entry.endswith(SPOOL_SUFFIX):
            recorded.add(entry[: -len(SPOOL_SUFFIX)])
        elif entry.endswith(ERROR_SUFFIX):
            failed.add(entry[: -len(ERROR_SUFFIX)])
    return recorded, failed


def forget(spool: str | os.PathLike[str], name: str) -> None:
    """Remove file ``name``'s record and error (it is no longer ``.ready``: PostgreSQL will not ask)."""
    for suffix in (SPOOL_SUFFIX, ERROR_SUFFIX):
        try:
            os.unlink(os.path.join(spool, f"{name}{suffix}"))
        except FileNotFoundError:
            pass
