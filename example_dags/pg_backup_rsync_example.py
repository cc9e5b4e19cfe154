"""Bring your own copy: the same backup as ``pg_backup_example``, with the data directory copied by rsync.

Set PGDATA_SOURCE (the cluster's data directory, readable by the worker) and BACKUP_ROOT, and
create the Airflow connection ``pg_main`` (type postgres) for the cluster. With CeleryExecutor, set
PG_BACKUP_COPY_QUEUE to the queue of the worker that sees the data directory (``airflow celery worker
--queues pg-db1`` on the database host): the copy is pinned to it with ``queue=``.
"""

from __future__ import annotations

import os
import shlex

import pendulum
from pg_backup_notifier import BackupFailureNotifier

from airflow.providers.standard.operators.bash import BashOperator
from airflow.sdk import DAG

from pg_safe_backup.files.layout import RSYNC_VANISHED, rsync_exclude_args
from pg_safe_backup.operators.backup import PostgresStoreBackupLabelOperator
from pg_safe_backup.task_group import PostgresOnlineBackup

PGDATA = os.environ.get("PGDATA_SOURCE", "/var/lib/postgresql/15/main")
BACKUP_ROOT = os.environ.get("BACKUP_ROOT", "/backups")
# run_after, not ts_nodash: manual runs have no logical date in Airflow 3.
DESTINATION = BACKUP_ROOT + "/{{ dag_run.run_after | ts_nodash }}"
# What a base backup leaves out: pg_basebackup's own list (pg_safe_backup.files.layout), as rsync options.
# global/pg_control is among them: it is copied on its own, last. A backup of a standby ends at the
# minimum recovery point of the pg_control in the copy, which is only right when it was copied after
# everything else (PostgreSQL does the same in basebackup.c, and cannot check it on a standby).
EXCLUDES = shlex.join(rsync_exclude_args())
# --delete-excluded: a cleared run copies again into the same folder; what its earlier attempt left
# there (an old backup_label or backup_manifest above all) must go. Exit status 24 (a file vanished
# during the copy) is normal on a live cluster: WAL replay covers it.
COPY = (
    f"mkdir -p {DESTINATION} && {{ rsync -a --delete-excluded {EXCLUDES} {PGDATA}/ {DESTINATION}/"
    f" || [ $? -eq {RSYNC_VANISHED} ]; }} && rsync -a {PGDATA}/global/pg_control {DESTINATION}/global/"
)

with DAG(
    "pg_backup_rsync_example",
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
        BashOperator(
            task_id="copy_data_directory",
            bash_command=COPY,
            queue=os.environ.get("PG_BACKUP_COPY_QUEUE", "default"),
        )
    PostgresStoreBackupLabelOperator(
        task_id="store_backup_label",
        backup=backup,
        destination=DESTINATION,
        on_failure_callback=BackupFailureNotifier(),
    )
