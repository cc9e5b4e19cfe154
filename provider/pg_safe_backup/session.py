"""The long waits of a backup, as plain async functions (the triggers only call these).

* :func:`hold_backup` claims the backup row for one attempt, starts backup mode in its session,
  keeps that session open until the row says ``done``, then runs pg_backup_stop and stores the label.
* :func:`wait_for_start` (the gate) waits until the hold's current attempt is in backup mode.
* :func:`finish_backup` (the finish) asks the attempt the copy ran under to stop (or fails it when
  the copy did not succeed) and waits for the outcome.

Each returns an event dict: ``{"status": ..., "message": ..., "backup": {...row values...},
"retryable": ...}`` (``retryable``: the gate's or finish's server could not be reached or followed).
What Airflow knows (the hold's current attempt, whether the finish or the run ended) comes in as
callbacks, so this module runs, and is tested, without Airflow.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

import psycopg

from pg_safe_backup.files.extconfig import ServerConfig
from pg_safe_backup.files.manifest import timeline_at
from pg_safe_backup.hooks.backup import BackupError, PostgresBackupHook
from pg_safe_backup.runwatch import CHECK_PERIOD_S, jittered, still_fresh
from pg_safe_backup.state import (
    BackupRow,
    BackupState,
    Claim,
    WalArchiver,
    WalPlan,
    archived_through,
    parse_backup_label,
    plan_wal,
    wal_segment_name,
)

log = logging.getLogger(__name__)

#: Statuses of events.
STARTED, COMPLETE, FAILED = "started", "complete", "failed"
#: The status of a wait given ``patience`` that ran out first: nothing settled yet, wait on (deferred).
PENDING = "pending"
#: The gate's STARTED event's key (and its XCom's): the server's configuration files (ServerConfig.as_dict).
CONFIG_FILES = "server_config_files"
#: The holder's COMPLETE event's key: seconds from pg_backup_stop until the backup's WAL was archived (None:
#: nothing waited for the archive), for the triggers' metrics.
ARCHIVE_WAIT = "archive_wait_s"

FAST_CHECKPOINT_HINT = (
    "pg_backup_start is waiting for a spread checkpoint (checkpoint_completion_target of"
    " checkpoint_timeout; minutes under write load). Pass fast_checkpoint=True to ask for an"
    " immediate checkpoint instead."
)


def event(status: str, message: str, row: BackupRow | None = None, retryable: bool = False) -> dict[str, Any]:
    """:param retryable: the wait failed because the server could not be reached or followed, not
    because of the backup: running the task again may succeed."""
    return {
        "status": status,
        "message": message,
        "backup": row.result() if row else None,
        "retryable": retryable,
    }


#: Seconds between a holder's re-reads of its row when nothing woke it (NOTIFY and its sessions'
#: sockets do): hundreds of holders in one triggerer then cost next to nothing while idle.
HOLDER_RECHECK_S = 60.0
#: Seconds within which a holder sees that its run's finish ended or the run did (nothing else would end a
#: backup whose finish is gone): it looks every half of it, less a random part (runwatch.jittered), at
#: answers shared by its run's holders and no older than the other half (the triggers' runwatch).
HOLDER_AIRFLOW_CHECK_S = CHECK_PERIOD_S
#: Seconds a holder waits for an earlier attempt of its own backup to end (Airflow cancels the trigger
#: of a cleared hold within a few seconds) before it refuses to start.
EARLIER_ATTEMPT_WAIT_S = 30.0
#: Default backup_timeout and gate_timeout: nothing waits forever when all else fails.
ONE_DAY_S = 24 * 3600.0
#: Seconds between looks at pg_stat_archiver while a backup's last WAL segment is archived: the first look
#: after ARCHIVE_FIRST_POLL_S, each next one half as late again, at most ARCHIVE_POLL_S apart
#: (pg_backup_stop's own wait looks once a second, so it takes a second even when the archive takes 10 ms).
ARCHIVE_FIRST_POLL_S, ARCHIVE_POLL_S = 0.02, 1.0

#: An Airflow-side check: returns why the wait must end (a text), or None.
Check = Callable[[], Awaitable[str | None]]


async def _ask_airflow(check: Check | None) -> str | None:
    """The check's answer; None when there is no check, or when Airflow could not answer this time
    (an api-server restarting must not end a held backup: the next check asks again)."""
    if check is None:
        return None
    try:
        return await check()
    except Exception as err:  # noqa: BLE001 - any failure to ask is "no answer"
        log.warning("could not ask Airflow about this backup's run (asking again later): %s", err)
        return None


@dataclass(frozen=True)
class HoldRequest:
    """What one holder attempt needs; plain values so a trigger can serialise them.

    :param owner: the group of the DAG run (and map index) the backup is for (see ``BackupRef.owner``).
    :param attempt: this try of the hold task (its task-instance UUID): the backup belongs to it alone.
    :param holder_try: the hold task's try number (for people reading the table).
    :param checked_at: when (epoch seconds) the hold task, on its worker, found its run going and its
        finish not ended, just before it deferred. Within half the check period that stands for the
        holder's own first look at Airflow: a triggerer's first Task SDK call waits for it to build its
        in-process execution API (seconds), and would hold up the backup's start.
    """

    owner: str
    attempt: str
    label: str
    holder_try: int = 1
    fast_checkpoint: bool = False
    wait_for_archive: bool = True
    backup_timeout: float = ONE_DAY_S  # seconds from the start; 0 = no limit
    poll_interval: float = 5.0
    terminate_live: bool = False
    checked_at: float | None = None


@dataclass(frozen=True)
class HoldView:
    """What Airflow says about the hold task of the gate's own run (and map index).

    :param attempt: the attempt its latest try published, or None while it has not yet.
    :param current: that attempt is surely the CURRENT try's: the task is deferred, held inline, or
        ended. (While a new try starts on a worker, the previous try's value is still readable.)
    :param ended: the hold task's end state (``success``, ``failed``, ...), if it ended.
    :param task_id: the hold task, for messages.
    :param fast_checkpoint: whether that attempt asked for an immediate start checkpoint, as it published
        beside its attempt; None when unknown (an attempt given up front, a hold of an earlier release).
    """

    attempt: str | None
    current: bool = True
    ended: str | None = None
    task_id: str | None = None
    fast_checkpoint: bool | None = None


class _Deadline:
    def __init__(self, seconds: float, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.at = clock() + seconds if seconds else None

    def remaining(self) -> float | None:
        return None if self.at is None else self.at - self.clock()

    def expired(self) -> bool:
        left = self.remaining()
        return left is not None and left <= 0

    def cap(self, seconds: float) -> float:
        left = self.remaining()
        return seconds if left is None else max(0.0, min(seconds, left))


class _Notices:
    """PostgreSQL's NOTICEs and WARNINGs in a holder's sessions. Every one goes to the log (the task log,
    from the trigger); from :meth:`keep` on, those of the backup session that matter are kept for the
    row's ``warnings``: "WAL archiving is not enabled ...", "still waiting for all required WAL segments
    to be archived ...", and any other."""

    #: The good end of pg_backup_stop's wait: logged, not kept.
    ALL_WELL = ("all required WAL segments have been archived",)

    def __init__(self) -> None:
        self.kept: list[str] = []
        self.keeping = False

    def watch(self, conn: psycopg.AsyncConnection, conn_id: str, backup_session: bool) -> None:
        """Log what the server says on ``conn`` (reached through ``conn_id``)."""

        def handle(diag: psycopg.errors.Diagnostic) -> None:
            severity = diag.severity_nonlocalized or diag.severity or "NOTICE"
            text = " ".join(
                part for part in (diag.message_primary, diag.message_detail, diag.message_hint) if part
            )
            keep = self.keeping and backup_session and not text.startswith(self.ALL_WELL)
            level = logging.WARNING if keep or severity == "WARNING" else logging.INFO
            log.log(level, "PostgreSQL %s on connection %r: %s", severity, conn_id, text)
            if keep:
                self.kept.append(f"{severity}: {text}")

        conn.add_notice_handler(handle)

    def keep(self) -> None:
        """From now on (backup mode), keep what matters."""
        self.keeping = True

    @property
    def text(self) -> str | None:
        return "\n".join(self.kept) or None


# ------------------------------------------------------------------------------------------ the holder


@dataclass
class _Holding:
    """One hold attempt as its steps pass it along: the request, the sessions, the clock, Airflow's side.

    :param conn: the state session (the backup table's server).
    :param bconn: the backup session: ``conn`` itself unless the table lives elsewhere (backup of a standby).
    :param deadline: ``req.backup_timeout`` from the start.
    :param check: Airflow's side (see :func:`hold_backup`), or None.
    :param settle: awaited just before the claim (see :func:`hold_backup`), or None.
    :param notices: the server's notices; those of backup mode are kept in the row.
    :param wal: how this backup's WAL gets archived (:func:`_plan_wal`), once planned.
    """

    hook: PostgresBackupHook
    req: HoldRequest
    conn: psycopg.AsyncConnection
    bconn: psycopg.AsyncConnection
    deadline: _Deadline
    clock: Callable[[], float]
    check: Check | None = None
    check_period: float | None = None  # None: HOLDER_AIRFLOW_CHECK_S
    settle: Callable[[], Awaitable[Any]] | None = None
    notices: _Notices = field(default_factory=_Notices)
    wal: WalPlan | None = None


async def hold_backup(
    hook: PostgresBackupHook,
    req: HoldRequest,
    clock: Callable[[], float] = time.monotonic,
    check: Check | None = None,
    check_period: float | None = None,
    settle: Callable[[], Awaitable[Any]] | None = None,
) -> dict[str, Any]:
    """Take one backup for ``req.attempt`` and hold its session until the finish asks to stop.

    :param check: Airflow's side, asked before the start (unless ``req.checked_at`` stands for that) and
        every half ``check_period`` (less a random part) while holding: a text (the run's finish ended,
        the run is no longer running) means nobody will end this backup, so it is not started, or it is
        failed and backup mode ended.
    :param check_period: seconds (default ``HOLDER_AIRFLOW_CHECK_S``); the check's answers may be half as
        old (the triggers' shared watch), so the holder sees a change within it.
    :param settle: awaited once everything is ready, just before the row is claimed: the last moment at
        which being cancelled leaves nothing behind (the trigger's pause after its triggerer stood still:
        ``triggers.backup.settled``).
    """
    deadline = _Deadline(req.backup_timeout, clock)
    checked = still_fresh(req.checked_at, check_period or HOLDER_AIRFLOW_CHECK_S, time.time())
    try:
        if not checked and (problem := await _ask_airflow(check)):
            return event(FAILED, f"not started: {problem}")
        async with AsyncExitStack() as stack:
            conn = await stack.enter_async_context(hook.connect("holder"))
            # The state session doubles as the backup session unless the table lives elsewhere
            # (backup of a standby): then both stay open, and losing either fails the backup.
            bconn = conn
            if hook.separate_state:
                bconn = await stack.enter_async_context(
                    hook.connect("holder backup session", backup_server=True)
                )
            try:
                holding = _Holding(hook, req, conn, bconn, deadline, clock, check, check_period, settle)
                return await _claim_and_run(holding)
            except psycopg.Error as err:  # before backup mode: nothing to end
                return event(FAILED, f"cannot start the backup: {hook.explain(err, conn)}")
    except BackupError as err:
        return event(FAILED, str(err))


async def _claim_and_run(h: _Holding) -> dict[str, Any]:
    """Claim the row (see decide_claim), then run the backup, follow our earlier claim, or refuse."""
    hook, conn, req = h.hook, h.conn, h.req
    h.notices.watch(h.bconn, hook.postgres_conn_id, backup_session=True)
    if h.bconn is not conn:
        h.notices.watch(conn, hook.state_conn_id, backup_session=False)
    await hook.ensure_table(conn)
    await hook.listen(conn)
    h.wal = await _plan_wal(h)  # may refuse: before the claim, nothing to undo
    if h.settle is not None:
        await h.settle()
    patience = _Deadline(EARLIER_ATTEMPT_WAIT_S, h.clock)
    while True:
        decision, row = await hook.claim(
            conn, req.owner, req.attempt, req.holder_try, req.label, req.terminate_live
        )
        if decision is not Claim.WAIT or patience.expired():
            break
        log.info(
            "an earlier attempt of %s (%s) still holds its backup; waiting for it to end",
            req.owner,
            row.attempt,
        )
        await hook.wait_for_change(conn, patience.cap(req.poll_interval))
    if decision in (Claim.REFUSE, Claim.WAIT):
        whose = (
            f"an earlier attempt ({row.attempt}) of this same backup"
            if decision is Claim.WAIT
            else (f"a backup owned by {row.owner or 'another client'}")
        )
        return event(
            FAILED,
            f"refused to start: {whose} (label {row.label!r}, holder pid {row.pid}) is {row.state.value} on "
            "this cluster; it was left untouched. Wait for it to finish, or set terminate_live=True to end "
            "it. Each cluster needs a state table of its own: if that backup is of another cluster whose "
            f"state shares {hook.table_description} (standbys of one primary), give each group its own "
            "table= option.",
        )
    if decision in (Claim.WATCH, Claim.FINISHED, Claim.LOST):
        # Our attempt was claimed before (a duplicate trigger or a re-run): never start again.
        log.info("backup of %s was already claimed (%s); following it", req.owner, decision.value)
        return await _until_ended(hook, conn, req.attempt, req.poll_interval)
    if decision is not Claim.START:
        log.warning("previous backup of %s replaced (%s)", row.owner, decision.value)
    return await _run_backup(h)


async def _plan_wal(h: _Holding) -> WalPlan:
    """How this backup's WAL gets archived (see :func:`plan_wal`); refused when nothing would archive it
    and ``req.wait_for_archive``."""
    server = await h.hook.archive_settings(h.bconn, backup_server=True)
    state = await h.hook.archive_settings(h.conn, backup_server=False) if h.bconn is not h.conn else None
    try:
        return plan_wal(server, state, h.req.wait_for_archive)
    except ValueError as err:
        raise BackupError(str(err)) from err


async def _until_ended(
    hook: PostgresBackupHook,
    conn: psycopg.AsyncConnection,
    attempt: str,
    poll_interval: float,
    vet: Callable[[BackupRow], Awaitable[dict[str, Any] | None]] | None = None,
    patience: _Deadline | None = None,
) -> dict[str, Any]:
    """Follow ``attempt``'s backup until it is complete or failed (its holder gone: marked failed).

    :param vet: called first with each read of that attempt's row; an event it returns ends the wait.
    :param patience: when it expires first, a PENDING event ends the wait.
    """
    while True:
        row = await hook.read(conn)
        if row is None or row.attempt != attempt:
            whose = f"{row.owner} (attempt {row.attempt}, {row.state.value})" if row else "nothing"
            return event(
                FAILED,
                f"the backup of attempt {attempt} is no longer in the table, which now holds"
                f" {whose}: its label cannot be reported",
                row,
            )
        if vet is not None and (ended := await vet(row)):
            return ended
        if row.state is BackupState.FAILED:
            return event(FAILED, f"backup failed: {row.error}", row)
        if row.state is BackupState.COMPLETE:
            return event(COMPLETE, "backup complete", row)
        if not row.holder_alive:
            await hook.mark_failed(conn, attempt, _session_gone(row))
            continue
        if patience is not None and patience.expired():
            return _pending(row)
        await hook.wait_for_change(conn, patience.cap(poll_interval) if patience else poll_interval)


def _pending(row: BackupRow | None) -> dict[str, Any]:
    return event(PENDING, "not settled within the inline wait: waiting on, deferred", row)


def _patience(seconds: float | None, clock: Callable[[], float] = time.monotonic) -> _Deadline | None:
    """A wait's patience (None: none; it waits to its end). Zero or less has already run out."""
    if seconds is None:
        return None
    return _Deadline(max(seconds, 1e-9), clock)


def _session_gone(row: BackupRow) -> str:
    return (
        f"the session holding backup mode (pid {row.pid}) is gone: triggerer stopped, connection killed or"
        " server restarted; backup mode ended with it"
    )


async def _run_backup(h: _Holding) -> dict[str, Any]:
    """The claimed backup (see :func:`_backup_mode`). Every end but complete, an exception included,
    marks this attempt's row failed (never another attempt's: ``mark_failed`` filters by attempt) and
    ends backup mode: none leaves its row ``running`` or ``done``.
    """
    hook, req = h.hook, h.req
    try:
        try:
            held = await _backup_mode(h)
        except (psycopg.OperationalError, psycopg.InterfaceError):
            raise
        except psycopg.Error as err:
            held = event(FAILED, f"PostgreSQL refused the backup: {hook.explain(err, h.bconn)}")
        if held["status"] == COMPLETE:
            return held
        return await _fail(h, held["message"])
    except (psycopg.OperationalError, psycopg.InterfaceError) as err:
        # The session is gone, and PostgreSQL ended its backup mode with it; record why elsewhere.
        return await _fail_elsewhere(hook, req.attempt, f"the session holding backup mode was lost: {err}")
    except (asyncio.CancelledError, Exception) as err:
        # Cancelled by Airflow (task cleared or marked failed), or a bug: closing this session ends
        # backup mode, so say so in the table before it closes.
        why = (
            "the holder was cancelled by Airflow"
            if isinstance(err, asyncio.CancelledError)
            else (f"the holder stopped on an unexpected error: {err!r}")
        )
        await asyncio.wait_for(_fail_elsewhere(hook, req.attempt, why), 10)
        raise


async def _backup_mode(h: _Holding) -> dict[str, Any]:
    """Backup mode from start to stop in ``h.bconn`` (state in ``h.conn``); returns the complete event, or
    a failed one saying why it must end (:func:`_run_backup` records that and ends backup mode)."""
    hook, conn, bconn, req = h.hook, h.conn, h.bconn, h.req
    assert h.wal is not None  # planned before the claim
    my_pid = conn.info.backend_pid  # the server's: connect() refused a session where it is a pooler's key
    log.info("starting backup %r (fast checkpoint: %s)", req.label, req.fast_checkpoint)
    h.notices.keep()
    try:
        start_lsn = await asyncio.wait_for(
            hook.start_backup(bconn, req.label, req.fast_checkpoint), h.deadline.remaining()
        )
    except asyncio.TimeoutError:
        return event(
            FAILED, f"the start checkpoint did not finish within backup_timeout={req.backup_timeout:g}s"
        )
    if not await hook.record_start(conn, start_lsn):
        return event(FAILED, "the backup was marked failed or taken over while its checkpoint was running")
    log.info("backup mode entered at %s; holding session pid %s", start_lsn, my_pid)
    check_every = (h.check_period or HOLDER_AIRFLOW_CHECK_S) / 2
    next_check = h.clock() + max(req.poll_interval, jittered(check_every))
    while True:
        row = await hook.read(conn)
        if row is None or row.attempt != req.attempt or row.pid != my_pid:
            by = (
                "another backup"
                if row is None or row.attempt != req.attempt
                else (f"another session (pid {row.pid}, not this holder's {my_pid})")
            )
            return event(FAILED, f"this backup's row was taken over by {by}")
        if row.state is BackupState.FAILED:
            return event(FAILED, f"backup marked failed: {row.error}")
        if row.state is BackupState.DONE:
            break
        if h.deadline.expired():
            return event(FAILED, f"backup_timeout={req.backup_timeout:g}s expired before the copy finished")
        if h.check is not None and h.clock() >= next_check:
            next_check = h.clock() + max(req.poll_interval, jittered(check_every))
            if problem := await _ask_airflow(h.check):
                return event(FAILED, f"{problem}: nothing would end this backup")
        # Woken by NOTIFY (any change of the row), by either session's socket (the server or
        # the network ending it), or by backup_timeout; re-read now and then regardless.
        standby = [bconn] if bconn is not conn else []
        for session in standby:
            await session.execute("SELECT 1")  # still there (and whatever it sent is read)
        wait = max(req.poll_interval, HOLDER_RECHECK_S)
        if h.check is not None:
            wait = min(wait, max(0.0, next_check - h.clock()))
        await hook.wait_for_change(conn, h.deadline.cap(wait), *standby)
    log.info("copy reported done; stopping backup (wait_for_archive: %s)", req.wait_for_archive)
    stopping = h.clock()  # with wait_for_archive, the stop (and a standby's follow) waits for the archive
    try:
        stop_lsn, label_file, spcmap = await asyncio.wait_for(
            hook.stop_backup(bconn, h.wal.stop_wait), h.deadline.remaining()
        )
    except asyncio.TimeoutError:
        return event(
            FAILED,
            await _archiving_failed(
                h,
                bconn,
                "pg_backup_stop (which waits until the WAL the backup needs is archived) did not return",
            ),
        )
    timeline = int(parse_backup_label(label_file).get("START TIMELINE") or 1)
    try:
        stop_timeline, history = await _stop_timeline(hook, bconn, stop_lsn, timeline)
    except ValueError as err:
        return event(FAILED, f"cannot tell the timeline of the stop LSN {stop_lsn}: {err}")
    if h.wal.follow and (problem := await _wait_archived(h, h.wal.follow, stop_lsn)):
        return event(FAILED, problem)
    archive_wait = h.clock() - stopping if h.wal.stop_wait or h.wal.follow else None
    if not await hook.mark_complete(
        conn, stop_lsn, label_file, spcmap, timeline, h.notices.text, stop_timeline, history
    ):
        row = await hook.read(conn)
        return event(
            FAILED, f"backup stopped but no longer ours to complete: {row.error if row else 'row gone'}"
        )
    row = await hook.read(conn)
    log.info("backup complete: %s .. %s", row.start_lsn, row.stop_lsn)
    warned = f"; PostgreSQL warned: {row.warnings}" if row.warnings else ""
    done = event(COMPLETE, f"backup complete (start {row.start_lsn}, stop {row.stop_lsn}){warned}", row)
    return {**done, ARCHIVE_WAIT: archive_wait}


async def _stop_timeline(
    hook: PostgresBackupHook, bconn: psycopg.AsyncConnection, stop_lsn: str, start_timeline: int
) -> tuple[int, str | None]:
    """The timeline a backup stopped on, and its history file when it is not ``start_timeline``.

    A primary's backup stops on the timeline it started on (pg_backup_stop fails a backup whose standby
    was promoted meanwhile). A standby follows its upstream's promotion onto a new timeline, and its
    stop point (its minimum recovery point) may then lie on it: asked right after the stop, the timeline
    it has replayed up to tells, through its history, which timeline holds the stop point.

    :raises ValueError: that history is malformed.
    """
    current, history = await hook.replay_timeline(bconn, start_timeline)
    if current is None or current == start_timeline:
        return start_timeline, None
    stop_timeline, history = timeline_at(stop_lsn, current, history)
    if stop_timeline != start_timeline:
        log.info(
            "the backup started on timeline %s and stopped on timeline %s (its server followed a promotion)",
            start_timeline,
            stop_timeline,
        )
    return stop_timeline, history if stop_timeline != start_timeline else None


async def _wait_archived(h: _Holding, archiver: WalArchiver, stop_lsn: str) -> str | None:
    """Wait until the WAL segment holding a backup's stop LSN is archived; returns why it failed
    (backup_timeout), or None once archived.

    The primary backed up (``SERVER``): its pg_backup_stop switched WAL past that segment, and its own
    archiver archives it. A standby: its stop point lies in the WAL the primary wrote, and a segment is
    archived once it is complete, by the primary when it switches past it, by an archive_mode=always
    standby once it has received it whole; so WAL is switched on the primary (``conn``, the state
    connection) first, then ``archiver`` (the standby's own, or the primary's) is followed.
    """
    hook, conn, bconn, deadline = h.hook, h.conn, h.bconn, h.deadline
    on, conn_id = (
        (conn, hook.state_conn_id) if archiver is WalArchiver.PRIMARY else (bconn, hook.postgres_conn_id)
    )
    timeline, segment_size = await hook.wal_timeline_and_segment_size(
        bconn if archiver is WalArchiver.SERVER else conn
    )
    segment = wal_segment_name(stop_lsn, timeline, segment_size)
    switched = archiver is WalArchiver.SERVER
    poll = ARCHIVE_FIRST_POLL_S
    while not archived_through(await hook.last_archived_wal(on), segment):
        if deadline.expired():
            return await _archiving_failed(
                h,
                on,
                f"WAL segment {segment}, which holds the stop LSN {stop_lsn}, was not archived by"
                f" connection {conn_id!r}",
            )
        if not switched:
            log.info(
                "switching WAL on connection %r so that segment %s (stop LSN %s) is archived",
                hook.state_conn_id,
                segment,
                stop_lsn,
            )
            await hook.switch_wal(conn)
            switched = True
        await asyncio.sleep(deadline.cap(poll))
        poll = min(poll * 1.5, ARCHIVE_POLL_S)
    log.info("WAL segment %s (stop LSN %s) is archived by connection %r", segment, stop_lsn, conn_id)
    return None


async def _archiving_failed(h: _Holding, conn: psycopg.AsyncConnection, what: str) -> str:
    """Why a backup failed when ``what`` did not happen within backup_timeout: WAL archiving, with
    pg_stat_archiver's account of the server of ``conn``."""
    return (
        f"{what} within backup_timeout={h.req.backup_timeout:g}s, so WAL archiving is failing or too slow "
        f"(check archive_command and the server log; {await h.hook.archiver_status(conn)})"
    )


async def _fail(h: _Holding, reason: str) -> dict[str, Any]:
    """Mark this hold attempt's backup failed, then end backup mode without waiting for the archive."""
    await h.hook.mark_failed(h.conn, h.req.attempt, reason)
    await h.hook.abort_backup(h.bconn)
    return event(FAILED, reason + "; backup mode ended", await h.hook.read(h.conn))


async def _fail_elsewhere(hook: PostgresBackupHook, attempt: str, reason: str) -> dict[str, Any]:
    try:
        async with hook.connect("failure report") as conn:
            await hook.mark_failed(conn, attempt, reason)
            return event(FAILED, reason, await hook.read(conn))
    except (BackupError, psycopg.Error) as err:
        return event(FAILED, f"{reason}; could not record it in the backup table either: {err}")


# ----------------------------------------------------------------------------------- gate and finish


async def _waiting(
    hook: PostgresBackupHook,
    purpose: str,
    body: Callable[[psycopg.AsyncConnection], Awaitable[dict[str, Any]]],
) -> dict[str, Any]:
    """Run ``body`` in a LISTENing session; connection and SQL errors become FAILED events."""
    try:
        async with hook.connect(purpose) as conn:
            try:
                await hook.listen(conn)
                return await body(conn)
            except psycopg.Error as err:
                return event(FAILED, f"cannot follow the backup: {hook.explain(err, conn)}", retryable=True)
    except BackupError as err:
        return event(FAILED, str(err), retryable=True)


async def wait_for_start(
    hook: PostgresBackupHook,
    attempt: str | None = None,
    hold_view: Callable[[], Awaitable[HoldView]] | None = None,
    poll_interval: float = 5.0,
    timeout: float = ONE_DAY_S,
    clock: Callable[[], float] = time.monotonic,
    patience: float | None = None,
) -> dict[str, Any]:
    """The gate: wait until the hold's CURRENT attempt is in backup mode (``running``, start LSN
    recorded, holder session connected).

    A row of any other attempt (an earlier try, another group, another installation) neither opens
    nor fails the gate; it waits for its own attempt. It fails when that attempt's backup failed or
    already ended, when the hold task ended without it, or after ``timeout`` seconds (gate_timeout).

    Once open, it asks the server backed up where its configuration files are (:func:`server_config`):
    the STARTED event carries them as ``server_config_files``, for the copy.

    :param attempt: the attempt to wait for, when known up front (tests, benchmarks).
    :param hold_view: asked for the hold's current attempt (see :class:`HoldView`), at the start,
        whenever the row names another attempt, and every ``poll_interval`` seconds.
    :param patience: seconds after which, nothing settled, a PENDING event ends the wait (the gate's
        inline wait in its worker slot, before it defers). None: wait to the end.
    """
    if (attempt is None) == (hold_view is None):
        raise ValueError("wait_for_start needs exactly one of attempt and hold_view")
    fixed = HoldView(attempt)
    deadline = _Deadline(timeout, clock)
    inline = _patience(patience, clock)
    hint_at = clock() + 5  # a fast checkpoint takes well under a second

    async def body(conn: psycopg.AsyncConnection) -> dict[str, Any]:
        nonlocal hint_at
        view, viewed_at = None, 0.0
        while True:
            row = await hook.read(conn)
            # Ask Airflow again when the row names another attempt than the one we know, when that attempt
            # is not yet surely the current one, and now and then (has the hold task ended?).
            unsure = (
                view is None or row is None or row.attempt != view.attempt or (row.live and not view.current)
            )
            if hold_view is not None and (unsure or clock() - viewed_at >= poll_interval):
                try:
                    view = await hold_view()
                except Exception as err:  # noqa: BLE001 - no answer this time: keep what we knew, ask again
                    log.warning("could not ask Airflow about the hold task (asking again): %s", err)
                viewed_at = clock()
            view = view or fixed
            ours = row is not None and view.attempt is not None and row.attempt == view.attempt
            if ours:
                if row.started and row.holder_alive and view.current:
                    return event(STARTED, f"backup running since {row.start_lsn}", row)
                if row.state is BackupState.FAILED and view.current:
                    return event(FAILED, f"backup failed: {row.error}", row)
                if row.state in (BackupState.DONE, BackupState.COMPLETE) and view.current:
                    return event(
                        FAILED,
                        f"this run's backup already {row.state.value} before its copy could"
                        " start (copying now would not match its label)",
                        row,
                    )
                if row.live and not row.holder_alive and view.current:
                    await hook.mark_failed(conn, row.attempt, _session_gone(row))
                    continue
                if row.state is BackupState.RUNNING and row.start_lsn is None and clock() > hint_at:
                    hint_at = float("inf")
                    # Advice only to a hold known to have asked for a spread checkpoint.
                    hint = f" {FAST_CHECKPOINT_HINT}" if view.fast_checkpoint is False else ""
                    log.info("backup %s is waiting for its start checkpoint.%s", row.owner, hint)
            if view.ended:
                reason = f" (its backup: {row.state.value}, {row.error})" if ours else ""
                task = f" {view.task_id}" if view.task_id else ""
                return event(
                    FAILED,
                    f"the backup holder task{task} ended ({view.ended}) without starting this run's"
                    f" backup{reason}; see its log",
                    row if ours else None,
                )
            if deadline.expired():
                return event(
                    FAILED,
                    f"gate_timeout={timeout:g}s passed and this run's backup is not in backup"
                    " mode yet (a start checkpoint still running, or no triggerer running the hold)",
                    row if ours else None,
                )
            if inline is not None and inline.expired():
                return _pending(row if ours else None)
            # Not yet sure which attempt is current (the hold task is starting): look again soon.
            soon = ours and row.live and not view.current
            wait = deadline.cap(min(poll_interval, 0.5) if soon else poll_interval)
            await hook.wait_for_change(conn, inline.cap(wait) if inline else wait)

    opened = await _waiting(hook, "gate", body)
    if opened["status"] == STARTED:
        try:
            opened[CONFIG_FILES] = (await server_config(hook)).as_dict()
        except (BackupError, psycopg.Error) as err:
            return event(
                FAILED,
                f"cannot ask the server backed up where its configuration files are: {err}",
                retryable=True,
            )
    return opened


async def server_config(hook: PostgresBackupHook) -> ServerConfig:
    """Where the server backed up keeps its configuration files (asked in a session of its own, as the
    gate opens: the copy captures those outside the data directory, :mod:`pg_safe_backup.files.extconfig`).
    """
    async with hook.connect("gate configuration files", backup_server=True) as bconn:
        return await hook.config_files(bconn)


async def finish_backup(
    hook: PostgresBackupHook,
    attempt: str,
    start_lsn: str,
    copy_problem: str | None = None,
    poll_interval: float = 5.0,
    patience: float | None = None,
) -> dict[str, Any]:
    """The finish: end the backup the copy ran under (``attempt``, opened at ``start_lsn``).

    With ``copy_problem`` (a copy task did not succeed) the backup is failed (even one already
    complete: its label is withdrawn) and FAILED is returned whatever the row says: a failed copy
    never yields a label. Otherwise the holder is asked to stop the backup, and the outcome is
    waited for. Only that attempt's row is ever touched; a row of another attempt, or with another
    start LSN, fails the finish at once (the backup the copy ran under is gone).

    :param patience: seconds after which, the backup not yet ended, a PENDING event ends the wait (the
        finish's inline wait, before it defers; waiting again from the start is harmless: the request
        to stop is made only while the backup is running). None: wait to the end.
    """
    inline = _patience(patience)

    async def body(conn: psycopg.AsyncConnection) -> dict[str, Any]:
        if copy_problem:
            await hook.mark_failed(conn, attempt, copy_problem, withdraw=True)
            return event(FAILED, f"backup failed: {copy_problem}", await hook.read(conn))
        await hook.request_done(conn, attempt, start_lsn)

        async def vet(row: BackupRow) -> dict[str, Any] | None:
            if row.start_lsn != start_lsn:
                await hook.mark_failed(
                    conn,
                    attempt,
                    f"the copy began under start LSN {start_lsn} but this backup started at"
                    f" {row.start_lsn}: its label does not fit the copy",
                    withdraw=True,
                )
                return event(
                    FAILED,
                    f"backup failed: the copy began under start LSN {start_lsn}, not under"
                    f" this backup's {row.start_lsn}",
                    await hook.read(conn),
                )
            if row.state is BackupState.RUNNING and row.holder_alive:  # set back by hand, or raced: ask again
                await hook.request_done(conn, attempt, start_lsn)
            return None

        return await _until_ended(hook, conn, attempt, poll_interval, vet, inline)

    return await _waiting(hook, "finish", body)
