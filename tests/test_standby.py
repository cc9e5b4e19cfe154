"""Backup of a hot standby: state on the primary, backup session on the standby, restore checked.

The standby itself is made with this project's own backup of the primary (hold, copy, finish,
backup_label into the copy, standby.signal), so it works with every PostgreSQL major here."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path


from demo.load import Writer, invariant_sql, wait_archived
from pg_safe_backup.hooks.backup import PostgresBackupHook
from pg_safe_backup.local_cluster import LocalCluster, give_to_server_user
from pg_safe_backup.session import COMPLETE, STARTED, HoldRequest, finish_backup, hold_backup, wait_for_start
from pg_safe_backup.state import parse_backup_label
from pg_safe_backup.verify import verify_backup

from conftest import PASSWORD

def SKIP(folder: str, names: list[str]) -> set[str]:
    """What a file-system backup omits: the contents of pg_wal, pg_replslot, pg_stat_tmp; pid files."""
    if Path(folder).name in ("pg_wal", "pg_replslot", "pg_stat_tmp"):
        return set(names)
    return {n for n in names if n in ("postmaster.pid", "postmaster.opts") or n.endswith(".log")}


def backup_into(hook: PostgresBackupHook, source: Path, dest: Path, owner: str) -> dict:
    """One backup through the hook: hold, copy ``source`` to ``dest``, finish, write backup_label."""
    async def go():
        attempt = f"{owner}#try1"
        holder = asyncio.create_task(hold_backup(hook, HoldRequest(owner, attempt, owner, fast_checkpoint=True,
                                                                   poll_interval=0.5)))
        started = await asyncio.wait_for(wait_for_start(hook, attempt, poll_interval=0.5), 60)
        assert started["status"] == STARTED, started
        await asyncio.to_thread(shutil.copytree, source, dest, ignore=SKIP)
        done = await asyncio.wait_for(finish_backup(hook, attempt, started["backup"]["start_lsn"], poll_interval=0.5), 60)
        assert (await holder)["status"] == COMPLETE
        return done
    done = asyncio.run(go())
    assert done["status"] == COMPLETE, done
    (dest / "backup_label").write_text(done["backup"]["backup_label"])
    return done["backup"]


def test_backup_of_a_streaming_standby_restores(tmp_root, monkeypatch):
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
        base = backup_into(PostgresBackupHook("pg_primary"), primary.datadir, tmp_root / "standby", "make/standby/base")

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

        # The backup proper: session on the standby, state table on the primary.
        monkeypatch.setenv("AIRFLOW_CONN_PG_STANDBY", standby.airflow_conn_uri(password=PASSWORD))
        hook = PostgresBackupHook("pg_standby", state_conn_id="pg_primary")
        time.sleep(1)  # some writes before the backup starts
        result = backup_into(hook, standby.datadir, tmp_root / "copy", "nightly/run1/standby")
        committed = writer.stop()

        fields = parse_backup_label(result["backup_label"])
        assert fields["BACKUP FROM"] == "standby" and fields["LABEL"] == "nightly/run1/standby"
        assert primary.sql("SELECT state::text, owner FROM backup") == [("complete", "nightly/run1/standby")]
        assert base["backup_label"] != result["backup_label"]
        # WAL up to the end of the backup (and everything committed since) is in the primary's archive.
        wait_archived(primary)
        assert committed > 200
        check = verify_backup(
            tmp_root / "copy", archive, recovery_target_immediate=False,
            invariant_sql=invariant_sql(("ledger",), committed),
        )
        assert check.ok, check.summary()
    finally:
        if writer.is_alive():
            writer.stop()
        if standby:
            standby.stop("immediate")
        primary.stop("immediate")
