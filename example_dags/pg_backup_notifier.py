"""How a failed backup or drill reaches a person: the failure notifier the example DAGs give their tasks.

A notifier (Airflow's ``BaseNotifier``) is what ``on_failure_callback=`` takes. This one needs no external
service: it writes one line to the task log and, when PG_BACKUP_FAILURE_LOG names a file, appends it there.
In production, give the tasks a notifier of a provider instead (or as well), e.g.
``SmtpNotifier(to="dba@example.com", subject=...)`` of apache-airflow-providers-smtp
(``airflow.providers.smtp.notifications.smtp``) or ``SlackNotifier(slack_conn_id=..., channel=..., text=...)``
of apache-airflow-providers-slack (``airflow.providers.slack.notifications.slack``). Not a DAG: a module the
example DAGs import (Airflow puts the DAGs folder on ``sys.path``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from airflow.sdk import BaseNotifier

LINE = "pg-safe-backup: {{ ti.dag_id }} {{ ti.run_id }} {{ ti.task_id }} failed: {{ exception }}"


class BackupFailureNotifier(BaseNotifier):
    """One line per failed task: which DAG run and task failed, and why.

    :param message: the line (templated: the task's context renders it).
    """

    template_fields: Sequence[str] = ("message",)

    def __init__(self, message: str = LINE) -> None:
        super().__init__()
        self.message = message

    def notify(self, context) -> None:
        line = " ".join(str(self.message).split())  # one line, whatever the exception's text holds
        self.log.error("%s", line)
        if path := os.environ.get("PG_BACKUP_FAILURE_LOG"):
            with open(path, "a", encoding="utf-8") as out:
                out.write(line + "\n")
