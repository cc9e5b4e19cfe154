"""files/xlog.py: LSNs, WAL file names, timelines and backup_label, as PostgreSQL writes them. No cluster."""

from __future__ import annotations

import importlib
from datetime import datetime, timedelta, timezone

import pytest

from pg_safe_backup.files import xlog
from pg_safe_backup.files.xlog import (
    WAL_FILE,
    archived_through,
    backup_start,
    format_lsn,
    history_file_name,
    label_start_time,
    parse_backup_label,
    parse_history,
    parse_lsn,
    start_wal_location,
    timeline_at,
    wal_file_holding,
    wal_file_name,
    wal_file_position,
    wal_file_timeline,
    wal_segment_name,
    wal_segment_names,
)

MB = 1 << 20
GB = 1 << 30

# ---------------------------------------------------------------------------------------------- LSNs

#: LSN text as PostgreSQL prints it (%X/%X), and its position.
LSNS = [
    ("0/0", 0),
    ("0/1", 1),
    ("0/2000028", 0x2000028),
    ("16/B374D848", 0x16_B374_D848),
    ("1/0", 1 << 32),
    ("FFFFFFFF/FFFFFFFF", (1 << 64) - 1),
]


@pytest.mark.parametrize(("text", "position"), LSNS)
def test_an_lsn_parses_to_its_position(text: str, position: int) -> None:
    assert parse_lsn(text) == position


@pytest.mark.parametrize(("text", "position"), LSNS)
def test_a_position_formats_as_postgresql_prints_it(text: str, position: int) -> None:
    assert format_lsn(position) == text


@pytest.mark.parametrize(
    ("text", "position"),
    [
        ("16/b374d848", 0x16_B374_D848),  # lower case
        ("0/00002028", 0x2028),  # zero-padded, as a version 19 manifest prints it
        ("  0/2000028\n", 0x2000028),
        ("0/2000028 (file 000000010000000000000002)", 0x2000028),  # a label's START WAL LOCATION
    ],
    ids=["lower-case", "padded", "blanks", "label-value"],
)
def test_an_lsn_in_other_spellings_parses_too(text: str, position: int) -> None:
    assert parse_lsn(text) == position


@pytest.mark.parametrize("text", ["", "  ", "1/", "/1", "G/0", "0/0/0", "12345"])
def test_what_is_not_an_lsn_is_a_value_error(text: str) -> None:
    with pytest.raises(ValueError):
        parse_lsn(text)


# ------------------------------------------------------------------------------------ WAL file names

#: timeline, segment number, segment size -> XLogFileName.
FILE_NAMES = [
    (1, 0, 16 * MB, "000000010000000000000000"),
    (1, 2, 16 * MB, "000000010000000000000002"),
    (1, 255, 16 * MB, "0000000100000000000000FF"),
    (1, 256, 16 * MB, "000000010000000100000000"),  # 256 segments of 16 MB per 4 GB "log"
    (0x1A, 0x16B3, 16 * MB, "0000001A00000016000000B3"),
    (1, 4095, 1 * MB, "000000010000000000000FFF"),
    (1, 4097, 1 * MB, "000000010000000100000001"),  # 4096 per log
    (2, 65, 64 * MB, "000000020000000100000001"),  # 64 per log
    (1, 5, 1 * GB, "000000010000000100000001"),  # 4 per log
]


@pytest.mark.parametrize(("timeline", "segment", "size", "name"), FILE_NAMES)
def test_a_segment_number_names_its_wal_file(timeline: int, segment: int, size: int, name: str) -> None:
    assert wal_file_name(timeline, segment, size) == name


#: lsn, timeline, segment size -> the file holding the byte at lsn (XLByteToSeg) and the one holding the
#: byte before it (XLByteToPrevSeg: what a backup ending at lsn needs last).
HOLDING = [
    ("0/2000028", 1, 16 * MB, "000000010000000000000002", "000000010000000000000002"),
    ("0/3000000", 1, 16 * MB, "000000010000000000000003", "000000010000000000000002"),  # on a boundary
    ("16/B374D848", 1, 16 * MB, "0000000100000016000000B3", "0000000100000016000000B3"),
    ("1/0", 1, 16 * MB, "000000010000000100000000", "0000000100000000000000FF"),  # a log boundary
    ("1/0", 3, 1 * GB, "000000030000000100000000", "000000030000000000000003"),
    ("0/100000", 1, 1 * MB, "000000010000000000000001", "000000010000000000000000"),
    ("0/4000001", 2, 64 * MB, "000000020000000000000001", "000000020000000000000001"),
]


@pytest.mark.parametrize(("lsn", "timeline", "size", "holding", "before"), HOLDING)
def test_the_file_holding_an_lsn(lsn: str, timeline: int, size: int, holding: str, before: str) -> None:
    assert wal_file_holding(lsn, timeline, size) == holding


@pytest.mark.parametrize(("lsn", "timeline", "size", "holding", "before"), HOLDING)
def test_the_last_file_a_backup_ending_at_an_lsn_needs(
    lsn: str, timeline: int, size: int, holding: str, before: str
) -> None:
    assert wal_segment_name(lsn, timeline, size) == before


@pytest.mark.parametrize(
    ("start", "end", "timeline", "size", "names"),
    [
        ("0/2000028", "0/2000100", 1, 16 * MB, ["000000010000000000000002"]),
        (
            "0/2000028",
            "0/5000000",
            1,
            16 * MB,
            ["000000010000000000000002", "000000010000000000000003", "000000010000000000000004"],
        ),
        ("0/FF000028", "1/1000000", 2, 16 * MB, ["0000000200000000000000FF", "000000020000000100000000"]),
        ("0/3FFFFFFF", "0/40000001", 1, 1 * GB, ["000000010000000000000000", "000000010000000000000001"]),
        ("0/180000", "0/200000", 4, 1 * MB, ["000000040000000000000001"]),
    ],
    ids=["one-segment", "to-a-boundary", "across-a-log", "1GB-segments", "1MB-segments"],
)
def test_the_wal_a_backup_needs_runs_from_its_start_file_through_the_one_before_its_end(
    start: str, end: str, timeline: int, size: int, names: list[str]
) -> None:
    assert wal_segment_names(start, end, timeline, size) == names


@pytest.mark.parametrize(
    ("name", "timeline", "position"),
    [
        ("000000010000000000000002", 1, "0000000000000002"),
        ("0000001A00000016000000B3", 0x1A, "00000016000000B3"),
        ("000000020000000000000005.partial", 2, "0000000000000005"),
        ("000000010000000000000003.00000028.backup", 1, "0000000000000003"),
    ],
)
def test_a_wal_file_name_splits_into_timeline_and_position(name: str, timeline: int, position: str) -> None:
    assert (wal_file_timeline(name), wal_file_position(name)) == (timeline, position)


@pytest.mark.parametrize(("timeline", "name"), [(2, "00000002.history"), (0x1A, "0000001A.history")])
def test_a_timeline_names_its_history_file(timeline: int, name: str) -> None:
    assert history_file_name(timeline) == name


@pytest.mark.parametrize(
    ("name", "matches"),
    [
        ("000000010000000000000002", True),
        ("000000010000000000000002.partial", True),
        ("000000010000000000000002.gz", True),
        ("000000010000000000000002.partial.zst", True),
        ("000000010000000000000002.lz4", True),
        ("00000002.history", False),
        ("000000010000000000000003.00000028.backup", False),
        ("000000010000000000000002.tmp", False),
        ("00000001000000000000000g", False),
        ("0000000100000000000000002", False),
    ],
)
def test_what_counts_as_an_archived_wal_file(name: str, matches: bool) -> None:
    assert bool(WAL_FILE.match(name)) is matches


@pytest.mark.parametrize(
    ("last_archived", "archived"),
    [
        (None, False),
        ("", False),
        ("00000002.history", False),  # a timeline history file tells nothing
        ("0000000100000000", False),  # too short to be a WAL file
        ("000000010000000000000002", False),  # the one before
        ("000000010000000000000003", True),  # the segment itself
        ("000000010000000000000004", True),  # a later one: archived oldest first
        ("000000010000000000000003.partial", True),
        ("000000010000000000000003.00000028.backup", True),  # written after the switch past it
        ("000000010000000000000002.00000028.backup", False),
        ("0000000100000000000000a3", True),  # read upper-cased
    ],
)
def test_whether_the_archiver_has_archived_a_segment(last_archived: str | None, archived: bool) -> None:
    assert archived_through(last_archived, "000000010000000000000003") is archived


# ------------------------------------------------------------------------------------------ timelines

HISTORY_3 = "1\t0/3000000\tno recovery target specified\n\n2\t0/5000000\tno recovery target specified\n"
HISTORY_2 = "1\t0/3000000\tno recovery target specified\n"


@pytest.mark.parametrize(
    ("text", "end_tli", "entries"),
    [
        ("", 1, [(1, 0, None)]),
        (HISTORY_2, 2, [(2, 0x3000000, None), (1, 0, 0x3000000)]),
        (HISTORY_3, 3, [(3, 0x5000000, None), (2, 0x3000000, 0x5000000), (1, 0, 0x3000000)]),
        ("# a comment\n1\t0/3000000\treason\n", 2, [(2, 0x3000000, None), (1, 0, 0x3000000)]),
        ("1\t0/3000000\treason\n", 5, [(5, 0x3000000, None), (1, 0, 0x3000000)]),  # timelines skipped
    ],
    ids=["none", "one-switch", "two-switches", "a-comment", "a-gap"],
)
def test_a_history_file_gives_each_timeline_its_range(
    text: str, end_tli: int, entries: list[tuple[int, int, int | None]]
) -> None:
    assert parse_history(text, end_tli) == entries


@pytest.mark.parametrize(
    ("text", "end_tli", "why"),
    [
        ("1\n", 2, "line 1: cannot read"),
        ("1\tnot-an-lsn\treason\n", 2, "line 1: cannot read"),
        ("x\t0/3000000\treason\n", 2, "line 1: cannot read"),
        ("2\t0/3000000\tr\n1\t0/5000000\tr\n", 3, "line 2: timeline 1 is not increasing"),
        (HISTORY_3, 2, "the timeline history of 2 lists timeline 2"),
    ],
    ids=["no-lsn", "bad-lsn", "bad-timeline", "not-increasing", "lists-its-own-timeline"],
)
def test_a_malformed_history_file_is_named(text: str, end_tli: int, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_history(text, end_tli)


@pytest.mark.parametrize(
    ("lsn", "tli", "history", "found"),
    [
        ("0/6000100", 3, HISTORY_3, (3, HISTORY_3)),
        ("0/5000001", 3, HISTORY_3, (3, HISTORY_3)),  # the byte before is the switch point: on 3
        ("0/5000000", 3, HISTORY_3, (2, HISTORY_2)),  # the byte before is 2's last
        ("0/4000000", 3, HISTORY_3, (2, HISTORY_2)),
        ("0/3000000", 3, HISTORY_3, (1, None)),
        ("0/2000000", 2, HISTORY_2, (1, None)),
        ("0/5000000", 1, None, (1, None)),  # timeline 1 has no history
    ],
)
def test_the_timeline_that_holds_the_wal_before_an_lsn(
    lsn: str, tli: int, history: str | None, found: tuple[int, str | None]
) -> None:
    assert timeline_at(lsn, tli, history) == found


def test_where_an_lsn_lies_after_timeline_1_needs_the_history_file() -> None:
    with pytest.raises(ValueError, match="needs its history file"):
        timeline_at("0/5000000", 2, None)


# --------------------------------------------------------------------------------------- backup_label

LABEL = (
    "START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\n"
    "CHECKPOINT LOCATION: 0/2000060\n"
    "BACKUP METHOD: streamed\n"
    "BACKUP FROM: primary\n"
    "START TIME: 2026-11-26 06:14:54 UTC\n"
    "LABEL: nightly: full\n"
    "START TIMELINE: 1\n"
)


def test_a_label_parses_into_its_fields() -> None:
    assert parse_backup_label(LABEL) == {
        "START WAL LOCATION": "0/2000028 (file 000000010000000000000002)",
        "CHECKPOINT LOCATION": "0/2000060",
        "BACKUP METHOD": "streamed",
        "BACKUP FROM": "primary",
        "START TIME": "2026-11-26 06:14:54 UTC",
        "LABEL": "nightly: full",  # split at the first ": " only
        "START TIMELINE": "1",
    }


@pytest.mark.parametrize("text", [None, "", "no colon here\n", "KEY:no-space\n"])
def test_text_without_label_lines_parses_to_no_fields(text: str | None) -> None:
    assert parse_backup_label(text) == {}


@pytest.mark.parametrize(
    ("label", "start"),
    [
        (LABEL, ("0/2000028", 1)),
        (LABEL.replace("START TIMELINE: 1", "START TIMELINE: 3"), ("0/2000028", 3)),
        ("START WAL LOCATION: 0/5000028 (file 000000010000000000000005)\n", ("0/5000028", 1)),  # PG 12
    ],
    ids=["timeline-1", "timeline-3", "no-start-timeline"],
)
def test_a_label_gives_its_start_lsn_and_timeline(label: str, start: tuple[str, int]) -> None:
    assert backup_start(label) == start


@pytest.mark.parametrize("label", ["", "CHECKPOINT LOCATION: 0/2000060\n", "START WAL LOCATION: \n"])
def test_a_label_without_its_start_is_a_value_error(label: str) -> None:
    with pytest.raises(ValueError, match="no START WAL LOCATION"):
        backup_start(label)


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        ("0/2000028 (file 000000010000000000000002)", ("0/2000028", "000000010000000000000002")),
        ("16/B374D848 (file 0000000100000016000000B3)", ("16/B374D848", "0000000100000016000000B3")),
        ("0/2000028", None),
        ("0/2000028 (file 00000001000000000000002)", None),  # 23 digits
        ("0/2000028 (file 000000010000000000000002", None),
        ("0/2000028 (file 00000001000000000000000a)", None),  # PostgreSQL prints upper case
        (None, None),
    ],
    ids=["plain", "high-lsn", "no-file", "short-file", "unclosed", "lower-case", "none"],
)
def test_a_start_wal_location_gives_its_lsn_and_file(
    value: str | None, parsed: tuple[str, str] | None
) -> None:
    assert start_wal_location(value) == parsed


@pytest.mark.parametrize(
    ("text", "when"),
    [
        ("2026-11-26 06:14:54 UTC", datetime(2026, 11, 26, 6, 14, 54, tzinfo=timezone.utc)),
        ("2026-11-26 06:14:54 GMT", datetime(2026, 11, 26, 6, 14, 54, tzinfo=timezone.utc)),
        ("2026-11-26 07:14:54 +01", datetime(2026, 11, 26, 6, 14, 54, tzinfo=timezone.utc)),
        ("2026-11-26 02:44:54 -0330", datetime(2026, 11, 26, 6, 14, 54, tzinfo=timezone.utc)),
        ("2026-11-26 11:44:54 +05:30", datetime(2026, 11, 26, 6, 14, 54, tzinfo=timezone.utc)),
        ("2026-11-26 07:14:54 CET", None),  # an abbreviation names no offset
        ("2026-13-26 06:14:54 UTC", None),
        ("2026-11-26", None),
        ("yesterday", None),
        (None, None),
    ],
    ids=[
        "utc",
        "gmt",
        "plus-hours",
        "minus-hours-minutes",
        "plus-colon",
        "abbreviation",
        "no-date",
        "no-time",
        "text",
        "none",
    ],
)
def test_the_label_start_time_is_read_where_its_zone_says_an_offset(
    text: str | None, when: datetime | None
) -> None:
    assert label_start_time(text) == when


def test_a_label_start_time_keeps_its_own_offset() -> None:
    found = label_start_time("2026-11-26 07:14:54 +01")
    assert found is not None and found.utcoffset() == timedelta(hours=1)


# ------------------------------------------------------------------------------- the old import paths


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("pg_safe_backup.state", "parse_backup_label"),
        ("pg_safe_backup.state", "backup_start"),
        ("pg_safe_backup.state", "parse_lsn"),
        ("pg_safe_backup.state", "format_lsn"),
        ("pg_safe_backup.state", "wal_segment_name"),
        ("pg_safe_backup.state", "wal_segment_names"),
        ("pg_safe_backup.state", "archived_through"),
        ("pg_safe_backup.proof", "label_start_time"),
        ("pg_safe_backup.files.manifest", "timeline_at"),
        ("pg_safe_backup.files.pgcontrol", "parse_lsn"),
        ("pg_safe_backup.files.pgcontrol", "format_lsn"),
    ],
)
def test_a_moved_name_is_still_importable_from_where_it_was(module: str, name: str) -> None:
    assert getattr(importlib.import_module(module), name) is getattr(xlog, name)
