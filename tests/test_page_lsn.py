"""The page-LSN check of a copy, without restoring it: no page may pass the backup's consistency point.

One primary and its streaming standby (module scope) give every case in seconds: copies of two
backups of the primary (the second with its own label, and with the first's: a label older than the
copy), and copies of two backups of the standby (global/pg_control copied last, and copied first
while the standby writes pages).
"""

from __future__ import annotations

import json
import re
import shutil
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pg_safe_backup.files.pgcontrol import (
    PRIMARY_SOURCE,
    STANDBY_SOURCE,
    STANDBY_STOP_SOURCE,
    CopyMismatch,
    MissingStopLsn,
    check_page_lsns,
    consistency_point,
    read_pg_control,
    scan_pages,
    stop_lsn_from_manifest,
)
from pg_safe_backup.hooks.backup import PostgresBackupHook
from pg_safe_backup.state import format_lsn, parse_lsn

from backup_helpers import (
    Pair,
    backup_into,
    big_endian_pg_control,
    copy_data_dir,
    pair_maker,
    standby_backup,
)


@dataclass
class Copies:
    """The pair, and each copy with the backup (its row: label, stop LSN) it was taken in."""

    pair: Pair
    primary: dict[str, tuple[Path, dict]]  # "first", "second"
    standby: dict[str, tuple[Path, dict]]  # "pg_control_last", "pg_control_first"


@pytest.fixture(scope="module")
def copies(module_tmp_root: Path) -> Iterator[Copies]:
    root = module_tmp_root
    with pytest.MonkeyPatch.context() as monkeypatch, pair_maker(root, monkeypatch) as make:
        pair = make()
        primary_hook = PostgresBackupHook("pg_primary")

        def rows(first: int, last: int) -> None:
            pair.primary.sql(
                "INSERT INTO ledger SELECT g, md5(g::text) FROM generate_series(%s::int, %s::int) g",
                [first, last],
            )

        primary: dict[str, tuple[Path, dict]] = {}
        for n, name in enumerate(("first", "second")):
            rows(
                n * 10000 + 1, n * 10000 + 10000
            )  # pages newer than the first backup's end, in the second copy
            dest = root / f"primary_{name}"
            primary[name] = (
                dest,
                backup_into(
                    primary_hook,
                    dest,
                    f"d/{name}/backup",
                    lambda d=dest: copy_data_dir(pair.primary.datadir, d),
                ),
            )

        def more_rows_on_standby_disk() -> None:
            rows(30001, 40000)
            pair.write_to_disk()

        standby: dict[str, tuple[Path, dict]] = {}
        for first in (False, True):
            name = "pg_control_first" if first else "pg_control_last"
            dest = root / f"standby_{name}"
            standby[name] = (
                dest,
                standby_backup(pair, dest, f"d/{name}/standby", first, more_rows_on_standby_disk),
            )
            # The next backup's rows are new again; on the standby's disk before its start, they move its
            # minimum recovery point past this backup's stop LSN.
            pair.primary.sql("DELETE FROM ledger WHERE id > 30000")
            pair.write_to_disk()
        yield Copies(pair, primary, standby)


def test_a_primary_s_copy_with_its_own_label_passes(copies):
    for copy, backup in copies.primary.values():
        result = check_page_lsns(copy, backup_label=backup["backup_label"], stop_lsn=backup["stop_lsn"])
        assert result.ok, result.message
        assert result.source == PRIMARY_SOURCE
        assert result.consistency_lsn == parse_lsn(backup["stop_lsn"])
        assert result.newest is not None
        assert result.files > 100  # every catalog's files
        assert result.bytes_scanned > 1_000_000
        assert result.message.startswith(f"no page of the copy in {copy} is newer than {PRIMARY_SOURCE}")


def test_a_label_older_than_the_copy_fails_naming_the_page_and_both_lsns(copies):
    copy, _ = copies.primary["second"]
    _, first = copies.primary["first"]
    result = check_page_lsns(copy, backup_label=first["backup_label"], stop_lsn=first["stop_lsn"])
    assert not result.ok
    newest = scan_pages(copy).newest
    assert newest is not None
    assert newest.lsn > parse_lsn(first["stop_lsn"])
    assert (
        f"{newest.file} block {newest.block} has LSN {format_lsn(newest.lsn)}, {PRIMARY_SOURCE} is"
        f" {first['stop_lsn']}" in result.message
    )
    assert "the label (or the stop LSN) is of an earlier backup than the copy" in result.message


def test_a_standby_s_copy_with_pg_control_copied_last_passes(copies):
    copy, backup = copies.standby["pg_control_last"]
    result = check_page_lsns(copy, backup_label=backup["backup_label"], stop_lsn=None)
    assert result.ok, result.message
    assert result.source == STANDBY_SOURCE
    assert result.consistency_lsn == read_pg_control(copy).min_recovery_point
    assert result.consistency_lsn <= parse_lsn(backup["stop_lsn"])


def test_a_standby_s_copy_with_pg_control_copied_first_fails(copies):
    copy, backup = copies.standby["pg_control_first"]
    result = check_page_lsns(copy, backup_label=backup["backup_label"], stop_lsn=backup["stop_lsn"])
    assert not result.ok
    assert result.newest is not None
    point = read_pg_control(copy).min_recovery_point
    assert result.newest.lsn > point
    assert (
        f"block {result.newest.block} has LSN {format_lsn(result.newest.lsn)}, {STANDBY_SOURCE} is"
        f" {format_lsn(point)}" in result.message
    )
    assert "global/pg_control must be copied last" in result.message


def test_a_standby_s_label_older_than_the_copy_fails(copies):
    """The first standby backup's label and stop LSN on the second one's copy: its pg_control's minimum
    recovery point is past that stop LSN, which is then the point (the pages after it are newer)."""
    copy, _ = copies.standby["pg_control_first"]
    _, first = copies.standby["pg_control_last"]
    result = check_page_lsns(copy, backup_label=first["backup_label"], stop_lsn=first["stop_lsn"])
    assert not result.ok
    assert result.consistency_lsn == parse_lsn(first["stop_lsn"])
    assert result.source == STANDBY_STOP_SOURCE
    assert "the label (or the stop LSN) is of an earlier backup than the copy" in result.message


def test_min_recovery_point_read_matches_the_server_s(copies):
    """pg_control_recovery() reads the same file, so the offsets are checked on every major."""
    standby = copies.pair.standby
    copies.pair.write_to_disk()
    control = read_pg_control(standby.datadir)
    ((point, timeline, backup_end),) = standby.sql(
        "SELECT min_recovery_end_lsn::text, min_recovery_end_timeline, backup_end_lsn::text"
        " FROM pg_control_recovery()"
    )
    assert control.min_recovery_point == parse_lsn(point)
    assert control.min_recovery_point > 0
    assert control.min_recovery_point_tli == timeline
    assert control.backup_end_point == parse_lsn(backup_end)
    assert read_pg_control(copies.pair.primary.datadir).min_recovery_point == 0  # out of recovery


def test_a_standby_label_on_a_primary_s_copy_is_refused(copies):
    copy, backup = copies.primary["first"]
    label = re.sub(r"BACKUP FROM: \w+", "BACKUP FROM: standby", backup["backup_label"])  # 12 says master
    with pytest.raises(
        CopyMismatch, match="has no minimum recovery point: it was copied from a server out of"
    ):
        consistency_point(copy, label, backup["stop_lsn"])


def test_a_primary_s_copy_without_a_stop_lsn_is_refused(copies):
    copy, backup = copies.primary["first"]
    with pytest.raises(MissingStopLsn, match="needs the backup's stop LSN"):
        check_page_lsns(copy, backup_label=backup["backup_label"], stop_lsn=None)


def test_the_stop_lsn_of_a_manifest_is_the_end_of_its_newest_wal_range():
    """backup_manifest.c lists the backup's own timeline first, then the ones it came from."""
    manifest = {
        "PostgreSQL-Backup-Manifest-Version": 1,
        "Files": [],
        "WAL-Ranges": [
            {"Timeline": 2, "Start-LSN": "0/5000000", "End-LSN": "1/2000100"},
            {"Timeline": 1, "Start-LSN": "0/2000028", "End-LSN": "0/5000000"},
        ],
    }
    assert stop_lsn_from_manifest(json.dumps(manifest)) == "1/2000100"
    with pytest.raises(ValueError, match="has no WAL-Ranges"):
        stop_lsn_from_manifest(json.dumps({"Files": []}))


def test_pages_of_a_big_endian_copy_read_the_same(copies, module_tmp_root):
    """A copy in the other byte order (pg_control's fields and the pages' LSN words swapped) has the same
    newest page."""
    copy, _ = copies.primary["first"]
    little = scan_pages(copy)
    assert little.newest is not None
    big = module_tmp_root / "big_endian"
    relation = Path(little.newest.file)
    (big / relation.parent).mkdir(parents=True)
    (big / "global").mkdir(exist_ok=True)
    shutil.copy2(copy / "PG_VERSION", big / "PG_VERSION")
    control = read_pg_control(copy)
    raw = (copy / "global" / "pg_control").read_bytes()
    (big / "global" / "pg_control").write_bytes(big_endian_pg_control(raw, control.pg_control_version))
    pages = bytearray((copy / relation).read_bytes())
    for offset in range(0, len(pages), control.blcksz):
        struct.pack_into(">II", pages, offset, *struct.unpack_from("<II", pages, offset))
    (big / relation).write_bytes(bytes(pages))

    assert scan_pages(big).newest == little.newest
