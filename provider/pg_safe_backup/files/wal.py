"""Self-contained backups: the WAL a backup needs, copied from the archive into the copy's pg_wal/.

pg_basebackup's ``-X fetch`` makes the same kind of backup: the copy then recovers to consistency with no
archive at all (no restore_command), and ``pg_verifybackup`` parses that WAL from the copy's own pg_wal/.
The segments are those from the one holding the label's START WAL LOCATION through the one before the
stop LSN (basebackup.c's range), on the label's START TIMELINE, and the timeline history files up to it.
"""

from __future__ import annotations

import gzip
import logging
import os
import re
import shutil
import struct
from pathlib import Path
from typing import Any

from pg_safe_backup.files.pgcontrol import read_pg_control
from pg_safe_backup.state import backup_start, wal_segment_names

_log = logging.getLogger(__name__)


class WalMissing(Exception):
    """The archive lacks (a whole copy of) a WAL file the backup needs."""


#: A WAL segment as archived (not partial), compressed or not: what carries a long page header.
WAL_SEGMENT = re.compile(r"^[0-9A-F]{24}(\.gz|\.zst)?$")
#: XLogLongPageHeaderData (access/xlog_internal.h): xlp_magic u16, xlp_info u16, xlp_tli u32, xlp_pageaddr
#: u64, xlp_rem_len u32, padding to 24, xlp_sysid u64, xlp_seg_size u32, xlp_xlog_blcksz u32.
_LONG_HEADER = struct.Struct("<HHIQI4xQII")
#: xlp_info's XLP_LONG_HEADER bit: set on the first page of every segment.
_XLP_LONG_HEADER = 0x0002


class NotWal(ValueError):
    """A file is not a WAL segment with a long page header (the message names it)."""


def segment_system_identifier(path: Path) -> int:
    """The system identifier in a WAL segment's first page (its long page header): which cluster wrote it.

    :param path: a WAL segment file, plain, ``.gz`` or ``.zst`` (the ``[zstd]`` extra).
    :raises NotWal: the file is too short or its first page has no long header.
    :raises OSError: it cannot be read.
    """
    path = Path(path)
    if path.name.endswith(".gz"):
        with gzip.open(path, "rb") as f:
            head = f.read(_LONG_HEADER.size)
    elif path.name.endswith(".zst"):
        import zstandard  # only a zstd archive needs it

        with open(path, "rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw) as f:
            head = f.read(_LONG_HEADER.size)
    else:
        with open(path, "rb") as f:
            head = f.read(_LONG_HEADER.size)
    if len(head) < _LONG_HEADER.size:
        raise NotWal(f"{path} is not a WAL segment: {len(head)} bytes")
    _magic, info, _tli, _addr, _rem, sysid, _seg, _blck = _LONG_HEADER.unpack(head)
    if not info & _XLP_LONG_HEADER:
        raise NotWal(f"{path} is not a WAL segment: its first page has no long header")
    return sysid


def archive_system_identifier(archive: Path) -> tuple[int, str] | None:
    """The system identifier of the cluster whose WAL ``archive`` holds, read from its oldest segment, and
    that segment's name; None when it holds no segment (an empty archive proves nothing).

    :param archive: the WAL archive folder.
    :raises NotWal: its oldest segment is not WAL.
    :raises OSError: the folder or the segment cannot be read.
    """
    names = sorted((n for n in os.listdir(archive) if WAL_SEGMENT.match(n)), key=lambda n: n[8:24] + n[:8])
    if not names:
        return None
    return segment_system_identifier(Path(archive) / names[0]), names[0]


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
