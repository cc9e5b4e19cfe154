"""The store task's safety checks against real copies: pg_control read and checked (CRC, version, byte
order), wrong cluster, copy older than the backup or newer than it, label files an earlier attempt left;
and the restore check of a copy newer than its label."""

from __future__ import annotations

import logging
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import fsspec
import pytest

from airflow.sdk import ObjectStoragePath
from airflow.sdk.io import attach

from demo.load import wait_archived
from pg_safe_backup.files.label import store_label
from pg_safe_backup.files.pgcontrol import (
    BadPgControl,
    CopyMismatch,
    check_copy,
    crc32c,
    format_lsn,
    newest_page,
    parse_lsn,
    read_pg_control,
)
from pg_safe_backup.hooks.backup import PostgresBackupHook
from pg_safe_backup.local_cluster import LocalCluster, give_to_server_user
from pg_safe_backup.state import parse_backup_label
from pg_safe_backup.verify import verify_backup

from backup_helpers import archiving_cluster, big_endian_pg_control, copy_data_dir, run_backup
from conftest import CONN_ID, PASSWORD


def label_files(backup: dict) -> dict[str, str | None]:
    return {"backup_label": backup["backup_label"], "tablespace_map": backup["tablespace_map"]}


def test_pg_control_read_matches_the_server(cluster):
    cluster.sql("CHECKPOINT")
    control = read_pg_control(cluster.datadir)
    ((sysid, version, catalog),) = cluster.sql(
        "SELECT system_identifier, pg_control_version, catalog_version_no FROM pg_control_system()"
    )
    ((checkpoint,),) = cluster.sql("SELECT checkpoint_lsn::text FROM pg_control_checkpoint()")
    ((block_size, segment_size),) = cluster.sql(
        "SELECT database_block_size, bytes_per_wal_segment FROM pg_control_init()"
    )
    assert control.system_identifier == sysid % (1 << 64)
    assert control.pg_control_version == version
    assert control.catalog_version_no == catalog
    assert control.checkpoint == parse_lsn(checkpoint)
    assert control.blcksz == block_size
    assert control.xlog_seg_size == segment_size
    assert control.byte_order == "<"  # this machine's servers write little-endian files


def test_pg_control_is_read_in_the_byte_order_of_the_file(cluster, tmp_root):
    """A big-endian server's pg_control (the fields this reader uses swapped, CRC recomputed) reads the
    same."""
    raw = (cluster.datadir / "global" / "pg_control").read_bytes()
    little = read_pg_control(cluster.datadir)
    (tmp_root / "big" / "global").mkdir(parents=True)
    big_control = big_endian_pg_control(raw, little.pg_control_version)
    (tmp_root / "big" / "global" / "pg_control").write_bytes(big_control)

    big = read_pg_control(tmp_root / "big")
    assert big.byte_order == ">"
    assert (big.system_identifier, big.pg_control_version, big.checkpoint, big.blcksz, big.xlog_seg_size) == (
        little.system_identifier,
        little.pg_control_version,
        little.checkpoint,
        little.blcksz,
        little.xlog_seg_size,
    )


@pytest.mark.parametrize(
    "damage, error",
    [
        ("flip a byte the CRC covers", "fails its CRC check"),
        ("truncate", "not a whole pg_control"),
        ("unknown version, CRC recomputed", "has pg_control_version 1100"),
    ],
)
def test_damaged_pg_control_is_refused(cluster, tmp_root, damage, error):
    cluster.sql("CHECKPOINT")
    copy = tmp_root / "copy"
    copy_data_dir(cluster.datadir, copy)
    label = f"CHECKPOINT LOCATION: {format_lsn(read_pg_control(copy).checkpoint)}\n"
    check_copy(copy, None, label)  # undamaged: accepted
    path = copy / "global" / "pg_control"
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        raw = raw[:4096]
    elif damage.startswith("flip"):
        raw[40] ^= 0x01
    else:
        struct.pack_into("<I", raw, 8, 1100)
        struct.pack_into("<I", raw, 288, crc32c(bytes(raw[:288])))
    path.write_bytes(bytes(raw))
    with pytest.raises(BadPgControl, match=error):
        check_copy(copy, None, label)


def test_copy_during_backup_accepted_older_copy_and_other_cluster_refused(hook, cluster, tmp_root):
    copy_data_dir(cluster.datadir, tmp_root / "before")
    backup = run_backup(hook, "d/r/backup", lambda: copy_data_dir(cluster.datadir, tmp_root / "during"))
    check_copy(tmp_root / "during", backup["system_identifier"], backup["backup_label"], backup["stop_lsn"])

    with pytest.raises(CopyMismatch, match="taken before this backup started"):
        check_copy(tmp_root / "before", backup["system_identifier"], backup["backup_label"])

    other = LocalCluster(tmp_root / "other").init(fresh=True)
    with pytest.raises(CopyMismatch, match="of another cluster"):
        check_copy(other.datadir, backup["system_identifier"], backup["backup_label"])


@dataclass
class TwoBackups:
    cluster: LocalCluster
    archive: Path
    first: dict
    second: dict
    copy1: Path
    copy2: Path


@pytest.fixture
def two_backups(tmp_root: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TwoBackups]:
    """Two backups of an archiving cluster, each copied into its own folder (labels not stored). Between
    them VACUUM FREEZE rewrites the table's pages: the second copy holds pages newer than the first
    backup's end, yet no transaction id the first backup's WAL does not know."""
    archive = tmp_root / "archive"
    archive.mkdir()
    give_to_server_user(archive)
    cluster = archiving_cluster(tmp_root / "data", archive, PASSWORD, autovacuum="off")
    monkeypatch.setenv(f"AIRFLOW_CONN_{CONN_ID.upper()}", cluster.airflow_conn_uri(password=PASSWORD))
    try:
        cluster.sql("CREATE TABLE ledger (id bigint PRIMARY KEY, v text)")
        cluster.sql("INSERT INTO ledger SELECT g, md5(g::text) FROM generate_series(1, 20000) g")
        hook = PostgresBackupHook(CONN_ID)
        copy1, copy2 = tmp_root / "run1", tmp_root / "run2"
        first = run_backup(hook, "d/run1/backup", lambda: copy_data_dir(cluster.datadir, copy1))
        cluster.sql("VACUUM (FREEZE) ledger")
        second = run_backup(hook, "d/run2/backup", lambda: copy_data_dir(cluster.datadir, copy2))
        wait_archived(cluster)
        yield TwoBackups(cluster, archive, first, second, copy1, copy2)
    finally:
        cluster.stop("immediate")


def test_store_refuses_the_copy_of_a_later_backup_with_an_earlier_label(two_backups):
    b = two_backups
    with pytest.raises(CopyMismatch) as refused:
        store_label(
            b.copy2,
            label_files(b.first),
            local_copy=b.copy2,
            system_identifier=b.first["system_identifier"],
            stop_lsn=b.first["stop_lsn"],
        )
    checkpoint = format_lsn(read_pg_control(b.copy2).checkpoint)
    assert (
        f"its last checkpoint is {checkpoint}, at or past this backup's stop LSN {b.first['stop_lsn']}"
        in str(refused.value)
    )
    assert not (b.copy2 / "backup_label").exists()
    # Its own label is accepted.
    store_label(
        b.copy2,
        label_files(b.second),
        local_copy=b.copy2,
        system_identifier=b.second["system_identifier"],
        stop_lsn=b.second["stop_lsn"],
    )
    assert (b.copy2 / "backup_label").read_text() == b.second["backup_label"]


def test_restore_check_fails_a_copy_newer_than_its_label(two_backups):
    b = two_backups
    (b.copy2 / "backup_label").write_text(b.first["backup_label"])
    newest = newest_page(b.copy2)
    assert newest is not None
    assert newest.lsn > parse_lsn(b.first["stop_lsn"])

    check = verify_backup(b.copy2, b.archive)
    assert not check.ok, check.summary()
    assert check.details["consistent_lsn"] == b.first["stop_lsn"]
    reason = next((r for r in check.reasons if "newer than" in r), None)
    assert reason is not None, check.summary()
    assert f"has LSN {format_lsn(newest.lsn)}, recovery was consistent at {b.first['stop_lsn']}" in reason


def test_store_removes_label_files_an_earlier_attempt_left_and_logs_it(two_backups, caplog):
    b = two_backups
    # An earlier attempt of the run stored its label (and a tablespace_map) here; this attempt copied again.
    (b.copy2 / "backup_label").write_text(b.first["backup_label"])
    (b.copy2 / "tablespace_map").write_text("16390 /srv/space1\n")
    with caplog.at_level(logging.INFO, logger="pg_safe_backup.files.label"):
        written = store_label(
            b.copy2,
            label_files(b.second),
            local_copy=b.copy2,
            system_identifier=b.second["system_identifier"],
            stop_lsn=b.second["stop_lsn"],
        )
    assert written == {"backup_label": str(b.copy2 / "backup_label")}
    assert (b.copy2 / "backup_label").read_text() == b.second["backup_label"]
    assert not (b.copy2 / "tablespace_map").exists()
    removed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("removed")]
    earlier_start = parse_backup_label(b.first["backup_label"])["START WAL LOCATION"]
    assert removed == [
        f"removed the backup_label an earlier attempt left in {b.copy2} (START WAL LOCATION {earlier_start},"
        f" LABEL {parse_backup_label(b.first['backup_label'])['LABEL']})",
        f"removed the tablespace_map an earlier attempt left in {b.copy2}",
    ]


def test_store_says_why_it_skips_the_copy_check(two_backups, tmp_root, caplog):
    b = two_backups
    files = label_files(b.second)
    attach("memory", fs=fsspec.filesystem("memory"))  # an object store (Airflow < 3.2 has no fallback)
    bucket = ObjectStoragePath(f"memory://pgsb-test/{tmp_root.name}")
    (bucket / "backup_label").parent.mkdir(parents=True, exist_ok=True)
    (bucket / "backup_label").write_text(b.first["backup_label"])
    labels_only = tmp_root / "labels_only"
    with caplog.at_level(logging.INFO, logger="pg_safe_backup.files.label"):
        store_label(bucket, files, local_copy=None, system_identifier=None, stop_lsn=b.second["stop_lsn"])
        store_label(
            labels_only, files, local_copy=labels_only, system_identifier=None, stop_lsn=b.second["stop_lsn"]
        )
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("not checking")]
    assert skipped == [
        f"not checking that the copy in {bucket} belongs to this backup: it is in an object store, whose"
        " global/pg_control is not read here",
        f"not checking that the copy in {labels_only} belongs to this backup: it has no global/pg_control "
        "(is the data directory copied somewhere else?)",
    ]
    assert (bucket / "backup_label").read_text() == b.second["backup_label"]
    assert (labels_only / "backup_label").read_text() == b.second["backup_label"]
