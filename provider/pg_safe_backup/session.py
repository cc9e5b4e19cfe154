"""The two long waits of a backup, as plain async functions (the triggers only call these).

* :func:`hold_backup` claims the backup row, starts backup mode in its session, keeps that
  session open until the row says ``done``, then runs pg_backup_stop and stores the label.
* :func:`wait_for_backup` waits for one owner's backup to be started (the gate) or finished (the
  finish), optionally asking for the finish first.

Both return an event dict: ``{"status": ..., "message": ..., "backup": {...row values...}}``.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import AsyncExitStack
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import psycopg

from pg_safe_backup.hooks.backup import BackupError, PostgresBackupHook
from pg_safe_backup.state import BackupRow, BackupState, Claim, parse_backup_label

log = logging.getLogger(__name__)

#: Statuses of events.
STARTED, COMPLETE, FAILED = "started", "complete", "failed"

FAST_CHECKPOINT_HINT = (
    "pg_backup_start is waiting for a spread checkpoint (checkpoint_completion_target of"
    " checkpoint_timeout; minutes under write load). Pass fast_checkpoint=True to ask for an"
    " immediate checkpoint instead."
)


def event(status: str, message: str, row: BackupRow | None = None) -> dict[str, Any]:
    return {"status": status, "message": message, "backup": row.result() if row else None}


#: Seconds between a holder's re-reads of its row when nothing woke it (NOTIFY and its sessions'
#: sockets do): hundreds of holders in one triggerer then cost next to nothing while idle.
HOLDER_RECHECK_S = 60.0


@dataclass(frozen=True)
class HoldRequest:
    """What one holder attempt needs; plain values so a trigger can serialise them."""

    owner: str
    holder_try: int
    label: str
    fast_checkpoint: bool = False
    wait_for_archive: bool = True
    backup_timeout: float = 0  # seconds from the start; 0 = no limit
    poll_interval: float = 5.0
    terminate_live: bool = False


class _Deadline:
    def __init__(self, seconds: float, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.at = clock() + seconds if seconds else None

    def remaining(self) -> float | None:
        return None if self.at is None else self.at - self.clock()

    def expired(self) -> bool:
        left = self.remaining()
        return left is not None and left <= 0


async def _prepare_session(conn: psycopg.AsyncConnection) -> None:
    """A holder session must never be ended by the server's own timeouts."""
    await conn.execute("SET statement_timeout = 0")
    await conn.execute("SET idle_in_transaction_session_timeout = 0")
    if conn.info.server_version >= 140000:
        await conn.execute("SET idle_session_timeout = 0")
    # Over TCP, let the server notice a vanished holder within seconds and end its backup mode.
    await conn.execute("SET tcp_keepalives_idle = 10")
    await conn.execute("SET tcp_keepalives_interval = 5")
    await conn.execute("SET tcp_keepalives_count = 3")


async def hold_backup(
    hook: PostgresBackupHook, req: HoldRequest, clock: Callable[[], float] = time.monotonic
) -> dict[str, Any]:
    """Take one backup for ``req.owner`` and hold its session until the finish asks to stop."""
    deadline = _Deadline(req.backup_timeout, clock)
    try:
        async with AsyncExitStack() as stack:
            conn = await stack.enter_async_context(hook.connect("holder"))
            # The state session doubles as the backup session unless the table lives elsewhere
            # (backup of a standby): then both stay open, and losing either fails the backup.
            bconn = conn
            if hook.separate_state:
                bconn = await stack.enter_async_context(hook.connect("holder backup session", backup_server=True))
            try:
                return await _claim_and_run(hook, conn, bconn, req, deadline)
            except psycopg.Error as err:  # before backup mode: nothing to end
                return event(FAILED, f"cannot start the backup: {hook.explain(err, conn)}")
    except BackupError as err:
        return event(FAILED, str(err))


async def _claim_and_run(
    hook: PostgresBackupHook, conn: psycopg.AsyncConnection, bconn: psycopg.AsyncConnection, req: HoldRequest,
    deadline: _Deadline,
) -> dict[str, Any]:
    """Claim the row (see decide_claim), then run the backup, follow our earlier claim, or refuse."""
    for session in {conn, bconn}:
        await _prepare_session(session)
    await hook.ensure_table(conn)
    decision, row = await hook.claim(conn, req.owner, req.holder_try, req.label, req.terminate_live)
    if decision is Claim.REFUSE:
        return event(
            FAILED,
            f"refused to start: a backup owned by {row.owner or 'another client'} (label"
            f" {row.label!r}, holder pid {row.pid}) is {row.state.value} on this cluster; it was left"
            " untouched. Wait for it to finish, or set terminate_live=True to end it.",
        )
    if decision in (Claim.WATCH, Claim.FINISHED, Claim.LOST):
        # Our attempt was claimed before (a duplicate trigger or a re-run): never start again.
        log.info("backup of %s was already claimed (%s); following it", req.owner, decision.value)
        return await wait_for_backup(hook, req.owner, until=COMPLETE, poll_interval=req.poll_interval)
    if decision is not Claim.START:
        log.warning("previous backup of %s replaced (%s)", row.owner, decision.value)
    return await _run_backup(hook, conn, bconn, req, deadline)


async def _run_backup(
    hook: PostgresBackupHook, conn: psycopg.AsyncConnection, bconn: psycopg.AsyncConnection, req: HoldRequest,
    deadline: _Deadline,
) -> dict[str, Any]:
    """Backup mode from start to stop in ``bconn`` (state in ``conn``); any failure is recorded and
    ends backup mode."""
    my_pid = conn.info.backend_pid
    try:
        await hook.listen(conn)
        log.info("starting backup %r (fast checkpoint: %s)", req.label, req.fast_checkpoint)
        try:
            start_lsn = await asyncio.wait_for(hook.start_backup(bconn, req.label, req.fast_checkpoint), deadline.remaining())
        except asyncio.TimeoutError:
            return await _fail(hook, conn, bconn, req, f"the start checkpoint did not finish within backup_timeout={req.backup_timeout:g}s")
        if not await hook.record_start(conn, start_lsn):
            await hook.abort_backup(bconn)
            return event(FAILED, "the backup was marked failed while its checkpoint was running; backup mode ended")
        log.info("backup mode entered at %s; holding session pid %s", start_lsn, my_pid)
        while True:
            row = await hook.read(conn)
            if row is None or row.owner != req.owner or row.pid != my_pid:
                await hook.abort_backup(bconn)
                return event(FAILED, "this backup's row was taken over by another backup; backup mode ended", row)
            if row.state is BackupState.FAILED:
                await hook.abort_backup(bconn)
                return event(FAILED, f"backup marked failed: {row.error}; backup mode ended", row)
            if row.state is BackupState.DONE:
                break
            if deadline.expired():
                return await _fail(
                    hook, conn, bconn, req, f"backup_timeout={req.backup_timeout:g}s expired before the copy finished"
                )
            # Woken by NOTIFY (any change of the row), by either session's socket (the server or
            # the network ending it), or by backup_timeout; re-read now and then regardless.
            standby = [bconn] if bconn is not conn else []
            for session in standby:
                await session.execute("SELECT 1")  # still there (and whatever it sent is read)
            recheck, left = max(req.poll_interval, HOLDER_RECHECK_S), deadline.remaining()
            await hook.wait_for_change(conn, recheck if left is None else min(recheck, left), *standby)
        log.info("copy reported done; stopping backup (wait_for_archive: %s)", req.wait_for_archive)
        try:
            stop_lsn, label_file, spcmap = await asyncio.wait_for(
                hook.stop_backup(bconn, req.wait_for_archive), deadline.remaining()
            )
        except asyncio.TimeoutError:
            return await _fail(
                hook, conn, bconn, req,
                f"pg_backup_stop did not return within backup_timeout={req.backup_timeout:g}s: it waits until"
                " the WAL the backup needs is archived, so WAL archiving is failing or too slow (check"
                f" archive_command and the server log; {await hook.archiver_status(bconn)})",
            )
        timeline = parse_backup_label(label_file).get("START TIMELINE")
        if not await hook.mark_complete(conn, stop_lsn, label_file, spcmap, int(timeline) if timeline else None):
            row = await hook.read(conn)
            return event(FAILED, f"backup stopped but no longer ours to complete: {row.error if row else 'row gone'}", row)
        row = await hook.read(conn)
        log.info("backup complete: %s .. %s", row.start_lsn, row.stop_lsn)
        return event(COMPLETE, f"backup complete (start {row.start_lsn}, stop {row.stop_lsn})", row)
    except (psycopg.OperationalError, psycopg.InterfaceError) as err:
        # The session is gone, and PostgreSQL ended its backup mode with it; record why elsewhere.
        return await _fail_elsewhere(hook, req.owner, f"the session holding backup mode was lost: {err}")
    except psycopg.Error as err:
        return await _fail(hook, conn, bconn, req, f"PostgreSQL refused the backup: {hook.explain(err, bconn)}")
    except asyncio.CancelledError:
        # Airflow cancelled the holder (task cleared or marked failed): closing this session
        # ends backup mode, so say so in the table before it closes.
        await asyncio.wait_for(_fail_elsewhere(hook, req.owner, "the holder was cancelled by Airflow"), 10)
        raise


async def _fail(
    hook: PostgresBackupHook, conn: psycopg.AsyncConnection, bconn: psycopg.AsyncConnection, req: HoldRequest,
    reason: str,
) -> dict[str, Any]:
    """Mark this holder's backup failed, then end backup mode without waiting for the archive."""
    await hook.mark_failed(conn, req.owner, reason)
    await hook.abort_backup(bconn)
    return event(FAILED, reason + "; backup mode ended", await hook.read(conn))


async def _fail_elsewhere(hook: PostgresBackupHook, owner: str, reason: str) -> dict[str, Any]:
    try:
        async with hook.connect("failure report") as conn:
            await hook.mark_failed(conn, owner, reason)
            return event(FAILED, reason, await hook.read(conn))
    except (BackupError, psycopg.Error) as err:
        return event(FAILED, f"{reason}; could not record it in the backup table either: {err}")


async def wait_for_backup(
    hook: PostgresBackupHook,
    owner: str,
    until: str,
    poll_interval: float = 5.0,
    request: str | None = None,
    reason: str = "",
    expected_start_lsn: str | None = None,
    check: Callable[[], Awaitable[str | None]] | None = None,
) -> dict[str, Any]:
    """Wait until ``owner``'s backup is STARTED (gate) or COMPLETE/FAILED (finish).

    :param request: ``"done"`` to ask the holder to stop the backup first, ``"fail"`` to mark it
        failed with ``reason`` first (the copy failed).
    :param expected_start_lsn: the start LSN the copy began under; a backup with another one is
        failed rather than finished (it was restarted after the copy began).
    :param check: called once per poll while waiting; a returned text fails the wait with it.
    """
    try:
        async with hook.connect("finish" if request else "gate") as conn:
            try:
                return await _wait(hook, conn, owner, until, poll_interval, request, reason, expected_start_lsn, check)
            except psycopg.Error as err:
                return event(FAILED, f"cannot follow the backup: {hook.explain(err, conn)}")
    except BackupError as err:
        return event(FAILED, str(err))


async def _wait(
    hook: PostgresBackupHook,
    conn: psycopg.AsyncConnection,
    owner: str,
    until: str,
    poll_interval: float,
    request: str | None,
    reason: str,
    expected_start_lsn: str | None,
    check: Callable[[], Awaitable[str | None]] | None,
) -> dict[str, Any]:
    await hook.listen(conn)
    if request == "fail":
        await hook.mark_failed(conn, owner, reason)
    elif request == "done":
        row = await hook.request_done(conn, owner, expected_start_lsn)
        if row and row.owner == owner and row.state is BackupState.RUNNING and row.started:
            await hook.mark_failed(
                conn, owner, f"the copy began under start LSN {expected_start_lsn} but this backup started at"
                f" {row.start_lsn}: it was restarted after the copy began, so its label does not fit the copy",
            )
    hint_at = time.monotonic() + 5  # a fast checkpoint takes well under a second
    while True:
        row = await hook.read(conn)
        if row is not None and row.owner == owner:
            if row.state is BackupState.FAILED:
                return event(FAILED, f"backup failed: {row.error}", row)
            if row.state is BackupState.COMPLETE:
                if until == STARTED:
                    return event(FAILED, "this run's backup already ended before its copy could start", row)
                return event(COMPLETE, "backup complete", row)
            if until == STARTED and row.started:
                return event(STARTED, f"backup running since {row.start_lsn}", row)
            if not row.holder_alive:
                await hook.mark_failed(
                    conn, owner, f"the session holding backup mode (pid {row.pid}) is gone: triggerer"
                    " stopped, connection killed or server restarted; backup mode ended with it",
                )
                continue
            if until == STARTED and hint_at and time.monotonic() > hint_at:
                hint_at = 0
                log.info("backup of %s is waiting for its start checkpoint. %s", owner, FAST_CHECKPOINT_HINT)
        elif until != STARTED:
            return event(
                FAILED, "no backup of this run is live on this cluster: the start task failed, was refused"
                " or never ran (see its log)", row,
            )
        if check is not None and (problem := await check()):
            return event(FAILED, problem, row)
        await hook.wait_for_change(conn, poll_interval)
