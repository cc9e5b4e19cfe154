"""The gate: copy tasks start behind it once this run's backup is in backup mode."""

from __future__ import annotations

from dataclasses import asdict
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from pg_safe_backup.params import check_text
from pg_safe_backup.session import STARTED
from pg_safe_backup.triggers.backup import PostgresBackupStartedTrigger, started, task_states
from pg_safe_backup.utils.mixins import PostgresBackupBaseSensor, fail_on

if TYPE_CHECKING:
    from airflow.sdk import Context

#: How much longer than gate_timeout Airflow's own deferral timeout waits (the trigger fails first,
#: with a clear message; Airflow's timeout is only a backstop).
DEFERRAL_GRACE_S = 60


class PostgresBackupStartedSensor(PostgresBackupBaseSensor):
    """
    Wait until this run's backup is running (pg_backup_start returned), then let the copy begin.

    Opens only on the backup of the hold task's CURRENT attempt, in state ``running`` with its start
    LSN recorded: a row left by an earlier attempt, another group or another installation neither
    opens nor fails it. Fails fast when that backup failed or already ended, its holder session is
    gone, or the hold task ended without starting it (for instance refused because another backup
    is live); and after ``timeout`` seconds (gate_timeout), deferred or not. Pushes ``start_lsn``,
    ``label`` and ``attempt`` as XCom, so copy tasks can template them and the finish acts on that
    attempt only. It pushes ``server_config_files`` too: where the server keeps its configuration files
    (asked as the gate opens), from which a ``PostgresCopyDataDirectoryOperator`` after it captures those
    outside the data directory. A backup that failed or did not start fails the gate without a retry
    (``AirflowFailException``: the hold is never retried, so no other backup would come); a server
    that cannot be reached is retried.

    :param holder_task_id: the hold task of this backup (its ``PostgresStartBackupOperator``,
        ``hold_backup_session`` in a ``PostgresOnlineBackup``).
    """

    ui_color = "#f0e8c8"

    def __init__(self, *, holder_task_id: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.hold_task_id = check_text(holder_task_id, "holder_task_id")

    def execute(self, context: Context) -> Any:
        ref = self.backup_ref(context, hold_task_id=self.hold_task_id)
        trigger = PostgresBackupStartedTrigger(
            self.backup_target.hook_kwargs,
            ref=asdict(ref),
            poll_interval=self.poll_interval,
            timeout=self.timeout,
        )
        # Wait here only for a hold task that is on its way: one still waiting for a (pool) slot may wait
        # long, and this worker slot is better given to a copy.
        hold_state = task_states(ref, [self.hold_task_id])[self.hold_task_id]
        coming = hold_state == "queued" or started(hold_state)
        return self.wait_on(
            context,
            trigger,
            timeout=timedelta(seconds=self.timeout + DEFERRAL_GRACE_S),
            patience=min(self.inline_wait, self.timeout or self.inline_wait) if coming else 0.0,
        )

    def execute_complete(self, context: Context, event: dict[str, Any]) -> dict[str, Any]:
        if event["status"] != STARTED:
            raise fail_on(event, f"backup did not start: {event['message']}")
        return self.ended_well(context, PostgresBackupStartedTrigger, event)
