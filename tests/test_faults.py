"""Faults, bad input and least privilege, on real PostgreSQL: every case ends failed with its
reason in the table, no session left in backup mode, and the next backup able to run."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from operator import itemgetter

import psycopg
import pytest

from pg_safe_backup.hooks.backup import PostgresBackupHook, backup_functions
from pg_safe_backup.local_cluster import LocalCluster, free_port, give_to_server_user
from pg_safe_backup.session import (
    COMPLETE,
    FAILED,
    PENDING,
    STARTED,
    HoldRequest,
    finish_backup,
    hold_backup,
    wait_for_start,
)
from pg_safe_backup.state import parse_backup_label

import backup_helpers
from backup_helpers import attempt_of, backup_row, hand_over_row, holder_sessions, wait_until
from conftest import CONN_ID, PASSWORD

OWNER = "nightly/run1/backup"
NEXT = "nightly/run2/backup"
TABLE_ROW = ("state", "error", "owner", "backup_label")  # what a case reads of the backup row


def req(owner: str = OWNER, **kw) -> HoldRequest:
    """:func:`backup_helpers.req` with this module's owner, its label and a shorter poll."""
    return backup_helpers.req(owner, **{"label": f"faults {owner}", "poll_interval": 0.5, **kw})


async def gate(hook: PostgresBackupHook, owner: str = OWNER) -> dict:
    return await backup_helpers.gate(hook, attempt_of(owner))


async def finish(hook: PostgresBackupHook, owner: str = OWNER) -> dict:
    return await backup_helpers.finish(hook, attempt_of(owner))


async def full_backup(hook: PostgresBackupHook, owner: str = NEXT, **kw) -> dict:
    holder = asyncio.create_task(hold_backup(hook, req(owner, **kw)))
    assert (await gate(hook, owner))["status"] == STARTED
    assert (await finish(hook, owner))["status"] == COMPLETE
    return await asyncio.wait_for(holder, 60)


def assert_next_backup_runs(hook: PostgresBackupHook, cluster: LocalCluster, **kw) -> None:
    assert asyncio.run(full_backup(hook, **kw))["status"] == COMPLETE
    assert itemgetter("state", "error", "owner")(backup_row(cluster)) == ("complete", None, NEXT)


# -- bad input ------------------------------------------------------------------------------------


def test_unknown_connection_id_is_named():
    for result in (
        asyncio.run(hold_backup(PostgresBackupHook("no_such_conn"), req())),
        asyncio.run(wait_for_start(PostgresBackupHook("no_such_conn"), attempt_of(OWNER))),
    ):
        assert result["status"] == FAILED and "postgres_conn_id 'no_such_conn'" in result["message"]


def test_unreachable_host(monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_PG_DOWN", f"postgres://u:{PASSWORD}@127.0.0.1:{free_port()}/postgres")
    result = asyncio.run(hold_backup(PostgresBackupHook("pg_down"), req()))
    assert (
        result["status"] == FAILED
        and "cannot connect" in result["message"]
        and "'pg_down'" in result["message"]
    )
    assert PASSWORD not in str(result)


@pytest.mark.parametrize("table", ["", "backup; DROP TABLE x", 'a"b', "1abc", "x" * 60])
def test_hostile_table_names_refused(table):
    with pytest.raises(ValueError, match="table"):
        PostgresBackupHook(CONN_ID, table=table)


def test_hostile_label_is_stored_verbatim(hook, cluster):
    label = """it's "quoted"; DROP TABLE backup; -- $$ \\ end"""

    async def go():
        holder = asyncio.create_task(hold_backup(hook, req(label=label)))
        await gate(hook)
        await finish(hook)
        return await holder

    assert asyncio.run(go())["status"] == COMPLETE
    assert parse_backup_label(backup_row(cluster)["backup_label"])["LABEL"] == label


# -- the holder's session or the server goes away -------------------------------------------------


def test_server_restart_mid_backup_is_detected_and_next_backup_works(hook, cluster):
    async def go():
        holder = asyncio.create_task(hold_backup(hook, req()))
        await gate(hook)
        await asyncio.to_thread(cluster.stop, "fast")
        lost = await asyncio.wait_for(holder, 30)
        await asyncio.to_thread(cluster.start)
        return lost, await finish(hook)

    lost, late_finish = asyncio.run(go())
    assert lost["status"] == FAILED and "session holding backup mode was lost" in lost["message"]
    assert late_finish["status"] == FAILED
    state, error, owner, label = itemgetter(*TABLE_ROW)(backup_row(cluster))
    assert (state, owner, label) == ("failed", OWNER, None) and "gone" in error
    assert_next_backup_runs(hook, cluster)


class Proxy:
    """A TCP proxy in front of the cluster; ``cut()`` drops every connection, as a network failure."""

    def __init__(self, target_port: int) -> None:
        self.target_port, self.port, self.writers = target_port, free_port(), []

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def _handle(self, reader, writer) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.writers += [writer, up_writer]

        async def pipe(src, dst):
            with contextlib.suppress(Exception):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def cut(self) -> None:
        self.server.close()
        for w in self.writers:
            with contextlib.suppress(Exception):
                w.transport.abort()  # RST, no goodbye


def test_network_cut_detected_within_seconds(hook, cluster, monkeypatch):
    async def go():
        proxy = Proxy(cluster.port)
        await proxy.start()
        monkeypatch.setenv(
            "AIRFLOW_CONN_PG_PROXY", f"postgres://postgres:{PASSWORD}@127.0.0.1:{proxy.port}/postgres"
        )
        holder = asyncio.create_task(hold_backup(PostgresBackupHook("pg_proxy"), req(backup_timeout=600)))
        await gate(hook)
        proxy.cut()
        lost = await asyncio.wait_for(holder, 30)  # the backup_timeout (600 s) plays no part
        await wait_until(lambda: holder_sessions(cluster) == 0)
        return lost, await finish(hook)

    lost, late_finish = asyncio.run(go())
    assert lost["status"] == FAILED and "lost" in lost["message"]
    assert late_finish["status"] == FAILED and backup_row(cluster)["state"] == "failed"
    assert re.search(
        "aborting backup due to backend exiting before pg_(backup_stop|stop_backup) was called",
        cluster.log_text(),
    )
    assert_next_backup_runs(hook, cluster)


def test_lost_backup_session_wakes_a_holder_at_once(cluster, monkeypatch):
    """State and backup sessions apart (as for a standby): the backup session is killed while the holder
    sleeps with a 600 s re-read interval and no backup_timeout; its socket wakes it, not a poll."""
    monkeypatch.setenv("AIRFLOW_CONN_PG_STATE", cluster.airflow_conn_uri(password=PASSWORD))
    hook = PostgresBackupHook(CONN_ID, state_conn_id="pg_state")

    async def go():
        holder = asyncio.create_task(hold_backup(hook, req(poll_interval=600)))
        await gate(hook)
        killed = await asyncio.to_thread(
            cluster.sql,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = 'pg_safe_backup holder backup session'",
        )
        t0 = asyncio.get_running_loop().time()
        lost = await asyncio.wait_for(holder, 30)
        return killed, asyncio.get_running_loop().time() - t0, lost

    killed, took, lost = asyncio.run(go())
    assert killed == [(True,)]
    assert lost["status"] == FAILED and "lost" in lost["message"] and took < 5, (took, lost)
    assert backup_row(cluster)["state"] == "failed" and holder_sessions(cluster) == 0
    assert_next_backup_runs(hook, cluster)


def test_a_holder_whose_row_names_another_live_session_fails_its_own_row(hook, cluster):
    """What a pooler did to a holder: its row named a server session that is not its own, so it ended
    backup mode but left the row `running` with a live-looking holder, and the gate opened on it."""

    async def go():
        holder = asyncio.create_task(hold_backup(hook, req(backup_timeout=0)))
        await gate(hook)
        async with await psycopg.AsyncConnection.connect(**cluster.conninfo(), autocommit=True) as other:
            await asyncio.to_thread(
                hand_over_row,
                cluster,
                "attempt = %s, pid = a.pid, holder_started_at = a.backend_start"
                " FROM pg_stat_activity a WHERE a.pid = %s",
                [attempt_of(OWNER), other.info.backend_pid],
            )
            held = await asyncio.wait_for(holder, 30)
            return held, await gate(hook)  # that other session still alive

    held, reopened = asyncio.run(go())
    assert held["status"] == FAILED and "taken over" in held["message"]
    state, error, owner, label = itemgetter(*TABLE_ROW)(backup_row(cluster))
    assert (state, owner, label) == ("failed", OWNER, None) and "taken over" in error
    assert reopened["status"] == FAILED
    assert holder_sessions(cluster) == 0
    assert_next_backup_runs(hook, cluster)


def test_cancelled_holder_marks_failed_and_next_backup_starts(hook, cluster):
    """A cleared holder task (or one marked failed by hand): Airflow cancels its trigger (no backup_timeout
    set).
    Pausing the DAG does not: the run and its backup go on."""

    async def go():
        holder = asyncio.create_task(hold_backup(hook, req(backup_timeout=0)))
        await gate(hook)
        holder.cancel()
        with pytest.raises(asyncio.CancelledError):
            await holder

    asyncio.run(go())
    state, error, owner, _ = itemgetter(*TABLE_ROW)(backup_row(cluster))
    assert (state, owner) == ("failed", OWNER) and "cancelled" in error
    assert holder_sessions(cluster) == 0
    assert_next_backup_runs(hook, cluster)


# -- WAL archiving ------------------------------------------------------------------------------


def test_broken_archiving_is_bounded_by_backup_timeout_and_named(tmp_root, monkeypatch):
    cluster = (
        LocalCluster(tmp_root / "noarchive")
        .init(password=PASSWORD, settings={"archive_mode": "on", "archive_command": "'/bin/false'"})
        .start()
    )
    try:
        monkeypatch.setenv("AIRFLOW_CONN_PG_NOARCHIVE", cluster.airflow_conn_uri(password=PASSWORD))
        hook = PostgresBackupHook("pg_noarchive")

        async def go():
            holder = asyncio.create_task(hold_backup(hook, req(backup_timeout=6, wait_for_archive=True)))
            await gate(hook)
            return await finish(hook), await asyncio.wait_for(holder, 30)

        done, held = asyncio.run(go())
        assert done["status"] == held["status"] == FAILED
        assert "WAL archiving is failing" in held["message"] and "failed attempts" in held["message"]
        state, error, _, label = itemgetter(*TABLE_ROW)(backup_row(cluster))
        assert state == "failed" and "archive_command" in error and label is None
        assert holder_sessions(cluster) == 0
        assert_next_backup_runs(hook, cluster, wait_for_archive=False)
    finally:
        cluster.stop("immediate")


def test_inline_waits_give_up_pending_and_the_deferred_waits_pick_up_where_they_left(tmp_root, monkeypatch):
    """The gate's and the finish's inline waits (``patience``, before they defer): PENDING when nothing
    settled in time, without touching the backup; the waits run again from the start (as their triggers
    do) then see it through. Here the WAL archive refuses files until a flag file appears, so
    pg_backup_stop waits."""
    archive, flag = tmp_root / "archive", tmp_root / "archive_may_take"
    give_to_server_user(tmp_root)
    archive.mkdir()
    give_to_server_user(archive)
    command = f"'test -f {flag} && cp %p {archive}/%f'"
    cluster = (
        LocalCluster(tmp_root / "slowarchive")
        .init(password=PASSWORD, settings={"archive_mode": "on", "archive_command": command})
        .start()
    )
    try:
        monkeypatch.setenv("AIRFLOW_CONN_PG_SLOWARCHIVE", cluster.airflow_conn_uri(password=PASSWORD))
        hook = PostgresBackupHook("pg_slowarchive")
        attempt = attempt_of(OWNER)

        async def go():
            waited = time.monotonic()
            early = await wait_for_start(hook, attempt, poll_interval=5, patience=0.5)
            waited = time.monotonic() - waited
            holder = asyncio.create_task(hold_backup(hook, req(backup_timeout=120, wait_for_archive=True)))
            opened = await wait_for_start(hook, attempt, poll_interval=5, patience=60)
            row = backup_row(cluster)
            pending = await finish_backup(hook, attempt, opened["backup"]["start_lsn"], patience=1)
            between = backup_row(cluster)
            flag.touch()
            done = await finish_backup(hook, attempt, opened["backup"]["start_lsn"], poll_interval=5)
            return early, waited, opened, row, pending, between, done, await asyncio.wait_for(holder, 60)

        early, waited, opened, row, pending, between, done, held = asyncio.run(go())
        # Nothing started yet: PENDING after the patience, not the poll interval.
        assert early["status"] == PENDING and early["backup"] is None and waited < 4
        assert opened["status"] == STARTED and row["state"] == "running"
        # pg_backup_stop waits for the archive: the inline finish asked for the stop and gave up waiting.
        assert pending["status"] == PENDING and between["state"] == "done", (pending, between)
        assert done["status"] == held["status"] == COMPLETE, (done, held)
        assert done["backup"]["backup_label"] and backup_row(cluster)["state"] == "complete"
        assert done["backup"]["start_lsn"] == opened["backup"]["start_lsn"]  # the one backup, started once
    finally:
        cluster.stop("immediate")


def test_a_server_that_does_not_archive_is_refused_before_backup_mode(hook, cluster):
    """archive_mode=off and wait_for_archive=True: the WAL between start and stop would be in no archive."""
    result = asyncio.run(
        asyncio.wait_for(hold_backup(hook, req(wait_for_archive=True, backup_timeout=5)), 30)
    )
    assert result["status"] == FAILED
    assert f"postgres_conn_id {CONN_ID!r}" in result["message"] and "archive_mode=off" in result["message"]
    assert "archive_command" in result["message"]  # the fix: enable archiving
    assert "wait_for_archive=False" in result["message"]  # or opt out, copying the WAL another way
    assert backup_helpers.backup_starts(cluster) == 0
    assert cluster.sql("SELECT count(*) FROM backup WHERE state IN ('running', 'done')") == [(0,)]
    assert_next_backup_runs(hook, cluster)


def test_opting_out_of_archiving_completes_and_keeps_postgresql_s_notice(hook, cluster, caplog):
    """wait_for_archive=False on a server that does not archive: complete, with the server's NOTICE
    in the task log and in the row."""
    caplog.set_level(logging.INFO, logger="pg_safe_backup.session")
    result = asyncio.run(full_backup(hook, wait_for_archive=False))
    assert result["status"] == COMPLETE
    assert "WAL archiving is not enabled" in result["backup"]["warnings"]
    assert cluster.sql("SELECT warnings FROM backup") == [(result["backup"]["warnings"],)]
    assert any("WAL archiving is not enabled" in r.getMessage() for r in caplog.records)


# -- privileges -----------------------------------------------------------------------------------


def make_role(cluster: LocalCluster, monkeypatch, name: str, *grants: str) -> PostgresBackupHook:
    cluster.sql(f"CREATE ROLE {name} LOGIN PASSWORD '{PASSWORD}'")
    for grant in grants:
        cluster.sql(grant.format(role=name))
    monkeypatch.setenv(
        f"AIRFLOW_CONN_PG_{name.upper()}", cluster.airflow_conn_uri(user=name, password=PASSWORD)
    )
    return PostgresBackupHook(f"pg_{name}")


def create_table_as_superuser(hook: PostgresBackupHook) -> None:
    async def go():
        async with hook.connect() as conn:
            await hook.ensure_table(conn)

    asyncio.run(go())


def execute_grant(cluster: LocalCluster, role: str = "{role}") -> str:
    return f"GRANT EXECUTE ON FUNCTION {backup_functions(cluster.server_version())} TO {role}"


TABLE = "GRANT SELECT, INSERT, UPDATE ON backup TO {role}"


def test_missing_execute_privilege_names_the_grant(hook, cluster, monkeypatch):
    create_table_as_superuser(hook)
    weak = make_role(cluster, monkeypatch, "no_execute", TABLE)
    result = asyncio.run(hold_backup(weak, req()))
    assert result["status"] == FAILED
    assert execute_grant(cluster, '"no_execute"') in result["message"]
    state, error, owner, _ = itemgetter(*TABLE_ROW)(backup_row(cluster))
    assert (state, owner) == ("failed", OWNER) and "GRANT EXECUTE" in error
    assert_next_backup_runs(hook, cluster)


def test_missing_table_privilege_names_the_grant(hook, cluster, monkeypatch):
    create_table_as_superuser(hook)
    weak = make_role(cluster, monkeypatch, "no_table", execute_grant(cluster))
    result = asyncio.run(hold_backup(weak, req()))
    assert result["status"] == FAILED
    assert 'GRANT SELECT, INSERT, UPDATE ON "public"."backup" TO "no_table"' in result["message"]
    assert cluster.sql("SELECT count(*) FROM backup") == [(0,)]  # nothing was started
    assert_next_backup_runs(hook, cluster)


def test_missing_schema_privilege_to_create_the_table(cluster, monkeypatch):
    cluster.sql("REVOKE CREATE ON SCHEMA public FROM PUBLIC")  # the default before PostgreSQL 15
    weak = make_role(cluster, monkeypatch, "no_schema", execute_grant(cluster))
    result = asyncio.run(hold_backup(weak, req()))
    assert result["status"] == FAILED and 'GRANT USAGE, CREATE ON SCHEMA "public"' in result["message"]


@pytest.mark.parametrize("table_first", [False, True], ids=["role-creates-table", "admin-created-table"])
def test_least_privilege_role_does_the_whole_job(hook, cluster, monkeypatch, table_first):
    """No superuser, no replication: EXECUTE on the two functions and rights on the table (or schema)."""
    if table_first:
        create_table_as_superuser(hook)
        op = make_role(cluster, monkeypatch, "backup_op", execute_grant(cluster), TABLE)
    else:
        op = make_role(
            cluster,
            monkeypatch,
            "backup_op",
            execute_grant(cluster),
            "GRANT USAGE, CREATE ON SCHEMA public TO {role}",
        )
    assert cluster.sql("SELECT rolsuper, rolreplication FROM pg_roles WHERE rolname = 'backup_op'") == [
        (False, False)
    ]
    assert asyncio.run(full_backup(op))["status"] == COMPLETE
    state, error, owner, label = itemgetter(*TABLE_ROW)(backup_row(cluster))
    assert (state, error, owner) == ("complete", None, NEXT) and label.startswith("START WAL LOCATION")
