"""Backup of a hot standby: state on the primary, backup session on the standby, restore checked.

The standby itself is made with this project's own backup of the primary (hold, copy, finish,
backup_label into the copy, standby.signal), so it works with every PostgreSQL major here.

PostgreSQL writes no end-of-backup record on a standby: recovery of such a backup ends at the
minimum recovery point of the copied global/pg_control, which is only right when pg_control was
copied last (xlog.c, do_pg_backup_stop). The copy helper here copies it in a step of its own, last,
or (to show what the rule prevents) first.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from demo.load import Writer, invariant_sql, wait_archived
from pg_safe_backup.files.pgcontrol import check_copy, parse_lsn
from pg_safe_backup.hooks.backup import PostgresBackupHook
from pg_safe_backup.local_cluster import LocalCluster, give_to_server_user
from pg_safe_backup.state import parse_backup_label
from pg_safe_backup.verify import verify_backup

from backup_helpers import copy_data_dir, run_backup
from conftest import PASSWORD


def backup_into(hook: PostgresBackupHook, dest: Path, owner: str, copy: Callable[[], None]) -> dict:
    """One backup through the hook, ``copy()`` while it is held; its backup_label written into ``dest``."""
    backup = run_backup(hook, owner, copy)
    (dest / "backup_label").write_text(backup["backup_label"])
    return backup


@dataclass
class Standby:
    primary: LocalCluster
    standby: LocalCluster
    archive: Path
    writer: Writer
    base: dict  # the backup of the primary the standby was made from

    def replayed(self, timeout: float = 60) -> None:
        """Wait until the standby replayed everything the primary wrote so far."""
        (lsn,), = self.primary.sql("SELECT pg_current_wal_lsn()::text")
        deadline = time.monotonic() + timeout
        while self.standby.sql("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", [lsn]) != [(True,)]:
            assert time.monotonic() < deadline, f"the standby did not replay up to {lsn}"
            time.sleep(0.1)

    def write_to_disk(self) -> None:
        """A checkpoint on the primary, replayed, then one on the standby: a restartpoint, which writes
        every page the standby changed so far to its disk (and moves its minimum recovery point)."""
        self.primary.sql("CHECKPOINT")
        self.replayed()
        self.standby.sql("CHECKPOINT")

    def more_rows_on_disk(self) -> None:
        """Let the writer commit 300 more rows, then write them to the standby's disk."""
        target = self.writer.committed + 300
        deadline = time.monotonic() + 60
        while self.writer.committed < target:
            assert self.writer.is_alive() and time.monotonic() < deadline, "the writer stopped"
            time.sleep(0.05)
        self.write_to_disk()


@pytest.fixture
def streaming(tmp_root: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Standby]:
    """A primary archiving WAL, a streaming hot standby of it, and a writer on the primary (started)."""
    archive = tmp_root / "archive"
    archive.mkdir()
    give_to_server_user(archive)
    primary = LocalCluster(tmp_root / "primary").init(password=PASSWORD, settings={
        "archive_mode": "on", "archive_command": f"'cp %p {archive}/%f'", "hot_standby": "on"}).start()
    standby = None
    writer = Writer(primary)
    try:
        primary.sql("CREATE TABLE ledger (id bigint PRIMARY KEY, v text)")
        monkeypatch.setenv("AIRFLOW_CONN_PG_PRIMARY", primary.airflow_conn_uri(password=PASSWORD))
        base = backup_into(PostgresBackupHook("pg_primary"), tmp_root / "standby", "make/standby/base",
                           lambda: copy_data_dir(primary.datadir, tmp_root / "standby"))

        standby = LocalCluster(tmp_root / "standby")
        (standby.datadir / "standby.signal").touch()
        standby.configure({"primary_conninfo": f"'host={primary.socket_dir} port={primary.port} user=postgres'",
                           "restore_command": f"'cp {archive}/%f %p'", "archive_mode": "off",
                           "port": standby.port})
        give_to_server_user(standby.datadir)
        standby.start()
        writer.start()
        deadline = time.monotonic() + 60
        while standby.sql("SELECT count(*) FROM pg_stat_wal_receiver WHERE status = 'streaming'") != [(1,)]:
            assert time.monotonic() < deadline, "the standby does not stream"
            time.sleep(0.2)
        assert standby.sql("SELECT pg_is_in_recovery()") == [(True,)]
        monkeypatch.setenv("AIRFLOW_CONN_PG_STANDBY", standby.airflow_conn_uri(password=PASSWORD))
        yield Standby(primary, standby, archive, writer, base)
    finally:
        if writer.is_alive():
            writer.stop()
        if standby:
            standby.stop("immediate")
        primary.stop("immediate")


def standby_backup(s: Standby, dest: Path, owner: str, pg_control_first: bool, meanwhile: Callable[[], None]) -> dict:
    """The backup proper: session on the standby, state table on the primary; ``meanwhile`` runs
    between the two copy steps."""
    hook = PostgresBackupHook("pg_standby", state_conn_id="pg_primary")
    return backup_into(hook, dest, owner, lambda: copy_data_dir(s.standby.datadir, dest, pg_control_first, meanwhile))


def test_backup_of_a_streaming_standby_with_pg_control_copied_last_restores(streaming, tmp_root):
    time.sleep(1)  # some writes before the backup starts
    before = streaming.writer.committed
    streaming.replayed()
    result = standby_backup(streaming, tmp_root / "copy", "nightly/run1/standby", pg_control_first=False,
                            meanwhile=streaming.more_rows_on_disk)
    committed = streaming.writer.stop()

    fields = parse_backup_label(result["backup_label"])
    assert fields["BACKUP FROM"] == "standby"
    assert fields["LABEL"] == "test nightly/run1/standby"
    assert streaming.primary.sql("SELECT state::text, owner FROM backup") == [("complete", "nightly/run1/standby")]
    assert streaming.base["backup_label"] != result["backup_label"]
    # The store's check accepts it: a standby's stop LSN (its minimum recovery point) is past its checkpoint.
    check_copy(tmp_root / "copy", result["system_identifier"], result["backup_label"], result["stop_lsn"])
    # WAL up to the end of the backup (and everything committed since) is in the primary's archive.
    wait_archived(streaming.primary)
    assert committed > before + 300
    # Recovery to the backup's consistent point (the default target) has every row replayed before it began...
    at_consistency = verify_backup(tmp_root / "copy", streaming.archive, invariant_sql=invariant_sql(("ledger",), before))
    assert at_consistency.ok, at_consistency.summary()
    # ... and the whole archive, every row committed.
    whole = verify_backup(tmp_root / "copy", streaming.archive, recovery_target_immediate=False,
                          invariant_sql=invariant_sql(("ledger",), committed))
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
        standby_backup(streaming, copy, "nightly/run2/standby", pg_control_first=True, meanwhile=rows_after_pg_control)
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
