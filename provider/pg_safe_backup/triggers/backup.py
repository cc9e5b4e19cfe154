"""Triggers: the holder that keeps the backup session open, and the waiter of gate and finish."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import Any

from asgiref.sync import sync_to_async

from airflow.triggers.base import BaseTrigger, TaskFailedEvent, TaskSuccessEvent, TriggerEvent

from pg_safe_backup.hooks.backup import PostgresBackupHook
from pg_safe_backup.session import COMPLETE, HoldRequest, hold_backup, wait_for_backup

#: Task states in which a holder task can no longer hold a backup.
HOLDER_ENDED_STATES = frozenset({"failed", "upstream_failed", "skipped", "removed", "success"})


class BackupTriggerBase(BaseTrigger):
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

    async def result(self) -> dict[str, Any]:
        """Do the wait (or the whole backup) and return its result (see ``session.event``)."""
        raise NotImplementedError


class BackupHolderTrigger(BackupTriggerBase):
    """
    Start a backup and hold its session until the finish marks it done, then stop it.

    Runs as long as the backup does; its task stays deferred meanwhile. A re-run or duplicate of
    this trigger never starts a second backup for the same attempt (see ``decide_claim``).

    :param hook_kwargs: arguments of :class:`PostgresBackupHook`.
    :param kwargs: the fields of :class:`pg_safe_backup.session.HoldRequest`.
    """

    def __init__(self, hook_kwargs: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(hook_kwargs, **asdict(HoldRequest(**kwargs)))

    async def result(self) -> dict[str, Any]:
        return await hold_backup(self.hook, HoldRequest(**self.kwargs))

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


class BackupStateTrigger(BackupTriggerBase):
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

    async def result(self) -> dict[str, Any]:
        kw = dict(self.kwargs)
        check = self._holder_problem if kw.pop("holder") else None
        return await wait_for_backup(self.hook, check=check, **kw)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        yield TriggerEvent(await self.result())
