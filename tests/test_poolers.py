"""Connection poolers, through a real pgbouncer (Debian's package) in session and transaction mode.

Backup mode belongs to one server session and ends with it; a pooler hands that session to other
clients and keeps it when ours goes. So every session of pg-safe-backup (holder, gate, finish) refuses
a connection that does not reach PostgreSQL directly, before anything happens, naming the connection.
"""

from __future__ import annotations

import asyncio

import pytest

from pg_safe_backup.hooks.backup import PostgresBackupHook
from pg_safe_backup.session import COMPLETE, FAILED, hold_backup

from backup_helpers import backup_row, backup_starts, finish, gate, req, started

POOLED = "pg_pooled"
MODES = ["session", "transaction"]


def assert_refused_as_pooled(result: dict) -> None:
    assert result["status"] == FAILED, result
    assert f"connection {POOLED!r}" in result["message"]
    assert "connect to PostgreSQL directly, not through a pooler" in result["message"]


def create_table(hook: PostgresBackupHook) -> None:
    async def go():
        async with hook.connect() as conn:
            await hook.ensure_table(conn)

    asyncio.run(go())


def backup_directly(hook: PostgresBackupHook) -> tuple[dict, dict]:
    """A whole backup over the direct connection: (finish event, holder event)."""

    async def go():
        holder, _ = await started(hook, req())
        done = await finish(hook)
        return done, await asyncio.wait_for(holder, 30)

    return asyncio.run(go())


@pytest.mark.parametrize("mode", MODES)
def test_a_holder_through_pgbouncer_refuses_before_backup_mode_and_a_direct_one_works(
    pgbouncer, hook, cluster, mode
):
    create_table(hook)
    pgbouncer(mode)
    result = asyncio.run(hold_backup(PostgresBackupHook(POOLED), req()))
    assert_refused_as_pooled(result)
    assert backup_starts(cluster) == 0
    assert cluster.sql("SELECT count(*) FROM backup") == [(0,)]  # nothing claimed, nothing left running
    done, held = backup_directly(hook)
    assert done["status"] == COMPLETE
    assert held["status"] == COMPLETE
    assert backup_row(cluster)["state"] == "complete"
    assert backup_starts(cluster) == 1


@pytest.mark.parametrize("mode", MODES)
def test_the_gate_and_the_finish_through_pgbouncer_refuse_and_leave_the_backup_alone(
    pgbouncer, hook, cluster, mode
):
    pgbouncer(mode)
    pooled = PostgresBackupHook(POOLED)

    async def go():
        holder, opened = await started(hook, req())  # held over the direct connection
        through_gate = await gate(pooled)
        through_finish = await finish(pooled, start_lsn=opened["backup"]["start_lsn"])
        meanwhile = await asyncio.to_thread(backup_row, cluster)
        done = await finish(hook)
        return through_gate, through_finish, meanwhile, done, await asyncio.wait_for(holder, 30)

    through_gate, through_finish, meanwhile, done, held = asyncio.run(go())
    assert_refused_as_pooled(through_gate)
    assert_refused_as_pooled(through_finish)
    assert meanwhile["state"] == "running"
    assert done["status"] == COMPLETE
    assert held["status"] == COMPLETE


def test_pgbouncer_refusing_the_options_startup_parameter_gets_the_pooler_error(pgbouncer, cluster):
    """A pgbouncer without ignore_startup_parameters=options turns the libpq options away at login."""
    bouncer = pgbouncer("session", ignore_options=False, options="-c search_path=pg_catalog")
    result = asyncio.run(hold_backup(PostgresBackupHook(POOLED), req()))
    assert_refused_as_pooled(result)
    assert "unsupported startup parameter: options" in result["message"]
    assert "unsupported startup parameter: options" in bouncer.log_text()
    assert backup_starts(cluster) == 0
