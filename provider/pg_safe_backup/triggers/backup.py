"""Triggers: the holder that keeps the backup session open, and the waiter of gate and finish."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import Any

from asgiref.sync import sync_to_async

from airflow.triggers.base import BaseTrigger, TriggerEvent

from pg_safe_backup.hooks.backup import PostgresBackupHook
from pg_safe_backup.session import HoldRequest, hold_backup, wait_for_backup

#: Seconds a holder trigger runs at least before its event (see BackupHolderTrigger.run).
MIN_HOLDER_RUNTIME = 10.0

#: Task states in which a holder task can no longer hold a backup.
HOLDER_ENDED_STATES = frozenset({"failed", "upstream_failed", "skipped", "removed", "success"})


class _BackupTrigger(BaseTrigger):
    """Common part: the hook's arguments and the serialisation of plain keyword arguments."""

    def __init__(self, hook_kwargs: dict[str, Any], **kwargs: Any) -> None:
        super().__init__()
        self.hook_kwargs = hook_kwargs
        self.kwargs = kwargs

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return f"{type(self).__module__}.{type(self).__qualname__}", {"hook_kwargs": self.hook_kwargs, **self.kwargs}

    @property
    def hook(self) -> PostgresBackupHook:
        return PostgresBackupHook(**self.hook_kwargs)


class BackupHolderTrigger(_BackupTrigger):
    """
    Start a backup and hold its session until the finish marks it done, then stop it.

    Runs as long as the backup does; its task stays deferred meanwhile. A re-run or duplicate of
    this trigger never starts a second backup for the same attempt (see ``decide_claim``).

    :param hook_kwargs: arguments of :class:`PostgresBackupHook`.
    :param kwargs: the fields of :class:`pg_safe_backup.session.HoldRequest`.
    """

    def __init__(self, hook_kwargs: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(hook_kwargs, **asdict(HoldRequest(**kwargs)))

    async def run(self) -> AsyncIterator[TriggerEvent]:
        started = time.monotonic()
        result = await hold_backup(self.hook, HoldRequest(**self.kwargs))
        # Airflow 3.3's scheduler can fail a task whose trigger fires within ~5 s of its deferral
        # (the executor's late report of the deferral is applied after the task was re-queued;
        # apache/airflow#67287). The session is closed by now: an early result (a refusal, a short
        # snapshot copy) just waits a little.
        await asyncio.sleep(max(0.0, MIN_HOLDER_RUNTIME - (time.monotonic() - started)))
        yield TriggerEvent(result)


class BackupStateTrigger(_BackupTrigger):
    """
    Wait for one owner's backup to be started (``until="started"``) or finished (``"complete"``).

    :param hook_kwargs: arguments of :class:`PostgresBackupHook`.
    :param owner: the backup's owner (DAG run and backup key).
    :param until: ``"started"`` or ``"complete"``.
    :param poll_interval: seconds between safety re-reads (changes wake it at once via NOTIFY).
    :param request: ``"done"`` or ``"fail"``: ask for the end of the backup before waiting.
    :param reason: the failure reason for ``request="fail"``.
    :param expected_start_lsn: the start LSN the copy began under (finish only).
    :param holder: ``{"dag_id", "run_id", "task_id"}`` of the holder task: the wait fails as soon
        as that task has ended without starting the backup (refused, failed).
    """

    def __init__(
        self,
        hook_kwargs: dict[str, Any],
        owner: str,
        until: str,
        poll_interval: float = 5.0,
        request: str | None = None,
        reason: str = "",
        expected_start_lsn: str | None = None,
        holder: dict[str, str] | None = None,
    ) -> None:
        super().__init__(
            hook_kwargs, owner=owner, until=until, poll_interval=poll_interval, request=request,
            reason=reason, expected_start_lsn=expected_start_lsn, holder=holder,
        )

    async def _holder_problem(self) -> str | None:
        from airflow.sdk.execution_time.task_runner import RuntimeTaskInstance

        holder = self.kwargs["holder"]
        states = await sync_to_async(RuntimeTaskInstance.get_task_states)(
            dag_id=holder["dag_id"], task_ids=[holder["task_id"]], run_ids=[holder["run_id"]]
        )
        state = states.get(holder["run_id"], {}).get(holder["task_id"])
        if state in HOLDER_ENDED_STATES:
            return f"the backup holder task {holder['task_id']} ended ({state}) without starting this run's backup; see its log"
        return None

    async def run(self) -> AsyncIterator[TriggerEvent]:
        kw = dict(self.kwargs)
        check = self._holder_problem if kw.pop("holder") else None
        yield TriggerEvent(await wait_for_backup(self.hook, check=check, **kw))
