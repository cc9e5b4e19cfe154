"""Self-contained backups: the WAL a backup needs, copied from the archive into the copy's pg_wal/.

pg_basebackup's ``-X fetch`` makes the same kind of backup: the copy then recovers to consistency with no
archive at all (no restore_command), and ``pg_verifybackup`` parses that WAL from the copy's own pg_wal/.
The segments are those from the one holding the label's START WAL LOCATION through the one before the
stop LSN (basebackup.c's range), on each timeline of the backup's WAL ranges (a standby's backup that
followed a promotion spans two), and the timeline history files up to the stop's.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import struct
from pathlib import Path
from typing import Any

from pg_safe_backup.errors import PermanentError, TransientError
from pg_safe_backup.files.xlog import (
    WAL_NAME,
    history_file_name,
    wal_file_position,
    wal_file_timeline,
    wal_segment_names,
)

_log = logging.getLogger(__name__)


class WalMissing(TransientError):
    """The archive lacks (a whole copy of) a WAL file the backup needs."""


#: A WAL segment as archived (not partial), compressed or not: what carries a long page header.
WAL_SEGMENT = re.compile(rf"^{WAL_NAME}(\.gz|\.zst)?$")
#: XLogLongPageHeaderData (access/xlog_internal.h): xlp_magic u16, xlp_info u16, xlp_tli u32, xlp_pageaddr
#: u64, xlp_rem_len u32, padding to 24, xlp_sysid u64, xlp_seg_size u32, xlp_xlog_blcksz u32.
_LONG_HEADER = struct.Struct("<HHIQI4xQII")
#: xlp_info's XLP_LONG_HEADER bit: set on the first page of every segment.
_XLP_LONG_HEADER = 0x0002


class NotWal(PermanentError, ValueError):
    """A file is not a WAL segment with a long page header (the message names it)."""


def segment_system_identifier(path: Path) -> int:
    """The system identifier in a WAL segment's first page (its long page header): which cluster wrote it.

    :param path: a WAL segment file, plain, ``.gz`` or ``.zst`` (the ``[zstd]`` extra).
    :raises NotWal: the file is too short or its first page has no long header.
    :raises OSError: it cannot be read.
    """
    path = Path(path)
    if path.name.endswith(".gz"):
        import gzip  # imports kept lazy here: wal-push reads each segment's header through this module

        with gzip.open(path, "rb") as f:
            head = f.read(_LONG_HEADER.size)
    elif path.name.endswith(".zst"):
        import zstandard  # only a zstd archive needs it

        with open(path, "rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw) as f:
            head = f.read(_LONG_HEADER.size)
    else:
        with open(path, "rb") as f:
            head = f.read(_LONG_HEADER.size)
    return header_system_identifier(head, str(path))


def header_system_identifier(head: bytes, what: str) -> int:
    """The system identifier in a WAL segment's first bytes (its long page header).

    :param head: the segment's first bytes (at least the long page header's 40).
    :param what: the segment's name or path, for the error.
    :raises NotWal: too short, or no long header.
    """
    if len(head) < _LONG_HEADER.size:
        raise NotWal(f"{what} is not a WAL segment: {len(head)} bytes")
    _magic, info, _tli, _addr, _rem, sysid, _seg, _blck = _LONG_HEADER.unpack(head[: _LONG_HEADER.size])
    if not info & _XLP_LONG_HEADER:
        raise NotWal(f"{what} is not a WAL segment: its first page has no long header")
    return sysid


def archive_system_identifier(archive: Path) -> tuple[int, str] | None:
    """The system identifier of the cluster whose WAL ``archive`` holds, read from its oldest segment, and
    that segment's name; None when it holds no segment (an empty archive proves nothing).

    :param archive: the WAL archive folder.
    :raises NotWal: its oldest segment is not WAL.
    :raises OSError: the folder or the segment cannot be read.
    """
    names = sorted(
        (n for n in os.listdir(archive) if WAL_SEGMENT.match(n)),
        key=lambda n: (wal_file_position(n), wal_file_timeline(n)),
    )
    if not names:
        return None
    return segment_system_identifier(Path(archive) / names[0]), names[0]


def backup_wal_names(
    copy_dir: Path,
    backup_label: str,
    stop_lsn: str,
    stop_timeline: int | None = None,
    timeline_history: str | None = None,
) -> list[str]:
    """The WAL segment file names the backup in ``copy_dir`` needs to become consistent, oldest first:
    those of each of its WAL ranges (:func:`~pg_safe_backup.files.manifest.backup_wal_ranges`), so a
    segment where the timeline changed is named on both timelines, as pg_verifybackup reads each.

    :param copy_dir: the copy (its global/pg_control gives the WAL segment size).
    :param backup_label: the label pg_backup_stop returned.
    :param stop_lsn: the backup's stop LSN.
    :param stop_timeline: the timeline it stopped on (default: the label's START TIMELINE).
    :param timeline_history: the history file of ``stop_timeline`` when it is not the start's.
    :raises ValueError: the label has no start, or the history does not lead from its timeline.
    """
    from pg_safe_backup.files.manifest import backup_wal_ranges
    from pg_safe_backup.files.pgcontrol import read_pg_control

    size = read_pg_control(Path(copy_dir)).xlog_seg_size
    # The major only chooses how a manifest prints LSNs; they are read back here.
    ranges = backup_wal_ranges(backup_label, stop_lsn, 13, stop_timeline, timeline_history)
    return [
        name
        for r in reversed(ranges)
        if r.start_lsn != r.end_lsn  # a range that ends where it begins needs no WAL
        for name in wal_segment_names(r.start_lsn, r.end_lsn, r.timeline, size)
    ]


def include_wal(
    copy_dir: Path,
    wal_archive: Path,
    *,
    backup_label: str,
    stop_lsn: str,
    stop_timeline: int | None = None,
    timeline_history: str | None = None,
    log: logging.Logger | Any = _log,
) -> list[str]:
    """Copy the WAL the backup needs from ``wal_archive`` into ``copy_dir``/pg_wal, fsynced.

    Each segment must be in the archive whole (a file of the segment size: a compressed archive is not
    read here). The last segment of a timeline that ended during the backup may be there only as the
    ``.partial`` file the promoted server archived: it holds that timeline's WAL up to the switch, all
    the backup needs of it, and is copied under the segment's own name (what pg_verifybackup reads). The
    history file of the stop's timeline must be there when the backup changed timeline. What is already
    in the copy's pg_wal/ under the same name is replaced.

    :param copy_dir: the copy, with its global/pg_control.
    :param wal_archive: the folder archive_command copies WAL into.
    :param backup_label: the label pg_backup_stop returned.
    :param stop_lsn: the backup's stop LSN.
    :param stop_timeline: the timeline it stopped on (default: the label's START TIMELINE).
    :param timeline_history: the history file of ``stop_timeline`` when it is not the start's.
    :param log: where to say what was copied.
    :returns: the names of the files copied, segments first, then history files.
    :raises WalMissing: a file is missing from the archive or a segment is not whole; nothing was copied.
    :raises ManifestError: the label has no start, or the history does not lead from its timeline.
    """
    copy_dir, wal_archive = Path(copy_dir), Path(wal_archive)
    from pg_safe_backup.files.manifest import ManifestError
    from pg_safe_backup.files.pgcontrol import read_pg_control

    segment_size = read_pg_control(copy_dir).xlog_seg_size
    try:
        names = backup_wal_names(copy_dir, backup_label, stop_lsn, stop_timeline, timeline_history)
    except ValueError as err:
        raise ManifestError(str(err)) from err
    # The last segment of each timeline that ended during the backup (the next one is on another).
    ends = {
        name
        for name, after in zip(names, names[1:], strict=False)
        if wal_file_timeline(name) != wal_file_timeline(after)
    }
    sources = {name: _archived(wal_archive, name, ended=name in ends) for name in names}
    for source in sources.values():
        if source.stat().st_size != segment_size:
            raise WalMissing(
                f"{source} is {source.stat().st_size} bytes, not a whole {segment_size}-byte WAL segment"
                " (a compressed archive is not read here)"
            )
    timeline = wal_file_timeline(names[-1])
    history = [history_file_name(t) for t in range(2, timeline + 1)]
    if timeline != wal_file_timeline(names[0]) and not (wal_archive / history[-1]).is_file():
        raise WalMissing(
            f"the timeline history file {history[-1]}, which the backup needs to follow timeline {timeline},"
            f" is not in the archive {wal_archive}"
        )
    history = [name for name in history if (wal_archive / name).is_file()]
    sources.update({name: wal_archive / name for name in history})
    target = copy_dir / "pg_wal"
    (target / "archive_status").mkdir(parents=True, exist_ok=True)
    for name, source in sources.items():
        _copy_synced(source, target / name)
    _fsync(target)
    partial = [source.name for source in sources.values() if source.name.endswith(".partial")]
    log.info(
        "copied %d WAL segments (%s .. %s)%s from %s into %s%s: the backup recovers without an archive",
        len(names),
        names[0],
        names[-1],
        f" and {', '.join(history)}" if history else "",
        wal_archive,
        target,
        f" ({', '.join(partial)} under its segment's name)" if partial else "",
    )
    return names + history


def _archived(wal_archive: Path, name: str, ended: bool) -> Path:
    """Where the archive holds segment ``name``: the segment, or (``ended``: the last segment of a timeline
    that ended during the backup) its ``.partial``.

    :raises WalMissing: neither is there.
    """
    source = wal_archive / name
    if source.is_file():
        return source
    partial = wal_archive / f"{name}.partial"
    if ended and partial.is_file():
        return partial
    raise WalMissing(f"WAL segment {name}, which the backup needs, is not in the archive {wal_archive}")


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
