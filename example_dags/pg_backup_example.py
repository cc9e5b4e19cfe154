"""Nightly online backup of one PostgreSQL cluster: copy the data directory, store backup_label and manifest.

Set PGDATA_SOURCE (the cluster's data directory, readable by the worker) and BACKUP_ROOT (a local folder,
or any ObjectStoragePath URL such as ``s3://aws_default@bucket/backups``), and create the Airflow
connection ``pg_main`` (type postgres) for the cluster. With CeleryExecutor, set PG_BACKUP_COPY_QUEUE to
the queue of the worker that sees the data directory (``airflow celery worker --queues pg-db1`` on the
database host): the copy is pinned to it with ``queue=``. ``pg_backup_rsync_example`` is the same backup
with a copy of your own (rsync).

A failed task calls the group's notifier (``pg_backup_notifier``: a log line; SMTP or Slack in production).
The store task updates the Airflow Asset of BACKUP_ROOT (``file:///backups``, ``s3://bucket/backups``):
``pg_restore_drill_example`` is scheduled on it.
"""

from __future__ import annotations

import os

import pendulum
from pg_backup_notifier import BackupFailureNotifier

from airflow.sdk import DAG

from pg_safe_backup.operators.backup import PostgresStoreBackupLabelOperator
from pg_safe_backup.operators.copy import PostgresCopyDataDirectoryOperator
from pg_safe_backup.task_group import PostgresOnlineBackup

PGDATA = os.environ.get("PGDATA_SOURCE", "/var/lib/postgresql/15/main")
BACKUP_ROOT = os.environ.get("BACKUP_ROOT", "/backups")
# run_after, not ts_nodash: manual runs have no logical date in Airflow 3.
DESTINATION = BACKUP_ROOT + "/{{ dag_run.run_after | ts_nodash }}"

with DAG(
    "pg_backup_example",
    schedule=os.environ.get("PG_BACKUP_SCHEDULE") or None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["postgres", "backup"],
) as dag:
    with PostgresOnlineBackup(
        group_id="backup",
        postgres_conn_id=os.environ.get("PG_BACKUP_CONN_ID", "pg_main"),
        backup_timeout=3600,
        fast_checkpoint=os.environ.get("PG_BACKUP_FAST_CHECKPOINT", "") == "1",
        poll_interval=2.0,
        default_args={"on_failure_callback": BackupFailureNotifier()},  # every task of the group
    ) as backup:
        # pg_basebackup's exclusions, tablespaces inside the copy, global/pg_control last, SHA-256 of each
        # file for the manifest, fsync. overwrite: a cleared run copies again into the same folder.
        PostgresCopyDataDirectoryOperator(
            task_id="copy_data_directory",
            source=PGDATA,
            destination=DESTINATION,
            overwrite=True,
            queue=os.environ.get("PG_BACKUP_COPY_QUEUE", "default"),
        )
    # Its outlet: the Asset of BACKUP_ROOT, the destination's folder (catalog_root= when a template makes it).
    PostgresStoreBackupLabelOperator(
        task_id="store_backup_label",
        backup=backup,
        destination=DESTINATION,
        on_failure_callback=BackupFailureNotifier(),
    )
