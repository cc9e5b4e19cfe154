"""Triggers: the holder that keeps the backup session open, the gate's and the finish's waits.

What the waits need to know from Airflow (the hold's current attempt, whether the run's finish or
the run itself ended) is read here, through the Task SDK, and handed to ``session`` as callbacks.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any, TypeVar

from asgiref.sync import sync_to_async

from airflow.triggers.base import BaseTrigger, TaskFailedEvent, TaskSuccessEvent, TriggerEvent

from pg_safe_backup.hooks.backup import PostgresBackupHook
from pg_safe_backup.runwatch import (
    CHECK_PERIOD_S,
    ENDED_STATES,
    RUN_GOING_STATES,
    RunStates,
    states_by_map_index,
    watch_for,
)
from pg_safe_backup.session import (
    ARCHIVE_WAIT,
    COMPLETE,
    CONFIG_FILES,
    ONE_DAY_S,
    Check,
    HoldRequest,
    HoldView,
    finish_backup,
    hold_backup,
    wait_for_start,
)
from pg_safe_backup.state import BackupRef, BackupTarget
from pg_safe_backup.utils import metrics

T = TypeVar("T")

#: XCom key under which the hold task publishes its attempt before it defers.
ATTEMPT_XCOM = "backup_attempt"
#: XCom keys the finish pushes (plain values) besides its return value.
RESULT_KEYS = (
    "backup_label",
    "tablespace_map",
    "start_lsn",
    "stop_lsn",
    "timeline",
    "label",
    "system_identifier",
    "warnings",
    "stop_timeline",
    "timeline_history",
)


def public(backup: dict[str, Any]) -> dict[str, Any]:
    """What a backup's row tells a task's return value: its state, owner, attempt and results."""
    return {k: backup.get(k) for k in ("state", "owner", "attempt", *RESULT_KEYS)}


#: Whether a Task SDK call made here (a trigger's look at Airflow) has returned in this process. A triggerer
#: builds its in-process execution API (FastAPI, Cadwyn's versioned routers) on the first such call, which
#: blocks its supervisor, and so its heartbeat, for seconds: long enough, under load or with a short
#: ``[triggerer] triggerer_health_check_threshold``, for its triggers to be handed to another triggerer and
#: cancelled here. Until then a holder makes its first look before backup mode, never during it.
_sdk_warm = False
#: Seconds at least that a holder which stood still pauses before it claims its backup (see :func:`settled`).
HANDOVER_GRACE_S = 5.0


def warming(fetch: Callable[[], Awaitable[T]]) -> Callable[[], Awaitable[T]]:
    """``fetch`` (a Task SDK call), noting when one has returned in this process (:data:`_sdk_warm`)."""

    async def call() -> T:
        global _sdk_warm
        found = await fetch()
        _sdk_warm = True
        return found

    return call


def handover_threshold() -> float:
    """``[triggerer] triggerer_health_check_threshold``: seconds without a heartbeat after which another
    triggerer takes this one's triggers over (Airflow's default: 30)."""
    from airflow.configuration import conf

    return conf.getfloat("triggerer", "triggerer_health_check_threshold", fallback=30.0)


def settled(
    began: float,
    threshold: float,
    clock: Callable[[], float] = time.monotonic,
    pause: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    log: Callable[..., Any] = lambda *_: None,
) -> Callable[[], Awaitable[None]]:
    """The holder's ``settle`` (see ``session.hold_backup``): the pause of a holder whose triggerer stood
    still long enough to have handed its trigger over.

    A triggerer's supervisor stands still at times (it builds its in-process execution API on its first Task
    SDK call, for seconds, longer under load; or it serves another trigger's call), and its heartbeat with
    it; past ``threshold`` (:func:`handover_threshold`) another triggerer takes its triggers over. Once the
    supervisor runs again it reloads its triggers and its runner cancels the lost one, within seconds, or as
    long again as it stood still under the same load. A holder that reached its claim more than half
    ``threshold`` after it began therefore pauses that long (at least :data:`HANDOVER_GRACE_S`, at least
    ``threshold``) before claiming: cancelled during the pause, it leaves nothing; cancelled a moment after
    entering backup mode, its session would end with it, and the trigger's run on the other triggerer would
    find the backup lost and fail it (never restarting it: a copy may have begun).

    :param began: when the trigger began, on ``clock``.
    :param threshold: the triggerer's health-check threshold, seconds.
    :param clock: seconds, monotonic (a test's fake clock).
    :param pause: how to wait (a test's fake sleep).
    :param log: where to say so (a logger's ``warning``).
    """

    async def settle() -> None:
        stood = clock() - began
        if stood > threshold / 2:
            wait = max(stood, threshold, HANDOVER_GRACE_S)
            log(
                "this triggerer took %.1fs to get the backup ready (it stood still; another triggerer takes"
                " its triggers over after %.0fs): pausing %.0fs before claiming it, so that a hand-over of"
                " this trigger lands first",
                stood,
                threshold,
                wait,
            )
            await pause(wait)

    return settle


def task_states(ref: BackupRef, task_ids: list[str]) -> dict[str, str | None]:
    """The states of ``task_ids`` in the ref's DAG run, at the ref's map index (from a worker or a
    trigger)."""
    from airflow.sdk.execution_time.task_runner import RuntimeTaskInstance

    mapped = ref.map_index >= 0
    found = RuntimeTaskInstance.get_task_states(
        dag_id=ref.dag_id,
        task_ids=task_ids,
        run_ids=[ref.run_id],
        map_index=ref.map_index if mapped else None,
    ).get(ref.run_id, {})
    return {t: found.get(f"{t}_{ref.map_index}" if mapped else t) for t in task_ids}


def hold_view(ref: BackupRef) -> HoldView:
    """Which attempt the hold task of the ref's run is on (see :class:`HoldView`)."""
    from airflow.sdk.execution_time.xcom import XCom

    assert ref.hold_task_id
    state = task_states(ref, [ref.hold_task_id])[ref.hold_task_id]
    if not started(state):
        return HoldView(
            None, current=False, task_id=ref.hold_task_id
        )  # current try not started: anything readable is older
    published = XCom.get_one(
        key=ATTEMPT_XCOM,
        dag_id=ref.dag_id,
        task_id=ref.hold_task_id,
        run_id=ref.run_id,
        map_index=ref.map_index,
    )
    published = published if isinstance(published, dict) else {}
    # A try publishes before it defers (a held-inline one stays running): until then a running task's
    # readable value may be the previous try's.
    current = state != "running" or bool(published.get("inline"))
    return HoldView(
        published.get("attempt"),
        current=current,
        ended=state if state in ENDED_STATES else None,
        task_id=ref.hold_task_id,
        fast_checkpoint=published.get("fast_checkpoint"),  # absent from a hold of an earlier release
    )


def started(state: str | None) -> bool:
    """Whether a hold task in ``state`` has started its try (or ended): only then is its attempt worth
    reading."""
    return state in ("running", "deferred") or state in ENDED_STATES


def states_of(dag_id: str, run_id: str, task_id: str) -> dict[int, str | None]:
    """A task's state at every map index of the run: one Task SDK call (no ``map_index``: all of them)."""
    from airflow.sdk.execution_time.task_runner import RuntimeTaskInstance

    found = RuntimeTaskInstance.get_task_states(dag_id=dag_id, task_ids=[task_id], run_ids=[run_id])
    return states_by_map_index(found.get(run_id, {}), task_id)


def gate_view(ref: BackupRef, max_age: float) -> Callable[[], Awaitable[HoldView]]:
    """The gate's look at its hold (:func:`hold_view`), cheap while the hold has not started: the gates of
    one run in this process share one read of the hold's state at every map index per ``max_age`` (a
    pool may keep a thousand clusters waiting for a slot, their gates deferred); once this gate's hold
    has started (or ended), its state and attempt are read afresh, as always, since the gate opens on
    them."""
    assert ref.hold_task_id
    key = (ref.dag_id, ref.run_id, ref.hold_task_id)
    # Kept by this closure: the watch lives as long as a gate of the run does.
    watch = watch_for(key, warming(lambda: sync_to_async(states_of)(*key)), max_age=max_age)

    async def view() -> HoldView:
        if not started((await watch.states()).get(ref.map_index)):
            return HoldView(None, current=False, task_id=ref.hold_task_id)
        return await sync_to_async(hold_view)(ref)

    return view


def run_states(dag_id: str, run_id: str, finish_task_id: str | None) -> RunStates:
    """The DAG run's state and its finish task's state at every map index: two Task SDK calls, whatever
    the number of backups (map indexes) of the run."""
    from airflow.sdk.execution_time.task_runner import RuntimeTaskInstance

    run_state = RuntimeTaskInstance.get_dagrun_state(dag_id=dag_id, run_id=run_id)
    if run_state not in RUN_GOING_STATES or not finish_task_id:
        return RunStates(run_state)
    return RunStates(run_state, states_of(dag_id, run_id, finish_task_id))


def check_period() -> float:
    """``[pg_safe_backup] holder_check_period``: seconds within which a holder sees its run or its finish
    end (default :data:`~pg_safe_backup.runwatch.CHECK_PERIOD_S`)."""
    from airflow.configuration import conf

    return conf.getfloat("pg_safe_backup", "holder_check_period", fallback=CHECK_PERIOD_S)


def holder_check(ref: BackupRef, period: float) -> Check:
    """The holder's look at Airflow (why nobody would end its backup: the DAG run ended, or its finish
    did), through this process's watch of its run (:mod:`pg_safe_backup.runwatch`): the holders of one run
    share one fetch per half ``period``."""
    key = (ref.dag_id, ref.run_id, ref.finish_task_id)
    fetch = metrics.timed(
        lambda: sync_to_async(run_states)(*key), "holder_check.duration", "holder_check.errors"
    )
    # Kept by this closure: the watch lives as long as a holder of the run does.
    watch = watch_for(key, warming(fetch), max_age=period / 2)

    async def check() -> str | None:
        return (await watch.states()).problem(ref.run_id, ref.finish_task_id, ref.map_index)

    return check


class PostgresBackupTriggerBase(BaseTrigger):
    """Common part: which server and table (:class:`BackupTarget`, serialised as ``hook_kwargs``), and
    the serialisation of plain keyword arguments.

    :param hook_kwargs: :attr:`BackupTarget.hook_kwargs`, the backup hook's arguments (the name trigger rows
        written by earlier releases carry).
    """

    def __init__(self, hook_kwargs: dict[str, Any], **kwargs: Any) -> None:
        super().__init__()
        self.target = BackupTarget(**hook_kwargs)
        self.kwargs = kwargs

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return f"{type(self).__module__}.{type(self).__qualname__}", {
            "hook_kwargs": self.target.hook_kwargs,
            **self.kwargs,
        }

    @property
    def hook(self) -> PostgresBackupHook:
        return PostgresBackupHook(**self.target.hook_kwargs)

    @property
    def ref(self) -> BackupRef | None:
        ref = self.kwargs.get("ref")
        return BackupRef(**ref) if ref else None

    async def result(self, patience: float | None = None) -> dict[str, Any]:
        """Do the wait (or the whole backup) and return its result (see ``session.event``).

        :param patience: seconds after which a wait not yet settled returns ``session.PENDING`` (the
            inline wait of a task in its worker slot, before it defers). None: wait to the end.
        """
        raise NotImplementedError

    def waited(self, seconds: float) -> None:
        """The task already waited ``seconds`` inline before deferring on this trigger (a deadline counted
        from the task's start is shortened by as much)."""

    @classmethod
    def outcome(cls, result: dict[str, Any], log: Any) -> tuple[dict[str, Any], Any]:
        """A successful wait's result as the task's XComs besides its return value, and that value; what it
        tells is logged to ``log``.

        The task pushes them when it resumes on a worker (``execute_complete``), not the trigger
        (``TaskSuccessEvent(xcoms=...)``): Airflow 3.3.2 stores a string pushed that way JSON-encoded twice
        (``"0/2000028"`` read back with its quotes).
        """
        raise NotImplementedError

    async def run(self) -> AsyncIterator[TriggerEvent]:
        yield TriggerEvent(await self.result())


class PostgresHoldBackupTrigger(PostgresBackupTriggerBase):
    """
    Start a backup for one attempt of the hold task and hold its session until the finish marks it
    done, then stop it.

    Runs as long as the backup does; its task stays deferred meanwhile. A re-run or duplicate of
    this trigger never starts a second backup for the same attempt (see ``decide_claim``).

    :param hook_kwargs: arguments of :class:`PostgresBackupHook`.
    :param request: the fields of :class:`pg_safe_backup.session.HoldRequest`.
    :param ref: the fields of :class:`pg_safe_backup.state.BackupRef`: the backup is not started, or
        is failed, once the run's finish task or the run itself has ended. None: no such check.
    :param mode: the backup's kind for the metrics' ``mode`` tag: ``full`` or ``snapshot``.
    """

    def __init__(
        self,
        hook_kwargs: dict[str, Any],
        request: dict[str, Any],
        ref: dict[str, Any] | None = None,
        mode: str = "full",
    ) -> None:
        super().__init__(hook_kwargs, request=request, ref=ref, mode=mode)

    async def result(self, patience: float | None = None) -> dict[str, Any]:
        began = time.monotonic()
        ref = self.ref
        period = check_period()
        check = holder_check(ref, period) if ref else None
        request = HoldRequest(**self.kwargs["request"])
        if not _sdk_warm:  # this process's first Task SDK calls: before backup mode (see _sdk_warm)
            request = replace(request, checked_at=None)
        held = await hold_backup(
            self.hook,
            request,
            check=check,
            check_period=period,
            settle=settled(began, handover_threshold(), log=self.log.warning),
        )
        mode = self.kwargs["mode"]
        if held["status"] != COMPLETE:
            metrics.incr("backup.failed", mode=mode, stage="hold")
        elif held.get(ARCHIVE_WAIT) is not None:
            metrics.timing("wal_archive.wait", held[ARCHIVE_WAIT], mode=mode)
        return held

    async def run(self) -> AsyncIterator[TriggerEvent]:
        # The trigger ends the task itself: no second trip through the scheduler and a worker once
        # the backup is over, and no exposure to Airflow 3.3's race that fails a task resumed soon
        # after its deferral (apache/airflow#67287): a task already ended is left alone.
        result = await self.result()
        if result["status"] == COMPLETE:
            self.log.info("%s", result["message"])
            yield TaskSuccessEvent()
        else:
            self.log.error("backup not taken: %s", result["message"])
            yield TaskFailedEvent()


class PostgresBackupStartedTrigger(PostgresBackupTriggerBase):
    """
    The gate's wait: until the hold's current attempt is in backup mode (see ``session.wait_for_start``).

    :param hook_kwargs: arguments of :class:`PostgresBackupHook`.
    :param ref: the fields of :class:`pg_safe_backup.state.BackupRef` (``hold_task_id`` set).
    :param poll_interval: seconds between looks at the hold task (row changes wake it at once via NOTIFY).
    :param timeout: seconds before the gate gives up (gate_timeout).
    """

    def __init__(
        self,
        hook_kwargs: dict[str, Any],
        ref: dict[str, Any],
        poll_interval: float = 5.0,
        timeout: float = ONE_DAY_S,
    ) -> None:
        super().__init__(hook_kwargs, ref=ref, poll_interval=poll_interval, timeout=timeout)

    def waited(self, seconds: float) -> None:
        if self.kwargs["timeout"]:  # 0: no limit
            self.kwargs["timeout"] = max(self.kwargs["timeout"] - seconds, 1e-3)

    async def result(self, patience: float | None = None) -> dict[str, Any]:
        ref = self.ref
        return await wait_for_start(
            self.hook,
            hold_view=gate_view(ref, max_age=self.kwargs["poll_interval"] / 2),
            poll_interval=self.kwargs["poll_interval"],
            timeout=self.kwargs["timeout"],
            patience=patience,
        )

    @classmethod
    def outcome(cls, result: dict[str, Any], log: Any) -> tuple[dict[str, Any], Any]:
        """``start_lsn``, ``label``, ``attempt`` and ``server_config_files`` (see the gate sensor)."""
        backup, server = result["backup"], result.get(CONFIG_FILES)
        if server and server.get("unreadable"):
            log.warning(
                "the copy may miss configuration files outside the data directory: %s", server["unreadable"]
            )
        log.info("%s; the copy may begin", result["message"])
        value = {key: backup[key] for key in ("start_lsn", "label", "attempt")}
        return {**value, CONFIG_FILES: server}, value


class PostgresFinishBackupTrigger(PostgresBackupTriggerBase):
    """
    The finish's wait: end the backup the copy ran under and wait for the outcome (see
    ``session.finish_backup``).

    :param hook_kwargs: arguments of :class:`PostgresBackupHook`.
    :param attempt: the attempt the gate opened on.
    :param start_lsn: the start LSN the gate opened with.
    :param copy_problem: why the copy cannot be trusted (the backup is then failed), or None.
    :param poll_interval: seconds between safety re-reads (changes wake it at once via NOTIFY).
    """

    def __init__(
        self,
        hook_kwargs: dict[str, Any],
        attempt: str,
        start_lsn: str,
        copy_problem: str | None = None,
        poll_interval: float = 5.0,
    ) -> None:
        super().__init__(
            hook_kwargs,
            attempt=attempt,
            start_lsn=start_lsn,
            copy_problem=copy_problem,
            poll_interval=poll_interval,
        )

    async def result(self, patience: float | None = None) -> dict[str, Any]:
        return await finish_backup(self.hook, **self.kwargs, patience=patience)

    @classmethod
    def outcome(cls, result: dict[str, Any], log: Any) -> tuple[dict[str, Any], Any]:
        """Each of :data:`RESULT_KEYS`; the return value is the backup's :func:`public` row."""
        value = public(result["backup"])
        log.info(
            "backup complete: start %s, stop %s\n%s",
            value["start_lsn"],
            value["stop_lsn"],
            value["backup_label"],
        )
        if value["warnings"]:
            log.warning("PostgreSQL warned during this backup:\n%s", value["warnings"])
        return {key: value[key] for key in RESULT_KEYS}, value


# The names before the rename to Postgres<Verb><Object>. A trigger row written by the old version names its
# class path, and a triggerer that picks it up after an upgrade must still find it.
BackupHolderTrigger = PostgresHoldBackupTrigger
BackupStartedTrigger = PostgresBackupStartedTrigger
BackupFinishTrigger = PostgresFinishBackupTrigger
