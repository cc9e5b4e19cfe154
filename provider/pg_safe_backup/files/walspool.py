"""The spool of ``wal-push --parallel``: one record per file pushed ahead, written once that file is durable
in the archive, that answers PostgreSQL's later ``archive_command`` call for it at once (pgBackRest's
asynchronous archive-push keeps such ``.ok`` files in its spool path).

A record names the archive and the file as it was when it was read: its size, inode and modification time
(``os.stat``). A completed WAL segment is never written again while it is ``.ready``; a file recycled,
replaced or rewritten since then has another inode or time, so its record does not answer and the call
pushes it (whose own check compares content). A record is used once.

Imports only ``os`` and ``json``: the answering call (:mod:`pg_safe_backup.__main__`) costs little more than
Python's start, so pushing ahead pays off however fast segments come.
"""

from __future__ import annotations

import json
import os

#: The spool's default folder, in pg_wal/: a base backup leaves pg_wal/'s contents out (basebackup.c), so
#: no backup carries its records.
SPOOL_FOLDER = "pg_safe_backup_spool"
#: A spool record's suffix.
SPOOL_SUFFIX = ".pushed"


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


def write_record(
    spool: str | os.PathLike[str], name: str, state: dict[str, int], sha256: str | None, where: str
) -> None:
    """Record durably that file ``name`` (as ``state`` was) is in the archive ``where``: call it only once the
    file is durable there. The record is fsynced, renamed into place, and the folder fsynced.

    :param spool: the spool folder (made when missing).
    :param name: the file's name (``%f``).
    :param state: :func:`file_state` of the file before it was read.
    :param sha256: its plaintext's SHA-256, for a person reading the record.
    :param where: :func:`archive_location` of the archive.
    """
    os.makedirs(spool, exist_ok=True)
    final = record_path(spool, name)
    temp = os.path.join(spool, f".{name}{SPOOL_SUFFIX}.{os.getpid()}.tmp")
    body = {"name": name, **state, "sha256": sha256, "archive": where}
    with open(temp, "w") as f:
        json.dump(body, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, final)
    # files/wal.py's fsync_path, written out: that module's imports would weigh on the answering call.
    folder = os.open(spool, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


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
            body = json.load(f)
    except FileNotFoundError:
        return False
    except (OSError, ValueError):
        body = {}
    try:
        os.unlink(record)  # used once; if it does not match, the push that follows decides
    except FileNotFoundError:
        pass
    if not isinstance(body, dict) or body.get("archive") != where:
        return False
    try:
        now = file_state(path)
    except OSError:
        return False
    return all(isinstance(body.get(k), int) and body[k] == v for k, v in now.items())
