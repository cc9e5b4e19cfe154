"""The gate: copy tasks start behind it once this run's backup is in backup mode."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseSensorOperator
from airflow.sdk.exceptions import AirflowException

from pg_safe_backup.operators.backup import BackupTaskMixin, default_deferrable
from pg_safe_backup.params import check_text
from pg_safe_backup.session import STARTED
from pg_safe_backup.triggers.backup import BackupStateTrigger

if TYPE_CHECKING:
    from airflow.sdk import Context


class PostgresBackupStartedSensor(BackupTaskMixin, BaseSensorOperator):
    """
    Wait until this run's backup is running (pg_backup_start returned), then let the copy begin.

    Fails fast when the backup failed, its holder session is gone, or the holder task ended
    without starting it (for instance refused because another backup is live). Pushes
    ``start_lsn`` and ``label`` as XCom, so copy tasks can template them.

    :param holder_task_id: the ``PostgresBackupHoldOperator`` of this backup.
    """

    template_fields: Sequence[str] = ()
    ui_color = "#f0e8c8"

    def __init__(
        self,
        *,
        holder_task_id: str,
        postgres_conn_id: str = "postgres_default",
        state_conn_id: str | None = None,
        database: str | None = None,
        table: str = "backup",
        table_schema: str = "public",
        backup_key: str = "backup",
        poll_interval: float = 5.0,
        deferrable: bool | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._init_backup(postgres_conn_id, state_conn_id, database, table, table_schema, backup_key, poll_interval,
                          default_deferrable() if deferrable is None else deferrable)
        self.holder_task_id = check_text(holder_task_id, "holder_task_id")

    def execute(self, context: Context) -> Any:
        ti = context["ti"]
        trigger = BackupStateTrigger(
            self.hook_kwargs, owner=self.backup_owner(context), until=STARTED, poll_interval=self.poll_interval,
            holder={"dag_id": ti.dag_id, "run_id": ti.run_id, "task_id": self.holder_task_id},
        )
        return self.wait_on(context, trigger, timeout=timedelta(seconds=self.timeout))

    def execute_complete(self, context: Context, event: dict[str, Any]) -> dict[str, Any]:
        if event["status"] != STARTED:
            raise AirflowException(f"backup did not start: {event['message']}")
        backup = event["backup"]
        context["ti"].xcom_push(key="start_lsn", value=backup["start_lsn"])
        context["ti"].xcom_push(key="label", value=backup["label"])
        self.log.info("%s; the copy may begin", event["message"])
        return {"start_lsn": backup["start_lsn"], "label": backup["label"]}
