"""Backup of a hot standby: state on the primary, backup session on the standby, restore checked.

The standby itself is made with this project's own backup of the primary (hold, copy, finish,
backup_label into the copy, standby.signal), so it works with every PostgreSQL major here.

PostgreSQL writes no end-of-backup record on a standby: recovery of such a backup ends at the
minimum recovery point of the copied global/pg_control, which is only right when pg_control was
copied last (xlog.c, do_pg_backup_stop). The copy helper here copies it in a step of its own, last,
or (to show what the rule prevents) first.

Nor does the standby's pg_backup_stop switch WAL: the holder makes the primary switch, and waits for
the archiver that archives the stop segment (the primary's, or the standby's own with
archive_mode=always).
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from demo.load import invariant_sql, wait_archived
from pg_safe_backup.files.manifest import write_backup_manifest
from pg_safe_backup.files.pgcontrol import check_copy
from pg_safe_backup.hooks.backup import PostgresBackupHook, backup_functions
from pg_safe_backup.local_cluster import give_to_server_user
from pg_safe_backup.session import COMPLETE, FAILED, hold_backup
from pg_safe_backup.state import archived_through, format_lsn, parse_backup_label, parse_lsn, wal_segment_name
from pg_safe_backup.verify import check_backup, verify_backup

from backup_helpers import Pair, backup_events, backup_starts, pair_maker, req, standby_backup, wait_for
from conftest import PASSWORD
from pg_versions import verifier_for


def archived_backup(hook: PostgresBackupHook, owner: str, **request) -> tuple[dict, dict]:
    """A backup (nothing copied) that waits for its WAL to be archived: the holder's and the finish's events.

    :param request: more :class:`~pg_safe_backup.session.HoldRequest` options (``backup_timeout``, ...).
    """
    return asyncio.run(backup_events(hook, req(owner, poll_interval=0.5, wait_for_archive=True, **request)))


def refused(hook: PostgresBackupHook, owner: str) -> dict:
    """The holder's event of a backup that waits for its WAL to be archived, expected to fail before backup
    mode."""
    r = req(owner, wait_for_archive=True, backup_timeout=5)
    return asyncio.run(asyncio.wait_for(hold_backup(hook, r), 30))


@pytest.fixture
def make_pair(tmp_root: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Pair]]:
    """Make a :class:`Pair` (connections ``pg_primary``, ``pg_standby``): ``make(writing=True)`` starts its
    writer once the standby runs; the other keywords go into the standby's configuration."""
    with pair_maker(tmp_root, monkeypatch) as make:
        yield make


@pytest.fixture
def streaming(make_pair: Callable[..., Pair]) -> Pair:
    """A :class:`Pair` whose writer is running."""
    return make_pair(writing=True)


def test_backup_of_a_streaming_standby_with_pg_control_copied_last_restores(streaming, tmp_root):
    wait_for(lambda: streaming.writer.committed >= 100, what="some writes before the backup starts")
    before = streaming.writer.committed
    streaming.replayed()
    result = standby_backup(
        streaming,
        tmp_root / "copy",
        "nightly/run1/standby",
        pg_control_first=False,
        meanwhile=streaming.more_rows_on_disk,
    )
    committed = streaming.writer.stop()

    fields = parse_backup_label(result["backup_label"])
    assert fields["BACKUP FROM"] == "standby"
    assert fields["LABEL"] == "test nightly/run1/standby"
    assert streaming.primary.sql("SELECT state::text, owner FROM backup") == [
        ("complete", "nightly/run1/standby")
    ]
    assert streaming.base["backup_label"] != result["backup_label"]
    # The store's check accepts it: a standby's stop LSN (its minimum recovery point) is past its checkpoint.
    check_copy(tmp_root / "copy", result["system_identifier"], result["backup_label"], result["stop_lsn"])
    # WAL up to the end of the backup (and everything committed since) is in the primary's archive.
    wait_archived(streaming.primary)
    assert committed > before + 300
    # At rest: no page past the copied pg_control's minimum recovery point, and (13+) pg_verifybackup
    # accepts the manifest of a standby's backup, its WAL range parsed from the primary's archive.
    major = streaming.standby.server_version() // 10000
    write_backup_manifest(  # PostgreSQL 12 too: version 1
        tmp_root / "copy",
        backup_label=result["backup_label"],
        stop_lsn=result["stop_lsn"],
        system_identifier=result["system_identifier"],
    )
    report = check_backup(
        tmp_root / "copy",
        streaming.archive,
        restore=False,
        verifier_bindir=(verifier_for(major) or [None])[0],
    )
    page, verified = report.steps
    assert page.status == "PASS" and "minimum recovery point" in page.details["consistency_from"], page
    assert verified.status == "PASS", verified
    # Recovery to the backup's consistent point (the default target) has every row replayed before it began...
    at_consistency = verify_backup(
        tmp_root / "copy", streaming.archive, invariant_sql=invariant_sql(("ledger",), before)
    )
    assert at_consistency.ok, at_consistency.summary()
    # ... and the whole archive, every row committed.
    whole = verify_backup(
        tmp_root / "copy",
        streaming.archive,
        recovery_target_immediate=False,
        invariant_sql=invariant_sql(("ledger",), committed),
    )
    assert whole.ok, whole.summary()


def test_standby_copy_with_pg_control_copied_first_fails_the_restore_check(streaming, tmp_root):
    """Pages written to the standby's disk after its pg_control was copied are newer than where recovery
    of the copy becomes consistent. Here they hold rows of a transaction that began before the backup
    (so amcheck finds their xmin valid, and in progress at that point): only their LSN shows it."""
    streaming.writer.stop()
    streaming.primary.sql("CREATE TABLE pending (id bigint PRIMARY KEY, v text)")
    with streaming.primary.connect() as open_tx:
        open_tx.execute("BEGIN")
        open_tx.execute("INSERT INTO pending SELECT g, md5(g::text) FROM generate_series(1, 10) g")
        streaming.write_to_disk()  # the checkpoint the backup starts from knows this transaction's xid

        def rows_after_pg_control() -> None:
            open_tx.execute("INSERT INTO pending SELECT g, md5(g::text) FROM generate_series(11, 20000) g")
            streaming.write_to_disk()

        copy = tmp_root / "copy"
        standby_backup(
            streaming, copy, "nightly/run2/standby", pg_control_first=True, meanwhile=rows_after_pg_control
        )
        open_tx.execute("COMMIT")
    wait_archived(streaming.primary)

    check = verify_backup(copy, streaming.archive)
    assert not check.ok, check.summary()
    consistent = check.details["consistent_lsn"]
    assert consistent, check.summary()
    newest = check.details["newest_page_lsn"]
    assert parse_lsn(newest) > parse_lsn(consistent)
    reason = next((r for r in check.reasons if "newer than" in r), None)
    assert reason is not None, check.summary()
    assert re.search(rf"\bLSN {re.escape(newest)}\b", reason), reason
    assert re.search(rf"\bconsistent at {re.escape(consistent)}\b", reason), reason


def test_standby_backup_is_complete_only_once_the_primary_archived_its_stop_segment(make_pair):
    """The standby's pg_backup_stop switches no WAL: the primary is made to, and its archiver waited for."""
    pair = make_pair()
    pair.primary.sql(
        "INSERT INTO ledger SELECT g, 'x' FROM generate_series(1, 1000) g"
    )  # past a segment's start
    held, done = archived_backup(pair.hook, "nightly/run1/standby")
    archived = set(os.listdir(pair.archive))  # right at COMPLETE
    assert done["status"] == held["status"] == COMPLETE, (held, done)
    assert pair.stop_segment(done["backup"]["stop_lsn"]) in archived


def test_standby_with_archive_mode_always_waits_for_its_own_archiver(make_pair, tmp_root):
    """archive_mode=always: the standby archives its WAL itself, once the primary switched it."""
    own = tmp_root / "standby_archive"
    own.mkdir()
    give_to_server_user(own)
    pair = make_pair(archive_mode="always", archive_command=f"'cp %p {own}/%f'")
    pair.primary.sql("INSERT INTO ledger SELECT g, 'x' FROM generate_series(1, 1000) g")
    held, done = archived_backup(pair.hook, "nightly/run1/standby", backup_timeout=15)
    archived = set(os.listdir(own))
    assert done["status"] == held["status"] == COMPLETE, (held, done)
    assert pair.stop_segment(done["backup"]["stop_lsn"]) in archived


def test_standby_backup_fails_naming_archiving_when_the_primary_cannot_archive(make_pair):
    pair = make_pair()
    pair.primary.sql("ALTER SYSTEM SET archive_command = '/bin/false'")
    pair.primary.sql("SELECT pg_reload_conf()")
    pair.primary.sql("INSERT INTO ledger SELECT g, 'x' FROM generate_series(1, 1000) g")
    t0 = time.monotonic()
    held, done = archived_backup(pair.hook, "nightly/run1/standby", backup_timeout=8)
    took = time.monotonic() - t0
    assert done["status"] == held["status"] == FAILED, (held, done)
    assert "WAL archiving is failing" in held["message"] and "failed attempts" in held["message"]
    assert took < 8 + 15, took
    state, error = pair.primary.sql("SELECT state::text, error FROM backup")[0]
    assert state == "failed" and "archiv" in error
    assert pair.standby.sql(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'pg_safe_backup%'"
    ) == [(0,)]


def test_standby_backup_is_refused_when_neither_it_nor_its_primary_archives(make_pair):
    pair = make_pair()
    pair.primary.sql("ALTER SYSTEM SET archive_command = ''")  # archive_mode=on, but nothing archives
    pair.primary.sql("SELECT pg_reload_conf()")
    wait_for(lambda: pair.primary.sql("SHOW archive_command") == [("",)], what="the reload")
    result = refused(pair.hook, "nightly/run1/standby")
    assert result["status"] == FAILED
    assert "'pg_standby'" in result["message"] and "'pg_primary'" in result["message"]
    assert "archive_command" in result["message"] and "wait_for_archive=False" in result["message"]
    assert backup_starts(pair.standby) == 0
    assert pair.primary.sql("SELECT count(*) FROM backup WHERE state IN ('running', 'done')") == [(0,)]


def test_standby_backup_by_a_role_without_superuser_needs_pg_switch_wal(make_pair, monkeypatch):
    """The state connection's role switches WAL on the primary: without that right the backup is refused
    before backup mode, naming the GRANT; with it, the backup completes."""
    pair = make_pair()
    for grant in (
        f"CREATE ROLE backup_op LOGIN PASSWORD '{PASSWORD}'",
        f"GRANT EXECUTE ON FUNCTION {backup_functions(pair.primary.server_version())} TO backup_op",
        "GRANT SELECT, INSERT, UPDATE ON backup TO backup_op",
    ):
        pair.primary.sql(grant)
    deadline = time.monotonic() + 30
    while not pair.standby.sql("SELECT 1 FROM pg_roles WHERE rolname = 'backup_op'"):  # replayed there
        assert time.monotonic() < deadline
        time.sleep(0.2)
    for name, cluster in (("PRIMARY_OP", pair.primary), ("STANDBY_OP", pair.standby)):
        monkeypatch.setenv(
            f"AIRFLOW_CONN_PG_{name}", cluster.airflow_conn_uri(user="backup_op", password=PASSWORD)
        )
    hook = PostgresBackupHook("pg_standby_op", state_conn_id="pg_primary_op")
    result = refused(hook, "nightly/run1/standby")
    assert result["status"] == FAILED
    assert 'GRANT EXECUTE ON FUNCTION pg_catalog.pg_switch_wal() TO "backup_op"' in result["message"]
    assert backup_starts(pair.standby) == 0
    pair.primary.sql("GRANT EXECUTE ON FUNCTION pg_catalog.pg_switch_wal() TO backup_op")
    held, done = archived_backup(hook, "nightly/run2/standby")
    assert done["status"] == held["status"] == COMPLETE, (held, done)


def test_wal_segment_names_match_the_server_s(cluster):
    """xlog_internal.h's naming: the segment holding the byte before an LSN, also at a segment's start."""
    ((name, size),) = cluster.sql(
        "SELECT pg_walfile_name(pg_current_wal_lsn()), pg_size_bytes(current_setting('wal_segment_size'))"
    )
    timeline = int(name[:8], 16)
    for lsn in (
        5 * size,
        5 * size + 0x28,
        (1 << 32) + 3 * size + 0x1000,
    ):  # at a segment start, within, past 4 GB
        server = cluster.sql("SELECT pg_walfile_name(%s::pg_lsn)", [format_lsn(lsn - 1)])[0][0]
        assert wal_segment_name(format_lsn(lsn), timeline, size) == server


def test_archived_through_reads_every_kind_of_archived_file_name():
    segment = "000000010000000000000005"
    assert archived_through(segment, segment)
    assert archived_through("000000010000000000000006.partial", segment)
    assert archived_through("000000010000000000000005.00000028.backup", segment)
    assert archived_through("000000020000000000000005", segment)  # the next timeline, forked in that segment
    assert not archived_through("000000010000000000000004", segment)
    assert not archived_through("00000002.history", segment)
    assert not archived_through(None, segment)
