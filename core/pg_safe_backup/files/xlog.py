"""Positions in WAL, as PostgreSQL writes them: LSNs, WAL file names, timelines and backup_label.

What every frontend tool shares through ``access/xlog_internal.h`` and ``access/timeline.h``: an LSN's
``X/Y`` text, which WAL file holds a position (``XLByteToSeg``, ``XLByteToPrevSeg``, ``XLogFileName``),
a timeline history file's lines (``readTimeLineHistory``, ``tliOfPointInHistory``) and the ``KEY: value``
lines of a backup_label (``do_pg_backup_start``). Pure functions on text and integers: no I/O, and
nothing of the package is imported (``files/`` is a leaf family, this module its leaf).
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone

# -------------------------------------------------------------------------------------------- LSNs


def parse_lsn(text: str) -> int:
    """'16/B374D848' -> integer position (anything after the first space, e.g. ``(file ...)``, ignored).

    :param text: an LSN as PostgreSQL prints it.
    :raises ValueError: it is not ``X/Y`` in hexadecimal.
    """
    words = text.split()
    if not words:  # an empty --target-lsn was an IndexError, not the one-line error callers give
        raise ValueError(f"{text!r} is not an LSN")
    hi, _, lo = words[0].partition("/")
    return (int(hi, 16) << 32) | int(lo, 16)


def format_lsn(value: int) -> str:
    """Integer position -> ``X/Y``, as ``LSN_FORMAT_ARGS`` prints it (``%X/%X``, no padding).

    :param value: the position.
    """
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


# ---------------------------------------------------------------------------------- WAL file names

#: XLogFileName's form: timeline, log and segment, 8 upper-case hex digits each (IsXLogFileName).
WAL_NAME = "[0-9A-F]{24}"
#: A WAL segment, or a partial one, as archived, with an optional compression suffix (pg_archivecleanup's
#: IsXLogFileName / IsPartialXLogFileName, plus what archive_command may add). Group 1: the bare name.
WAL_FILE = re.compile(rf"^({WAL_NAME})(\.partial)?(\.(?:gz|zst|lz4|bz2|xz|br))?$")
#: initdb --wal-segsize: powers of two from 1 MB to 1 GB.
SEGMENT_SIZES = tuple(1 << n for n in range(20, 31))


def wal_file_name(timeline: int, segment: int, segment_size: int) -> str:
    """xlog_internal.h's XLogFileName: the name of WAL segment number ``segment`` on ``timeline``.

    :param timeline: the timeline.
    :param segment: the segment number (a position divided by the segment size).
    :param segment_size: the cluster's WAL segment size in bytes.
    """
    per_id = 0x1_0000_0000 // segment_size
    return f"{timeline:08X}{segment // per_id:08X}{segment % per_id:08X}"


def wal_file_holding(lsn: str, timeline: int, segment_size: int) -> str:
    """The WAL file holding the byte at ``lsn`` (XLByteToSeg): a backup label's START WAL file.

    :param lsn: the position, ``X/Y``.
    :param timeline: its timeline.
    :param segment_size: the cluster's WAL segment size in bytes.
    """
    return wal_file_name(timeline, parse_lsn(lsn) // segment_size, segment_size)


def wal_segment_name(end_lsn: str, timeline: int, segment_size: int) -> str:
    """The WAL file holding the last byte before ``end_lsn``: what a backup ending there needs last.

    xlog_internal.h's ``XLByteToPrevSeg`` and ``XLogFileName``, as do_pg_backup_stop names the segment
    it waits for (pg_walfile_name switched from PrevSeg to Seg in PostgreSQL 17, so it is not used).
    """
    return wal_file_name(timeline, (parse_lsn(end_lsn) - 1) // segment_size, segment_size)


def wal_segment_names(start_lsn: str, end_lsn: str, timeline: int, segment_size: int) -> list[str]:
    """The WAL files from the one holding ``start_lsn`` through the one before ``end_lsn``: the WAL a backup
    needs to become consistent (basebackup.c's range for ``-X fetch``: XLByteToSeg, XLByteToPrevSeg)."""
    first = parse_lsn(start_lsn) // segment_size
    last = (parse_lsn(end_lsn) - 1) // segment_size
    return [wal_file_name(timeline, segment, segment_size) for segment in range(first, last + 1)]


def wal_file_timeline(name: str) -> int:
    """The timeline a WAL file name (or a ``.partial`` / ``.backup`` one) starts with.

    :param name: e.g. ``000000020000000000000005``.
    """
    return int(name[:8], 16)


def wal_file_position(name: str) -> str:
    """A WAL file name without its timeline: ordering by it orders files by position, whatever their
    timeline, as pg_archivecleanup compares them.

    :param name: e.g. ``000000020000000000000005`` (-> ``0000000000000005``).
    """
    return name[8:24]


def history_file_name(timeline: int) -> str:
    """The timeline history file of ``timeline`` (TLHistoryFileName), e.g. ``00000002.history``."""
    return f"{timeline:08X}.history"


def archived_through(last_archived_wal: str | None, segment: str) -> bool:
    """Whether pg_stat_archiver's ``last_archived_wal`` shows ``segment`` archived.

    The archiver takes ready files oldest name first and retries a failing one rather than skip it,
    so the WAL before the last archived file is archived too (do_pg_backup_stop relies on the same
    order). A ``.partial`` or ``.backup`` file counts as the segment its name starts with (a backup
    history file is written after pg_backup_stop switched past that segment); a timeline ``.history``
    file tells nothing.
    """
    if not last_archived_wal or len(last_archived_wal) < 24 or last_archived_wal.endswith(".history"):
        return False
    return last_archived_wal[:24].upper() >= segment


# --------------------------------------------------------------------------------------- timelines


def parse_history(history_text: str, end_tli: int) -> list[tuple[int, int, int | None]]:
    """(timeline, begin, end) of each timeline in a history file of ``end_tli``, newest first, as
    readTimeLineHistory() builds them; ``end`` None for ``end_tli`` itself (it has not ended).

    :param history_text: the content of ``<end_tli>.history`` (``tli<TAB>switchpoint<TAB>reason`` lines).
    :param end_tli: the timeline whose history it is.
    :raises ValueError: a line cannot be read, or the timelines do not increase up to ``end_tli``.
    """
    entries: list[tuple[int, int, int | None]] = []
    begin = 0
    for number, line in enumerate(history_text.splitlines(), 1):
        # timeline.c skips blank lines and comments; a line is "tli<TAB>switchpoint<TAB>reason".
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = line.split()
        try:
            tli, switchpoint = int(fields[0]), parse_lsn(fields[1])
        except (IndexError, ValueError):
            raise ValueError(f"timeline history of {end_tli}, line {number}: cannot read {line!r}") from None
        if entries and tli <= entries[0][0]:
            raise ValueError(
                f"timeline history of {end_tli}, line {number}: timeline {tli} is not increasing"
            )
        entries.insert(0, (tli, begin, switchpoint))
        begin = switchpoint
    if entries and entries[0][0] >= end_tli:
        raise ValueError(f"the timeline history of {end_tli} lists timeline {entries[0][0]}")
    entries.insert(0, (end_tli, begin, None))
    return entries


def timeline_at(lsn: str, tli: int, history_text: str | None) -> tuple[int, str | None]:
    """The timeline of ``tli``'s history that holds the WAL just before ``lsn`` (where a backup stopping at
    ``lsn`` ends, as tliOfPointInHistory() tells it), and that timeline's own history file.

    A history file repeats its parent's lines and adds one, so the history of an older timeline of
    ``tli``'s history is ``history_text`` without the lines of that timeline and newer.

    :param lsn: the point (a backup's stop LSN).
    :param tli: a timeline whose history holds ``lsn`` (the timeline a standby replays now).
    :param history_text: the content of ``<tli>.history``; None for timeline 1, which has none.
    :returns: (timeline, its history file's content, or None for timeline 1).
    :raises ValueError: ``tli`` is not 1 and there is no history, or the history is malformed.
    """
    if tli == 1:
        return 1, None
    if not history_text:
        raise ValueError(f"where {lsn} lies in the history of timeline {tli} needs its history file")
    point = parse_lsn(lsn) - 1
    entries = parse_history(history_text, tli)
    found = next((t for t, begin, end in entries if begin <= point and (end is None or point < end)), tli)
    if found == tli:
        return tli, history_text
    if found == 1:
        return 1, None
    kept = [line for line in history_text.splitlines(keepends=True) if 0 < _history_tli(line) < found]
    return found, "".join(kept)


def _history_tli(line: str) -> int:
    """The timeline a history file's line is about; 0 for a blank line or a comment (not kept)."""
    fields = line.split()
    return int(fields[0]) if fields and not fields[0].startswith("#") else 0


# ------------------------------------------------------------------------------------ backup_label

#: What the label must say: without them recovery cannot start from it (xlogrecovery.c's read_backup_label).
LABEL_KEYS = ("START WAL LOCATION", "CHECKPOINT LOCATION", "START TIMELINE")
#: START WAL LOCATION's value: '0/2000028 (file 000000010000000000000002)'.
_START = re.compile(rf"^([0-9A-F]{{1,8}}/[0-9A-F]{{1,8}}) \(file ({WAL_NAME})\)$")
#: 'START TIME: 2026-11-26 06:14:54 UTC' (log_timezone's abbreviation, or an offset such as '+01').
_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) (\S+)$")
_OFFSET = re.compile(r"^([+-])(\d\d)(?::?(\d\d))?$")


def parse_backup_label(text: str | None) -> dict[str, str]:
    """Parse backup_label's ``KEY: value`` lines (START WAL LOCATION, CHECKPOINT LOCATION, ...)."""
    fields: dict[str, str] = {}
    for line in (text or "").splitlines():
        key, sep, value = line.partition(": ")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def backup_start(backup_label: str) -> tuple[str, int]:
    """The backup's start LSN (START WAL LOCATION) and START TIMELINE (1 when the label has none).

    :param backup_label: the label pg_backup_stop returned.
    :raises ValueError: the label has no START WAL LOCATION.
    """
    fields = parse_backup_label(backup_label)
    start = fields.get("START WAL LOCATION", "").split(" ")[0]
    if not start:
        raise ValueError("the backup_label has no START WAL LOCATION")
    return start, int(fields.get("START TIMELINE") or 1)


#: The lines an incremental backup's label has (PostgreSQL 17+): the start LSN and timeline of the backup it
#: was taken against (its parent's START WAL LOCATION and START TIMELINE).
INCREMENTAL_KEYS = ("INCREMENTAL FROM LSN", "INCREMENTAL FROM TLI")


def incremental_from(fields: dict[str, str]) -> tuple[str, int] | None:
    """(LSN, timeline) an incremental backup's label names as its parent's start; None for a full backup.

    :param fields: :func:`parse_backup_label` of the label.
    :raises ValueError: only one of the two lines, or one that does not parse.
    """
    lsn, tli = (fields.get(key) for key in INCREMENTAL_KEYS)
    if lsn is None and tli is None:
        return None
    if lsn is None or tli is None or not tli.isdigit():
        raise ValueError(
            f"the backup_label's {INCREMENTAL_KEYS[0]} / {INCREMENTAL_KEYS[1]} lines are damaged"
        )
    return format_lsn(parse_lsn(lsn)), int(tli)


def start_wal_location(value: str | None) -> tuple[str, str] | None:
    """(LSN, WAL file name) of a label's START WAL LOCATION value, or None when it is not in that form.

    :param value: e.g. ``0/2000028 (file 000000010000000000000002)``.
    """
    found = _START.match((value or "").strip())
    return (found.group(1), found.group(2)) if found else None


def label_start_time(text: str | None) -> datetime | None:
    """The label's START TIME as an aware datetime, or None: PostgreSQL prints it in log_timezone, whose
    abbreviation (CET, EST) names no offset; UTC, GMT and numeric offsets (``+01``, ``-0330``) are read.

    :param text: the START TIME value, e.g. ``2026-11-26 06:14:54 UTC``.
    """
    found = _TIME.match((text or "").strip())
    if not found:
        return None
    try:
        local = datetime.strptime(found.group(1), "%Y-%m-%d %H:%M:%S")
    except ValueError:
        return None
    zone = found.group(2)
    if zone in ("UTC", "GMT", "Z"):
        return local.replace(tzinfo=timezone.utc)
    offset = _OFFSET.match(zone)
    if not offset:
        return None
    sign = -1 if offset.group(1) == "-" else 1
    delta = timedelta(hours=int(offset.group(2)), minutes=int(offset.group(3) or 0))
    return local.replace(tzinfo=timezone(sign * delta))
