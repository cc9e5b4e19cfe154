"""The backup state machine driven through hook + holder/waiter functions on real PostgreSQL."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import psycopg
import pytest

from pg_safe_backup.hooks.backup import SCHEMA_VERSION, PostgresBackupHook
from pg_safe_backup.local_cluster import give_to_server_user
from pg_safe_backup.session import COMPLETE, FAILED, HoldView, hold_backup, wait_for_start
from pg_safe_backup.state import parse_backup_label

# tests/ is on sys.path (pytest's default "prepend" import mode)
from backup_helpers import (
    ATTEMPT,
    OWNER,
    attempt_of,
    backup_row,
    backup_starts,
    finish,
    req,
    session_alive,
    session_ended,
    started,
    wait_until,
)

# -- schema -------------------------------------------------------------------------------------


def test_table_created_on_first_use_with_seed_compatible_schema(hook, cluster):
    async def go():
        async with hook.connect() as conn:
            await hook.ensure_table(conn)
            await hook.ensure_table(conn)  # idempotent

    asyncio.run(go())
    enum = cluster.sql("SELECT unnest(enum_range(NULL::backup_state))::text")
    assert [e[0] for e in enum] == ["running", "done", "complete", "failed"]
    cols = {
        r[0]: r[1]
        for r in cluster.sql(
            "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = 'backup'"
        )
    }
    for name in (
        "id",
        "state",
        "pid",
        "backup_label",
        "tablespace_map",
        "owner",
        "start_lsn",
        "stop_lsn",
        "timeline",
        "label",
        "started_at",
        "finished_at",
        "error",
    ):
        assert name in cols, name
    indexes = [r[0] for r in cluster.sql("SELECT indexdef FROM pg_indexes WHERE tablename = 'backup'")]
    assert any("((1))" in d and "UNIQUE" in d for d in indexes), indexes
    assert cluster.sql("SELECT backup_label FROM backup") == []
    assert cluster.sql("SELECT obj_description('backup'::regclass, 'pg_class')") == [(SCHEMA_VERSION,)]


SEED_SCHEMA = """
CREATE TYPE backup_state AS ENUM ('running', 'done', 'complete', 'failed');
CREATE TABLE backup (id integer PRIMARY KEY, state backup_state, pid integer, backup_label text,
tablespace_map text);
CREATE UNIQUE INDEX backup_single_row ON backup ((1));
INSERT INTO backup VALUES (1, 'complete', 4242, 'START WAL LOCATION: 0/1 (file x)' || chr(10), NULL);
"""


def test_seed_table_migrated_in_place_and_reused(hook, cluster):
    for stmt in filter(str.strip, SEED_SCHEMA.split(";")):
        cluster.sql(stmt)

    async def go():
        holder, _ = await started(hook, req())
        assert (await finish(hook))["status"] == COMPLETE
        return await holder

    result = asyncio.run(go())
    assert result["status"] == COMPLETE
    r = backup_row(cluster)
    assert r["state"] == "complete" and r["owner"] == OWNER
    assert cluster.sql("SELECT backup_label FROM backup")[0][0] == r["backup_label"]
    assert cluster.sql("SELECT count(*) FROM backup") == [(1,)]


def test_state_transitions_enforced_by_the_table(hook, cluster):
    async def go():
        holder, _ = await started(hook, req())
        await finish(hook)
        await holder

    asyncio.run(go())
    with pytest.raises(psycopg.errors.CheckViolation, match="from complete to done"):
        cluster.sql("UPDATE backup SET state = 'done'")
    with pytest.raises(psycopg.IntegrityError):  # CHECK (id = 1) and the unique index on ((1))
        cluster.sql("INSERT INTO backup (id, state) VALUES (2, 'running')")


# -- the normal life ----------------------------------------------------------------------------


def test_full_cycle_label_matches_backup(hook, cluster):
    async def go():
        holder, gate = await started(hook, req())
        during = backup_row(cluster)
        assert during["state"] == "running" and session_alive(cluster, during["pid"])
        done = await finish(hook, start_lsn=gate["backup"]["start_lsn"])
        return gate, done, await holder, during["pid"]

    gate, done, held, holder_pid = asyncio.run(go())
    assert done["status"] == held["status"] == COMPLETE
    r = backup_row(cluster)
    assert r["state"] == "complete" and r["error"] is None
    fields = parse_backup_label(r["backup_label"])
    assert fields["LABEL"] == f"test {OWNER}"
    assert fields["START WAL LOCATION"].split()[0] == gate["backup"]["start_lsn"] == r["start_lsn"]
    assert fields["BACKUP METHOD"] == "streamed" and fields["BACKUP FROM"] in (
        "primary",
        "master",
    )  # master: <= 12
    assert int(fields["START TIMELINE"]) == r["timeline"] == 1
    assert done["backup"]["backup_label"] == r["backup_label"] and r["tablespace_map"] is None
    lsn = cluster.sql("SELECT %s::pg_lsn >= %s::pg_lsn", [r["stop_lsn"], r["start_lsn"]])
    assert lsn == [(True,)]
    assert session_ended(cluster, holder_pid)
    assert backup_starts(cluster) == 1


def test_plain_update_from_old_post_script_wakes_holder(hook, cluster):
    """The old post-script's `UPDATE backup SET state = 'done'` is enough; NOTIFY wakes the holder
    (its poll interval here is far longer than the wait allowed)."""

    async def go():
        holder, _ = await started(hook, req(poll_interval=600))
        await asyncio.to_thread(cluster.sql, "UPDATE backup SET state = 'done'")
        return await asyncio.wait_for(holder, 30)

    assert asyncio.run(go())["status"] == COMPLETE
    assert backup_row(cluster)["state"] == "complete"


def _wakeups_of_this_thread() -> int:
    """Voluntary context switches of the calling thread (each sleep of its event loop is one)."""
    import threading

    status = Path(f"/proc/self/task/{threading.get_native_id()}/status").read_text()
    return int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("voluntary_ctxt_switches")))


async def waiter_busy(other: psycopg.AsyncConnection, pid: int, timeout: float = 15) -> None:
    """Wait until the backend ``pid`` runs a statement, as ``other`` sees it."""
    deadline = time.monotonic() + timeout
    while await (
        await other.execute("SELECT state FROM pg_stat_activity WHERE pid = %s", [pid])
    ).fetchone() != ("active",):
        assert time.monotonic() < deadline, f"backend {pid} did not start its statement"
        await asyncio.sleep(0.02)


def test_wait_for_change_sleeps_until_something_arrives(hook, cluster):
    """A waiter wakes for a NOTIFY, for one that came in with a statement's results, and for the
    server ending its session; in between it does not wake up (psycopg's notifies() would, every 0.1 s)."""

    async def go():
        async with hook.connect("waiter") as conn, hook.connect("other") as other:
            await hook.ensure_table(conn)
            await hook.listen(conn)
            # 1. Nothing happens: one sleep for the whole timeout, not one per 0.1 s.
            before, t0 = _wakeups_of_this_thread(), time.monotonic()
            await hook.wait_for_change(conn, 2.0)
            idle = (time.monotonic() - t0, _wakeups_of_this_thread() - before)
            # 2. A NOTIFY sent while the waiter sleeps.
            t0 = time.monotonic()
            sender = asyncio.create_task(asyncio.sleep(0.3))
            sender.add_done_callback(
                lambda _: asyncio.ensure_future(
                    other.execute(psycopg.sql.SQL("NOTIFY {}").format(psycopg.sql.Identifier(hook.channel)))
                )
            )
            await hook.wait_for_change(conn, 30)
            woken = time.monotonic() - t0
            # 3. A NOTIFY that arrived with the results of the waiter's own statement.
            pid = conn.info.backend_pid
            busy = asyncio.create_task(conn.execute("SELECT pg_sleep(2)"))
            await waiter_busy(other, pid)
            await other.execute(psycopg.sql.SQL("NOTIFY {}").format(psycopg.sql.Identifier(hook.channel)))
            await busy
            t0 = time.monotonic()
            await hook.wait_for_change(conn, 30)
            backlog = time.monotonic() - t0
            # 4. The server ends the session.
            await other.execute("SELECT pg_terminate_backend(%s)", [pid])
            t0 = time.monotonic()
            with pytest.raises(psycopg.OperationalError):
                await hook.wait_for_change(conn, 30)
                await conn.execute("SELECT 1")
            return idle, woken, backlog, time.monotonic() - t0

    (idle_s, idle_wakeups), woken, backlog, ended = asyncio.run(go())
    # Lower bounds: a load only lengthens a wait. Upper bounds: well under the 30 s a waiter for nothing
    # would take, whatever the load; the wakeups (a count) say it slept once, not every 0.1 s.
    assert idle_wakeups <= 5, idle_wakeups
    assert 1.9 < idle_s < 20, idle_s
    assert 0.25 < woken < 20, woken
    assert backlog < 20, backlog
    assert ended < 20, ended


def test_tablespace_gives_tablespace_map(hook, cluster, tmp_root):
    space = tmp_root / "space1"
    space.mkdir()
    give_to_server_user(space)
    cluster.sql(f"CREATE TABLESPACE space1 LOCATION '{space}'")
    cluster.sql("CREATE TABLE in_space (i int) TABLESPACE space1")
    oid = cluster.sql("SELECT oid FROM pg_tablespace WHERE spcname = 'space1'")[0][0]

    async def go():
        holder, _ = await started(hook, req())
        await finish(hook)
        return await holder

    assert asyncio.run(go())["status"] == COMPLETE
    assert backup_row(cluster)["tablespace_map"].strip() == f"{oid} {space}"


# -- what goes wrong ----------------------------------------------------------------------------


def test_timeout_fails_and_ends_backup_mode(hook, cluster):
    async def go():
        holder, _ = await started(hook, req(backup_timeout=2))
        pid = backup_row(cluster)["pid"]
        result = await asyncio.wait_for(holder, 30)
        return result, pid, await finish(hook)

    result, pid, late_finish = asyncio.run(go())
    assert result["status"] == FAILED and "backup_timeout=2s expired" in result["message"]
    r = backup_row(cluster)
    assert r["state"] == "failed" and "backup_timeout" in r["error"] and r["backup_label"] is None
    assert session_ended(cluster, pid)
    assert late_finish["status"] == FAILED and "backup_timeout" in late_finish["message"]


def test_holder_killed_is_detected_and_never_restarted(hook, cluster):
    async def go():
        holder, _ = await started(hook, req())
        pid = backup_row(cluster)["pid"]
        await asyncio.to_thread(cluster.sql, "SELECT pg_terminate_backend(%s)", [pid])
        killed = await asyncio.wait_for(holder, 30)
        # A restarted triggerer re-runs the same holder: it must not take a new backup.
        rerun = await asyncio.wait_for(hold_backup(hook, req()), 30)
        return killed, rerun, await finish(hook)

    killed, rerun, late_finish = asyncio.run(go())
    assert killed["status"] == FAILED and "session holding backup mode was lost" in killed["message"]
    assert rerun["status"] == FAILED and late_finish["status"] == FAILED
    assert backup_row(cluster)["state"] == "failed" and backup_row(cluster)["backup_label"] is None
    assert backup_starts(cluster) == 1


def test_rerun_after_triggerer_death_marks_failed_without_new_backup(hook, cluster):
    """The holder's process dies (session closed, table still says running): the re-run notices."""

    async def go():
        holder, _ = await started(hook, req())
        holder.cancel()  # as a killed triggerer: the session closes, PostgreSQL aborts backup mode
        with pytest.raises(asyncio.CancelledError):
            await holder
        cluster.sql("UPDATE backup SET state = 'running', error = NULL WHERE false")  # no-op, keep row
        return await asyncio.wait_for(hold_backup(hook, req()), 30)

    rerun = asyncio.run(go())
    assert rerun["status"] == FAILED
    assert backup_row(cluster)["state"] == "failed"
    assert backup_starts(cluster) == 1


def test_duplicate_holder_for_same_run_takes_one_backup(hook, cluster, caplog):
    caplog.set_level(logging.INFO, logger="pg_safe_backup.session")

    async def go():
        first = asyncio.create_task(hold_backup(hook, req()))
        second = asyncio.create_task(hold_backup(hook, req()))
        gate = await asyncio.wait_for(wait_for_start(hook, ATTEMPT, poll_interval=0.5), 60)
        # Both holders have claimed: one started the backup, the other follows it.
        await wait_until(lambda: "was already claimed (watch)" in caplog.text, what="the second claim")
        done = await finish(hook, start_lsn=gate["backup"]["start_lsn"])
        return await asyncio.wait_for(asyncio.gather(first, second), 30), done

    (a, b), done = asyncio.run(go())
    assert a["status"] == b["status"] == done["status"] == COMPLETE
    assert a["backup"]["backup_label"] == b["backup"]["backup_label"] == backup_row(cluster)["backup_label"]
    assert backup_starts(cluster) == 1


def test_second_start_refused_and_first_untouched(hook, cluster):
    other = "other_dag/manual__1/backup"

    async def go():
        holder, gate = await started(hook, req())
        refused = await asyncio.wait_for(hold_backup(hook, req(owner=other)), 30)
        assert backup_row(cluster)["owner"] == OWNER and backup_row(cluster)["state"] == "running"
        assert session_alive(cluster, backup_row(cluster)["pid"])
        # The refused run's finish must not end the first run's backup.
        wrong = await finish(hook, attempt=attempt_of(other), start_lsn=backup_row(cluster)["start_lsn"])
        assert backup_row(cluster)["state"] == "running"
        return refused, wrong, await finish(hook), await holder

    refused, wrong, done, held = asyncio.run(go())
    assert refused["status"] == FAILED and OWNER in refused["message"] and "untouched" in refused["message"]
    assert wrong["status"] == FAILED and "is no longer in the table" in wrong["message"]
    assert done["status"] == held["status"] == COMPLETE
    assert backup_starts(cluster) == 1


def test_stale_backup_replaced(hook, cluster):
    async def go():
        async with hook.connect() as conn:
            await hook.ensure_table(conn)

    asyncio.run(go())
    # A backup left 'running' by a holder that no longer exists (pid not connected).
    cluster.sql("INSERT INTO backup (id, state, pid, owner) VALUES (1, 'running', 999999, 'old/run/backup')")

    async def cycle():
        holder, _ = await started(hook, req())
        await finish(hook)
        return await holder

    assert asyncio.run(cycle())["status"] == COMPLETE
    assert backup_row(cluster)["owner"] == OWNER


def test_terminate_live_opt_in(hook, cluster):
    other = "other_dag/manual__1/backup"

    async def go():
        first, _ = await started(hook, req(owner=other))
        second, _ = await started(hook, req(terminate_live=True))
        lost = await asyncio.wait_for(first, 30)
        await finish(hook)
        return lost, await second

    lost, held = asyncio.run(go())
    assert lost["status"] == FAILED and held["status"] == COMPLETE
    assert backup_row(cluster)["owner"] == OWNER


def test_copy_failed_marks_failed_and_ends_backup(hook, cluster):
    async def go():
        holder, _ = await started(hook, req())
        pid = backup_row(cluster)["pid"]
        failed = await finish(hook, copy_problem="copy_data failed")
        return failed, await asyncio.wait_for(holder, 30), pid

    failed, held, pid = asyncio.run(go())
    assert failed["status"] == held["status"] == FAILED
    r = backup_row(cluster)
    assert r["state"] == "failed" and r["error"] == "copy_data failed" and r["backup_label"] is None
    assert session_ended(cluster, pid)


def test_finish_refuses_backup_restarted_after_copy_began(hook, cluster):
    async def go():
        holder, _ = await started(hook, req())
        done = await finish(hook, start_lsn="0/1")  # the copy began under another backup
        return done, await asyncio.wait_for(holder, 30)

    done, held = asyncio.run(go())
    assert done["status"] == FAILED and "the copy began under start LSN 0/1" in done["message"]
    assert held["status"] == FAILED and backup_row(cluster)["backup_label"] is None


def test_gate_fails_fast_when_the_hold_task_ended(hook, cluster):
    async def ended():
        return HoldView(None, current=True, ended="failed")

    async def go():
        return await asyncio.wait_for(wait_for_start(hook, hold_view=ended, poll_interval=0.2), 10)

    result = asyncio.run(go())
    assert result["status"] == FAILED
    assert "the backup holder task ended (failed) without starting this run's backup" in result["message"]


def test_connection_errors_are_clear_and_hide_the_password(cluster, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_PG_BAD", cluster.airflow_conn_uri(password="wrong-Pa55word"))
    result = asyncio.run(hold_backup(PostgresBackupHook("pg_bad"), req()))
    assert result["status"] == FAILED
    assert "pg_bad" in result["message"] and "password authentication failed" in result["message"]
    assert "wrong-Pa55word" not in str(result)
