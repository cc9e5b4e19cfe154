"""Self-contained backups: the WAL a backup needs, copied from the archive into the copy's pg_wal/.

pg_basebackup's ``-X fetch`` makes the same kind of backup: the copy then recovers to consistency with no
archive at all (no restore_command), and ``pg_verifybackup`` parses that WAL from the copy's own pg_wal/.
The segments are those from the one holding the label's START WAL LOCATION through the one before the
stop LSN (basebackup.c's range), on the label's START TIMELINE, and the timeline history files up to it.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from pg_safe_backup.files.pgcontrol import read_pg_control
from pg_safe_backup.state import backup_start, wal_segment_names

_log = logging.getLogger(__name__)


class WalMissing(Exception):
    """The archive lacks (a whole copy of) a WAL file the backup needs."""


def backup_wal_names(copy_dir: Path, backup_label: str, stop_lsn: str) -> list[str]:
    """The WAL segment file names the backup in ``copy_dir`` needs to become consistent.

    :param copy_dir: the copy (its global/pg_control gives the WAL segment size).
    :param backup_label: the label pg_backup_stop returned.
    :param stop_lsn: the backup's stop LSN.
    """
    start, timeline = backup_start(backup_label)
    return wal_segment_names(start, stop_lsn, timeline, read_pg_control(Path(copy_dir)).xlog_seg_size)


def include_wal(
    copy_dir: Path, wal_archive: Path, *, backup_label: str, stop_lsn: str, log: logging.Logger | Any = _log
) -> list[str]:
    """Copy the WAL the backup needs from ``wal_archive`` into ``copy_dir``/pg_wal, fsynced.

    Each segment must be in the archive whole (a file of the segment size: a compressed archive is not
    read here). What is already in the copy's pg_wal/ under the same name is replaced.

    :param copy_dir: the copy, with its global/pg_control.
    :param wal_archive: the folder archive_command copies WAL into.
    :param backup_label: the label pg_backup_stop returned.
    :param stop_lsn: the backup's stop LSN.
    :param log: where to say what was copied.
    :returns: the names of the files copied, segments first, then history files.
    :raises WalMissing: a segment is missing from the archive or not whole; nothing was copied.
    """
    copy_dir, wal_archive = Path(copy_dir), Path(wal_archive)
    segment_size = read_pg_control(copy_dir).xlog_seg_size
    names = backup_wal_names(copy_dir, backup_label, stop_lsn)
    for name in names:
        source = wal_archive / name
        if not source.is_file():
            raise WalMissing(
                f"WAL segment {name}, which the backup needs, is not in the archive {wal_archive}"
            )
        if source.stat().st_size != segment_size:
            raise WalMissing(
                f"{source} is {source.stat().st_size} bytes, not a whole {segment_size}-byte WAL segment"
                " (a compressed archive is not read here)"
            )
    timeline = int(names[0][:8], 16)
    history = [f"{t:08X}.history" for t in range(2, timeline + 1)]
    history = [name for name in history if (wal_archive / name).is_file()]
    target = copy_dir / "pg_wal"
    (target / "archive_status").mkdir(parents=True, exist_ok=True)
    for name in names + history:
        _copy_synced(wal_archive / name, target / name)
    _fsync(target)
    log.info(
        "copied %d WAL segments (%s .. %s)%s from %s into %s: the backup recovers without an archive",
        len(names),
        names[0],
        names[-1],
        f" and {', '.join(history)}" if history else "",
        wal_archive,
        target,
    )
    return names + history


def _copy_synced(source: Path, target: Path) -> None:
    partial = target.with_name(f".{target.name}.tmp")  # no WAL file name: the server ignores it
    shutil.copyfile(source, partial)
    _fsync(partial)
    os.replace(partial, target)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
