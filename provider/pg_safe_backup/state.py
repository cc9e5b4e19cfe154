"""The backup's state machine: the one place that says which state may follow which.

A backup row goes ``running -> done -> complete``; ``running`` or ``done`` may become ``failed``
(with a reason), and so may ``complete`` when the finish of that same attempt learns that its copy
did not succeed (the label is withdrawn).  A new backup may replace a finished one
(``complete``/``failed -> running``).  The table enforces these transitions with a trigger generated
from :data:`TRANSITIONS`.

A backup belongs to one *attempt*: one try of one hold task (its task-instance UUID) of one group of
one DAG run (the *owner*, ``dag_id/run_id/group[map_index]``).  Nothing acts on another attempt's row.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any


class BackupState(str, enum.Enum):
    """Values of the ``backup_state`` enum, as the seed scripts defined them."""

    RUNNING = "running"  # backup mode entered (or the checkpoint is still running: start_lsn null)
    DONE = "done"  # the copy finished; the holder is asked to run pg_backup_stop
    COMPLETE = "complete"  # pg_backup_stop returned; backup_label is valid for this copy
    FAILED = "failed"  # never use this backup; ``error`` says why


#: Allowed state changes (old, new). Updates that keep the state are always allowed.
TRANSITIONS: frozenset[tuple[BackupState, BackupState]] = frozenset(
    {
        (BackupState.RUNNING, BackupState.DONE),
        (BackupState.RUNNING, BackupState.FAILED),
        (BackupState.DONE, BackupState.COMPLETE),
        (BackupState.DONE, BackupState.FAILED),
        (BackupState.COMPLETE, BackupState.FAILED),  # the same attempt's copy failed after all: label withdrawn
        (BackupState.COMPLETE, BackupState.RUNNING),
        (BackupState.FAILED, BackupState.RUNNING),
    }
)

#: States in which a holder session is (or should be) in backup mode.
LIVE_STATES = (BackupState.RUNNING, BackupState.DONE)
TERMINAL_STATES = (BackupState.COMPLETE, BackupState.FAILED)


@dataclass(frozen=True)
class BackupRow:
    """One read of the backup row, plus whether its holder session is still connected."""

    state: BackupState
    pid: int | None
    owner: str | None
    attempt: str | None
    holder_try: int | None
    label: str | None
    start_lsn: str | None
    stop_lsn: str | None
    timeline: int | None
    backup_label: str | None
    tablespace_map: str | None
    error: str | None
    system_identifier: int | None
    holder_alive: bool

    @property
    def live(self) -> bool:
        return self.state in LIVE_STATES

    @property
    def started(self) -> bool:
        """Backup mode entered (pg_backup_start returned) and not yet asked to stop: a copy may begin.

        ``done`` is not started: pg_backup_stop may already be running (waiting for the archive).
        """
        return self.state is BackupState.RUNNING and self.start_lsn is not None

    def result(self) -> dict[str, Any]:
        """Plain values for XCom / trigger events (never a password: the row holds none)."""
        return {
            "state": self.state.value,
            "owner": self.owner,
            "attempt": self.attempt,
            "label": self.label,
            "start_lsn": self.start_lsn,
            "stop_lsn": self.stop_lsn,
            "timeline": self.timeline,
            "backup_label": self.backup_label,
            "tablespace_map": self.tablespace_map,
            "error": self.error,
            # a string: XCom is JSON, and 64-bit integers do not survive every JSON reader
            "system_identifier": None if self.system_identifier is None else str(self.system_identifier),
        }


class Claim(str, enum.Enum):
    """What a holder does when it finds the backup row (see :func:`decide_claim`)."""

    START = "start"  # no live backup: start ours
    REPLACE_STALE = "replace_stale"  # a live-looking backup whose holder is gone: fail it, start ours
    TERMINATE_AND_START = "terminate_and_start"  # live backup of another owner, explicitly allowed
    REFUSE = "refuse"  # a live backup of another owner: leave it alone, fail ours
    WAIT = "wait"  # a live backup of an EARLIER attempt of our owner (Airflow is cancelling it): wait, then decide
    WATCH = "watch"  # our own attempt's backup, held by another live session (a duplicate trigger)
    LOST = "lost"  # our own attempt's backup, but its session is gone: mark failed, never restart
    FINISHED = "finished"  # our own attempt already ended: report that outcome


def decide_claim(row: BackupRow | None, owner: str, attempt: str, terminate_live: bool) -> Claim:
    """Decide what the holder of ``attempt`` (of ``owner``) may do with the current row.

    The rule that matters most: a holder never starts a second backup for the same attempt.
    Copies may already be running under the first backup's checkpoint; a newer backup_label
    would make their restore silently corrupt.  Another attempt's row, even of the same owner
    (a re-run, a re-used run id, another Airflow installation), is never "ours".
    """
    if row is not None and row.attempt == attempt:
        if row.state in TERMINAL_STATES:
            return Claim.FINISHED
        return Claim.WATCH if row.holder_alive else Claim.LOST
    if row is None or not row.live:
        return Claim.START
    if not row.holder_alive:
        return Claim.REPLACE_STALE
    if terminate_live:
        return Claim.TERMINATE_AND_START
    return Claim.WAIT if row.owner == owner else Claim.REFUSE


@dataclass(frozen=True)
class BackupRef:
    """Which backup a task of a DAG run deals with: one group (``backup_key``, its full id) of one DAG
    run, one map index, and the tasks of that group. Plain values, so the triggers can serialise it.

    :param dag_id: the DAG.
    :param run_id: the DAG run.
    :param backup_key: the group's full id (unique in the DAG), or a hand-wired DAG's own key.
    :param map_index: the map index of a mapped group (-1: not mapped).
    :param hold_task_id: the group's ``PostgresBackupHoldOperator``.
    :param finish_task_id: the group's ``PostgresFinishBackupOperator``.
    """

    dag_id: str
    run_id: str
    backup_key: str
    map_index: int = -1
    hold_task_id: str | None = None
    finish_task_id: str | None = None

    @property
    def owner(self) -> str:
        """The row's ``owner``: ``dag_id/run_id/backup_key``, with ``[map_index]`` for a mapped group."""
        suffix = f"[{self.map_index}]" if self.map_index >= 0 else ""
        return f"{self.dag_id}/{self.run_id}/{self.backup_key}{suffix}"


def parse_backup_label(text: str | None) -> dict[str, str]:
    """Parse backup_label's ``KEY: value`` lines (START WAL LOCATION, CHECKPOINT LOCATION, ...)."""
    fields: dict[str, str] = {}
    for line in (text or "").splitlines():
        key, sep, value = line.partition(": ")
        if sep:
            fields[key.strip()] = value.strip()
    return fields
