"""Backup of a hot standby: state on the primary, backup session on the standby, restore checked.

The standby itself is made with this project's own backup of the primary (hold, copy, finish,
backup_label into the copy, standby.signal), so it works with every PostgreSQL major here."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from demo.load import Writer, invariant_sql, wait_archived
from pg_safe_backup.copy_check import format_lsn, parse_lsn
from pg_safe_backup.hooks.backup import PostgresBackupHook, backup_functions
from pg_safe_backup.local_cluster import LocalCluster, give_to_server_user
from pg_safe_backup.session import COMPLETE, FAILED, STARTED, HoldRequest, finish_backup, hold_backup, wait_for_start
from pg_safe_backup.state import archived_through, parse_backup_label, wal_segment_name
from pg_safe_backup.verify import verify_backup

from backup_helpers import backup_starts
from conftest import PASSWORD

def SKIP(folder: str, names: list[str]) -> set[str]:
    """What a file-system backup omits: the contents of pg_wal, pg_replslot, pg_stat_tmp; pid files."""
    if Path(folder).name in ("pg_wal", "pg_replslot", "pg_stat_tmp"):
        return set(names)
    return {n for n in names if n in ("postmaster.pid", "postmaster.opts") or n.endswith(".log")}


async def take_backup(hook: PostgresBackupHook, owner: str, source: Path | None = None, dest: Path | None = None,
                      **request) -> tuple[dict, dict]:
    """One backup through the hook: hold, copy ``source`` to ``dest`` (if given), finish; the holder's and
    the finish's events."""
    attempt = f"{owner}#try1"
    holder = asyncio.create_task(hold_backup(hook, HoldRequest(owner, attempt, owner, **{
        "fast_checkpoint": True, "poll_interval": 0.5, **request})))
    started = await asyncio.wait_for(wait_for_start(hook, attempt, poll_interval=0.5), 60)
    assert started["status"] == STARTED, started
    if source is not None:
        await asyncio.to_thread(shutil.copytree, source, dest, ignore=SKIP)
    done = await asyncio.wait_for(finish_backup(hook, attempt, started["backup"]["start_lsn"], poll_interval=0.5), 60)
    return await asyncio.wait_for(holder, 60), done


def backup_into(hook: PostgresBackupHook, source: Path, dest: Path, owner: str) -> dict:
    """A complete backup of ``source`` into ``dest``, with its backup_label written there."""
    held, done = asyncio.run(take_backup(hook, owner, source, dest))
    assert done["status"] == held["status"] == COMPLETE, (held, done)
    (dest / "backup_label").write_text(done["backup"]["backup_label"])
    return done["backup"]


@dataclass
class Pair:
    """A primary archiving into ``archive`` and a streaming hot standby made from it."""

    primary: LocalCluster
    standby: LocalCluster
    archive: Path

    @property
    def hook(self) -> PostgresBackupHook:
        """The standby backed up, its state on the primary."""
        return PostgresBackupHook("pg_standby", state_conn_id="pg_primary")

    def stop_segment(self, stop_lsn: str) -> str:
        """The primary's name of the WAL segment holding the last byte before ``stop_lsn``."""
        return self.primary.sql("SELECT pg_walfile_name(%s::pg_lsn)", [format_lsn(parse_lsn(stop_lsn) - 1)])[0][0]


@pytest.fixture
def make_pair(tmp_root: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Pair]]:
    """Make a :class:`Pair` (connections ``pg_primary``, ``pg_standby``); ``standby_settings`` go into
    the standby's configuration."""
    started: list[LocalCluster] = []

    def make(**standby_settings) -> Pair:
        archive = tmp_root / "archive"
        archive.mkdir()
        give_to_server_user(archive)
        primary = LocalCluster(tmp_root / "primary").init(password=PASSWORD, settings={
            "archive_mode": "on", "archive_command": f"'cp %p {archive}/%f'", "hot_standby": "on"}).start()
        started.append(primary)
        primary.sql("CREATE TABLE ledger (id bigint PRIMARY KEY, v text)")
        monkeypatch.setenv("AIRFLOW_CONN_PG_PRIMARY", primary.airflow_conn_uri(password=PASSWORD))
        backup_into(PostgresBackupHook("pg_primary"), primary.datadir, tmp_root / "standby", "make/standby/base")

        standby = LocalCluster(tmp_root / "standby")
        (standby.datadir / "standby.signal").touch()
        standby.configure({"primary_conninfo": f"'host={primary.socket_dir} port={primary.port} user=postgres'",
                           "restore_command": f"'cp {archive}/%f %p'", "archive_mode": "off",
                           "port": standby.port, "log_statement": "'all'", **standby_settings})
        give_to_server_user(standby.datadir)
        standby.start()
        started.append(standby)
        deadline = time.monotonic() + 60
        while standby.sql("SELECT count(*) FROM pg_stat_wal_receiver WHERE status = 'streaming'") != [(1,)]:
            assert time.monotonic() < deadline, "the standby does not stream"
            time.sleep(0.2)
        assert standby.sql("SELECT pg_is_in_recovery()") == [(True,)]
        monkeypatch.setenv("AIRFLOW_CONN_PG_STANDBY", standby.airflow_conn_uri(password=PASSWORD))
        return Pair(primary, standby, archive)

    yield make
    for cluster in reversed(started):
        cluster.stop("immediate")


def test_backup_of_a_streaming_standby_restores(make_pair, tmp_root):
    pair = make_pair()
    primary = pair.primary
    writer = Writer(primary)
    try:
        writer.start()
        time.sleep(1)  # some writes before the backup starts
        # The backup proper: session on the standby, state table on the primary.
        result = backup_into(pair.hook, pair.standby.datadir, tmp_root / "copy", "nightly/run1/standby")
        committed = writer.stop()
    finally:
        if writer.is_alive():
            writer.stop()
    fields = parse_backup_label(result["backup_label"])
    assert fields["BACKUP FROM"] == "standby" and fields["LABEL"] == "nightly/run1/standby"
    assert primary.sql("SELECT state::text, owner FROM backup") == [("complete", "nightly/run1/standby")]
    # WAL up to the end of the backup (and everything committed since) is in the primary's archive.
    wait_archived(primary)
    assert committed > 200
    check = verify_backup(
        tmp_root / "copy", pair.archive, recovery_target_immediate=False,
        invariant_sql=invariant_sql(("ledger",), committed),
    )
    assert check.ok, check.summary()


def test_standby_backup_is_complete_only_once_the_primary_archived_its_stop_segment(make_pair):
    """The standby's pg_backup_stop switches no WAL: the primary is made to, and its archiver waited for."""
    pair = make_pair()
    pair.primary.sql("INSERT INTO ledger SELECT g, 'x' FROM generate_series(1, 1000) g")  # past a segment's start
    held, done = asyncio.run(take_backup(pair.hook, "nightly/run1/standby"))
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
    held, done = asyncio.run(take_backup(pair.hook, "nightly/run1/standby", backup_timeout=15))
    archived = set(os.listdir(own))
    assert done["status"] == held["status"] == COMPLETE, (held, done)
    assert pair.stop_segment(done["backup"]["stop_lsn"]) in archived


def test_standby_backup_fails_naming_archiving_when_the_primary_cannot_archive(make_pair):
    pair = make_pair()
    pair.primary.sql("ALTER SYSTEM SET archive_command = '/bin/false'")
    pair.primary.sql("SELECT pg_reload_conf()")
    pair.primary.sql("INSERT INTO ledger SELECT g, 'x' FROM generate_series(1, 1000) g")
    t0 = time.monotonic()
    held, done = asyncio.run(take_backup(pair.hook, "nightly/run1/standby", backup_timeout=8))
    took = time.monotonic() - t0
    assert done["status"] == held["status"] == FAILED, (held, done)
    assert "WAL archiving is failing" in held["message"] and "failed attempts" in held["message"]
    assert took < 8 + 15, took
    state, error = pair.primary.sql("SELECT state::text, error FROM backup")[0]
    assert state == "failed" and "archiv" in error
    assert pair.standby.sql("SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'pg_safe_backup%'") == [(0,)]


def test_standby_backup_is_refused_when_neither_it_nor_its_primary_archives(make_pair):
    pair = make_pair()
    pair.primary.sql("ALTER SYSTEM SET archive_command = ''")  # archive_mode=on, but nothing archives
    pair.primary.sql("SELECT pg_reload_conf()")
    time.sleep(0.5)
    result = asyncio.run(asyncio.wait_for(hold_backup(pair.hook, HoldRequest(
        "nightly/run1/standby", "attempt-1", "standby", fast_checkpoint=True, backup_timeout=5)), 30))
    assert result["status"] == FAILED
    assert "'pg_standby'" in result["message"] and "'pg_primary'" in result["message"]
    assert "archive_command" in result["message"] and "wait_for_archive=False" in result["message"]
    assert backup_starts(pair.standby) == 0
    assert pair.primary.sql("SELECT count(*) FROM backup WHERE state IN ('running', 'done')") == [(0,)]


def test_standby_backup_by_a_role_without_superuser_needs_pg_switch_wal(make_pair, monkeypatch):
    """The state connection's role switches WAL on the primary: without that right the backup is refused
    before backup mode, naming the GRANT; with it, the backup completes."""
    pair = make_pair()
    for grant in (f"CREATE ROLE backup_op LOGIN PASSWORD '{PASSWORD}'",
                  f"GRANT EXECUTE ON FUNCTION {backup_functions(pair.primary.server_version())} TO backup_op",
                  "GRANT SELECT, INSERT, UPDATE ON backup TO backup_op"):
        pair.primary.sql(grant)
    deadline = time.monotonic() + 30
    while not pair.standby.sql("SELECT 1 FROM pg_roles WHERE rolname = 'backup_op'"):  # replayed there
        assert time.monotonic() < deadline
        time.sleep(0.2)
    for name, cluster in (("PRIMARY_OP", pair.primary), ("STANDBY_OP", pair.standby)):
        monkeypatch.setenv(f"AIRFLOW_CONN_PG_{name}", cluster.airflow_conn_uri(user="backup_op", password=PASSWORD))
    hook = PostgresBackupHook("pg_standby_op", state_conn_id="pg_primary_op")
    refused = asyncio.run(asyncio.wait_for(hold_backup(hook, HoldRequest(
        "nightly/run1/standby", "attempt-1", "standby", fast_checkpoint=True, backup_timeout=5)), 30))
    assert refused["status"] == FAILED
    assert 'GRANT EXECUTE ON FUNCTION pg_catalog.pg_switch_wal() TO "backup_op"' in refused["message"]
    assert backup_starts(pair.standby) == 0
    pair.primary.sql("GRANT EXECUTE ON FUNCTION pg_catalog.pg_switch_wal() TO backup_op")
    held, done = asyncio.run(take_backup(hook, "nightly/run2/standby"))
    assert done["status"] == held["status"] == COMPLETE, (held, done)


def test_wal_segment_names_match_the_server_s(cluster):
    """xlog_internal.h's naming: the segment holding the byte before an LSN, also at a segment's start."""
    (name, size), = cluster.sql("SELECT pg_walfile_name(pg_current_wal_lsn()), pg_size_bytes(current_setting("
                                "'wal_segment_size'))")
    timeline = int(name[:8], 16)
    for lsn in (5 * size, 5 * size + 0x28, (1 << 32) + 3 * size + 0x1000):  # at a segment start, within, past 4 GB
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
