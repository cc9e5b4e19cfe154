"""The backup's state machine: the one place that says which state may follow which.

A backup row goes ``running -> done -> complete``; ``running`` or ``done`` may become ``failed``
(with a reason), and so may ``complete`` when the finish of that same attempt learns that its copy
did not succeed (the label is withdrawn).  A new backup may replace a finished one
(``complete``/``failed -> running``).  The table enforces these transitions with a trigger generated
from :data:`TRANSITIONS`.

A backup belongs to one *attempt*: one try of one hold task (its task-instance UUID) of one group of
one DAG run (the *owner*, ``dag_id/run_id/group[map_index]``).  Nothing acts on another attempt's row.

Here too: the claim rule (:func:`decide_claim`), which backup a task deals with (:class:`BackupRef`) and
how its WAL gets archived (:func:`plan_wal`). LSNs, WAL file names and the label are in files/xlog.py.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

# Re-exported: LSNs, WAL file names and the label are format knowledge (files/xlog.py); imported from
# here before, they still are.
from pg_safe_backup.files.xlog import archived_through as archived_through
from pg_safe_backup.files.xlog import backup_start as backup_start
from pg_safe_backup.files.xlog import format_lsn as format_lsn
from pg_safe_backup.files.xlog import parse_backup_label as parse_backup_label
from pg_safe_backup.files.xlog import parse_lsn as parse_lsn
from pg_safe_backup.files.xlog import wal_segment_name as wal_segment_name
from pg_safe_backup.files.xlog import wal_segment_names as wal_segment_names


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
        (
            BackupState.COMPLETE,
            BackupState.FAILED,
        ),  # the same attempt's copy failed after all: label withdrawn
        (BackupState.COMPLETE, BackupState.RUNNING),
        (BackupState.FAILED, BackupState.RUNNING),
    }
)

#: Rules the table's guard adds for clients that are not us (the old pre-/post-scripts write the table too):
#:
#: * A ``complete`` row is immutable, except that a new backup may start on it (-> ``running``) and the
#:   finish of its own attempt may withdraw it (-> ``failed``), which changes only :data:`WITHDRAW_COLUMNS`.
#:   Nobody can overwrite a complete backup's label.
#: * When ``pid`` changes but ``owner`` and ``attempt`` do not, another client took the row for a backup of
#:   its own (the old pre-script's upsert): :data:`HOLDER_COLUMNS` are cleared, so the row no longer says
#:   that it is ours, and the liveness check goes by its pid alone.
WITHDRAW_COLUMNS: tuple[str, ...] = ("state", "error", "finished_at", "updated_at")
HOLDER_COLUMNS: tuple[str, ...] = (
    "owner",
    "attempt",
    "holder_try",
    "label",
    "holder_started_at",
    "start_lsn",
    "stop_lsn",
    "timeline",
    "error",
    "warnings",
    "system_identifier",
    "stop_timeline",
    "timeline_history",
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
    warnings: str | None  # what PostgreSQL warned about during the backup (see session._Notices)
    stop_timeline: int | None  # the timeline it stopped on (a standby may follow a promotion meanwhile)
    timeline_history: str | None  # the history file of stop_timeline, when it is not the start's
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
            "warnings": self.warnings,
            "stop_timeline": self.stop_timeline,
            "timeline_history": self.timeline_history,
        }


class Claim(str, enum.Enum):
    """What a holder does when it finds the backup row (see :func:`decide_claim`)."""

    START = "start"  # no live backup: start ours
    REPLACE_STALE = "replace_stale"  # a live-looking backup whose holder is gone: fail it, start ours
    TERMINATE_AND_START = "terminate_and_start"  # live backup of another owner, explicitly allowed
    REFUSE = "refuse"  # a live backup of another owner: leave it alone, fail ours
    # a live backup of an EARLIER attempt of our owner (Airflow is cancelling it): wait, then decide
    WAIT = "wait"
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
    :param hold_task_id: the group's ``PostgresStartBackupOperator``.
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


@dataclass(frozen=True)
class BackupTarget:
    """Which server is backed up and which table records it: what the hold, the gate, the finish and their
    triggers share besides :class:`BackupRef` ("which backup"). Plain values: :attr:`hook_kwargs` is its one
    serialised form (the triggers' ``hook_kwargs``, the backup hook's arguments).

    :param postgres_conn_id: Airflow connection of the server backed up (a primary or a hot standby).
    :param state_conn_id: connection of the server holding the backup table, when it is not that one (for a
        standby: its primary). None: the same.
    :param database: database holding the backup table, instead of the connection's.
    :param table: the backup table.
    :param schema: its schema.
    """

    postgres_conn_id: str
    state_conn_id: str | None = None
    database: str | None = None
    table: str = "backup"
    schema: str = "public"

    @property
    def hook_kwargs(self) -> dict[str, Any]:
        """The serialised form, the backup hook's keyword arguments: ``BackupTarget(**hook_kwargs)``."""
        return {
            "postgres_conn_id": self.postgres_conn_id,
            "state_conn_id": self.state_conn_id,
            "database": self.database,
            "table": self.table,
            "schema": self.schema,
        }


# ------------------------------------------------------------------------------------- WAL archiving


class WalArchiver(str, enum.Enum):
    """Whose WAL archiver makes sure a backup's WAL reaches the archive."""

    SERVER = "server"  # the primary backed up: after its pg_backup_stop, the holder waits for its archiver
    STANDBY = "standby"  # a standby with archive_mode=always archives what it receives
    PRIMARY = "primary"  # a standby's primary (the state connection) archives the same WAL stream


@dataclass(frozen=True)
class ArchiveSettings:
    """A server's WAL archiving, as read through one connection (see ``PostgresBackupHook.archive_settings``).

    :param conn_id: the Airflow connection it was read through.
    :param param: the operator parameter naming that connection (``postgres_conn_id``, ``state_conn_id``).
    :param in_recovery: a standby.
    :param archive_mode: ``off``, ``on`` or ``always``.
    :param archive_command: as SHOW gives it (``(disabled)`` while archive_mode is off).
    :param archive_library: PostgreSQL 15+; None before.
    :param server_version: server_version_num.
    :param system_identifier: of the cluster (a primary and its standbys share it).
    :param role: the role connected.
    :param can_switch_wal: that role may run pg_switch_wal() (revoked from PUBLIC by default).
    """

    conn_id: str
    param: str
    role: str
    in_recovery: bool
    archive_mode: str
    archive_command: str
    archive_library: str | None
    server_version: int
    system_identifier: int
    can_switch_wal: bool

    @property
    def name(self) -> str:
        return f"{self.param} {self.conn_id!r}"

    def not_archiving(self) -> str | None:
        """Why this server's own archiver archives nothing, or None.

        xlog.h: archiving is active with archive_mode on (or always), and runs during recovery only
        with always; pgarch.c: it needs archive_command or (15+) archive_library, and from 16 on
        refuses to run with both set.
        """
        if self.archive_mode == "off":
            return f"{self.name} has archive_mode=off"
        if self.in_recovery and self.archive_mode != "always":
            return (
                f"{self.name} is a standby with archive_mode={self.archive_mode} "
                "(a standby archives only with archive_mode=always)"
            )
        if self.archive_library and self.archive_command and self.server_version >= 160000:
            return (
                f"{self.name} has both archive_command and archive_library set, so its archiver does not run"
            )
        if not (self.archive_library or self.archive_command):
            return (
                f"{self.name} has archive_mode={self.archive_mode} but an empty archive_command, "
                "so nothing is archived"
            )
        return None

    @property
    def stop_waits(self) -> bool:
        """pg_backup_stop(wait_for_archive => true) waits here (do_pg_backup_stop: archiving active, and
        in recovery only with always); otherwise it returns at once with a NOTICE saying so."""
        return self.archive_mode == "always" or (self.archive_mode == "on" and not self.in_recovery)


@dataclass(frozen=True)
class WalPlan:
    """How a backup makes sure of its WAL (see :func:`plan_wal`).

    :param stop_wait: the ``wait_for_archive`` argument for pg_backup_stop.
    :param follow: after pg_backup_stop, follow this archiver (a standby: after a WAL switch on the primary).
    """

    stop_wait: bool
    follow: WalArchiver | None = None


def plan_wal(server: ArchiveSettings, state: ArchiveSettings | None, wait_for_archive: bool) -> WalPlan:
    """Decide how the backup of ``server`` (state on ``state``, if another server) gets its WAL archived.

    :raises ValueError: ``wait_for_archive`` and nothing would archive that WAL; the message names the
        settings seen and both fixes.
    """
    archiver, why_not = _wal_archiver(server, state)
    if archiver is None:
        if wait_for_archive:
            raise ValueError(
                "not started: wait_for_archive=True, but this backup's WAL would not be archived: "
                f"{why_not}. Without all the WAL from its start to its stop a backup cannot be restored. "
                "Either enable WAL archiving (archive_mode = on, which takes a restart, and an "
                "archive_command that copies %p into the archive; for a standby, on its primary, or "
                "archive_mode = always on the standby), or pass wait_for_archive=False if the WAL is copied "
                "another way (pg_wal copied after the stop, pg_receivewal)"
            )
        # Where pg_backup_stop would return at once anyway, ask it to wait: it then says, in a NOTICE kept
        # in the row, that the WAL is not archived.
        return WalPlan(stop_wait=not server.stop_waits)
    # The holder follows the archiver itself. A primary's pg_backup_stop would wait too, but looks only once
    # a second. A standby's switches no WAL (xlog.c), so even with archive_mode=always it would wait until the
    # primary happens to switch: the holder switches on the primary first.
    return WalPlan(stop_wait=False, follow=archiver if wait_for_archive else None)


def _wal_archiver(server: ArchiveSettings, state: ArchiveSettings | None) -> tuple[WalArchiver | None, str]:
    """Which archiver would archive the backup's WAL, or (None, why none would)."""
    own = server.not_archiving()
    if not server.in_recovery:
        return (WalArchiver.SERVER, "") if own is None else (None, own)
    # A standby: only its primary can switch WAL so that the segment holding the stop point is completed.
    if state is None or state.in_recovery or state.system_identifier != server.system_identifier:
        return None, (
            f"{server.name} is a standby, and {state.name if state else 'no state_conn_id'} is not"
            " its primary (a writable server of the same system identifier), which must switch"
            " WAL for the backup's last segment to be archived"
        )
    if not state.can_switch_wal:
        return None, (
            f"{state.name} may not run pg_switch_wal(), which completes the standby backup's last"
            " WAL segment so that it is archived (as a superuser: GRANT EXECUTE ON FUNCTION"
            f" pg_catalog.pg_switch_wal() TO {state.role})"
        )
    if own is None:
        return WalArchiver.STANDBY, ""
    primary = state.not_archiving()
    if primary is None:
        return WalArchiver.PRIMARY, ""
    return None, f"{own}, and its primary {primary}"
