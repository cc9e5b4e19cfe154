"""Helpers of the session-level tests (holder, gate and finish functions on real PostgreSQL, no Airflow)."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable
from pathlib import Path

from pg_safe_backup.hooks.backup import PostgresBackupHook
from pg_safe_backup.local_cluster import LocalCluster
from pg_safe_backup.session import COMPLETE, STARTED, HoldRequest, finish_backup, hold_backup, wait_for_start

OWNER = "nightly/scheduled__2026-11-24/backup"


def attempt_of(owner: str, try_number: int = 1) -> str:
    """A stand-in for a hold task instance's UUID: unique per owner and try."""
    return f"{owner}#try{try_number}"


ATTEMPT = attempt_of(OWNER)


def req(owner: str = OWNER, **kw) -> HoldRequest:
    """A hold request; the fixture's cluster does not archive WAL, so by default it opts out of the wait."""
    return HoldRequest(
        **{
            "owner": owner,
            "attempt": attempt_of(owner),
            "label": f"test {owner}",
            "fast_checkpoint": True,
            "poll_interval": 1.0,
            "wait_for_archive": False,
            **kw,
        }
    )


def backup_starts(cluster: LocalCluster) -> int:
    """How many times the server was asked to enter backup mode (log_statement = all)."""
    return sum(
        ("pg_backup_start(" in line or "pg_start_backup(" in line)
        for line in cluster.log_text().splitlines()
        if "LOG:" in line
    )


def row(cluster: LocalCluster) -> dict:
    cols = [
        "state",
        "pid",
        "owner",
        "attempt",
        "label",
        "start_lsn",
        "stop_lsn",
        "timeline",
        "backup_label",
        "tablespace_map",
        "error",
    ]
    found = cluster.sql(f"SELECT state::text, {', '.join(cols[1:])} FROM backup")
    return dict(zip(cols, found[0], strict=True)) if found else {}


def session_alive(cluster: LocalCluster, pid: int) -> bool:
    return bool(cluster.sql("SELECT 1 FROM pg_stat_activity WHERE pid = %s", [pid]))


async def gate(
    hook: PostgresBackupHook, attempt: str = ATTEMPT, timeout: float = 60, gate_timeout: float = 3600
) -> dict:
    return await asyncio.wait_for(
        wait_for_start(hook, attempt, poll_interval=0.5, timeout=gate_timeout), timeout
    )


async def started(hook: PostgresBackupHook, r: HoldRequest) -> tuple[asyncio.Task, dict]:
    """Start a holder and wait for the gate to open."""
    holder = asyncio.create_task(hold_backup(hook, r))
    opened = await gate(hook, r.attempt)
    assert opened["status"] == STARTED, opened
    return holder, opened


async def finish(
    hook: PostgresBackupHook, attempt: str = ATTEMPT, start_lsn: str | None = None, timeout: float = 60, **kw
) -> dict:
    """The finish of ``attempt``; the copy "began" under ``start_lsn`` (default: that attempt's, from the
    table)."""
    if start_lsn is None:
        async with hook.connect() as conn:
            found = await hook.read(conn)
        start_lsn = found.start_lsn if found and found.attempt == attempt and found.start_lsn else "0/0"
    return await asyncio.wait_for(finish_backup(hook, attempt, start_lsn, poll_interval=0.5, **kw), timeout)


def copy_data_dir(
    source: Path, dest: Path, pg_control_first: bool = False, meanwhile: Callable[[], None] = lambda: None
) -> None:
    """A file-system copy of ``source`` in two steps: everything a backup keeps (not the contents of
    pg_wal, pg_replslot, pg_stat_tmp; no pid files), then global/pg_control alone, last, as the README
    says (``pg_control_first`` swaps the steps, to show what the rule prevents). ``meanwhile`` runs
    between the steps."""

    def ignore(folder: str, names: list[str]) -> set[str]:
        if Path(folder).name in ("pg_wal", "pg_replslot", "pg_stat_tmp"):
            return set(names)
        if Path(folder) == source / "global":
            return {"pg_control"} & set(names)
        return {n for n in names if n in ("postmaster.pid", "postmaster.opts") or n.endswith(".log")}

    def rest() -> None:
        shutil.copytree(source, dest, ignore=ignore, dirs_exist_ok=True)

    def pg_control() -> None:
        (dest / "global").mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / "global" / "pg_control", dest / "global" / "pg_control")

    first, last = (pg_control, rest) if pg_control_first else (rest, pg_control)
    first()
    meanwhile()
    last()


async def backup_events(
    hook: PostgresBackupHook, r: HoldRequest, copy: Callable[[], None] = lambda: None, timeout: float = 60
) -> tuple[dict, dict]:
    """One whole backup through the session functions (hold, gate, ``copy()`` in a thread, finish),
    whatever its outcome: the holder's and the finish's events."""
    holder, opened = await started(hook, r)
    await asyncio.to_thread(copy)
    done = await finish(hook, r.attempt, opened["backup"]["start_lsn"], timeout)
    return await asyncio.wait_for(holder, timeout), done


def run_backup(hook: PostgresBackupHook, owner: str, copy: Callable[[], None]) -> dict:
    """One whole backup (see :func:`backup_events`) that must complete: the completed backup's row
    (backup_label, start_lsn, stop_lsn, system_identifier, ...)."""
    held, done = asyncio.run(backup_events(hook, req(owner, poll_interval=0.5), copy))
    assert done["status"] == held["status"] == COMPLETE, (held, done)
    return done["backup"]


def hand_over_row(cluster: LocalCluster, sets: str, params: list) -> None:
    """``UPDATE backup SET <sets>`` that gives the row to another session (a new pid) while it stays the
    same attempt's, as a test needs it. The table's guard clears our columns when the pid changes but the
    attempt does not (the old pre-script's takeover), so the attempt is first set aside, in one transaction:
    nobody sees the step between."""
    with cluster.connect() as conn, conn.transaction():
        conn.execute("UPDATE backup SET attempt = NULL")
        conn.execute(f"UPDATE backup SET {sets}", params)
