"""DAGs of the end-to-end tests (the test session sets the E2E_* environment and pg_e2e connection)."""

from __future__ import annotations

import os
import shlex
import subprocess
import time
from pathlib import Path

import pendulum

from airflow.providers.standard.operators.bash import BashOperator
from airflow.sdk import DAG, task

from pg_safe_backup.files.layout import RSYNC_VANISHED, rsync_exclude_args
from pg_safe_backup.operators.backup import PostgresStoreBackupLabelOperator, PostgresVerifyBackupOperator
from pg_safe_backup.operators.copy import PostgresCopyDataDirectoryOperator
from pg_safe_backup.operators.lifecycle import PostgresRestoreDrillOperator
from pg_safe_backup.task_group import PostgresOnlineBackup
from pg_safe_backup.utils.mixins import catalog_asset

PGDATA = os.environ.get("E2E_PGDATA", "/nonexistent")
DESTINATION = os.environ.get("E2E_BACKUP_ROOT", "/tmp") + "/{{ run_id }}"
#: A backups root in the test's S3 server (moto), under the connection id the server is attached as.
S3_ROOT = os.environ.get("E2E_S3_ROOT", "s3://nonexistent/backups")
if os.environ.get("E2E_S3_ROOT"):
    # Without apache-airflow-providers-amazon (not in the test environments) Airflow has no filesystem for
    # s3://: each process that parses this file (the workers running its tasks) attaches the test's server
    # under the connection id S3_ROOT names, as a deployment without the provider would.
    import s3fs

    from airflow.sdk.io import attach

    attach(
        "s3",
        conn_id=S3_ROOT.split("://", 1)[1].split("@", 1)[0],
        fs=s3fs.S3FileSystem(
            endpoint_url=os.environ["AWS_ENDPOINT_URL"],
            key=os.environ["AWS_ACCESS_KEY_ID"],
            secret=os.environ["AWS_SECRET_ACCESS_KEY"],
            client_kwargs={"region_name": os.environ["AWS_DEFAULT_REGION"]},
        ),
    )
#: pg_basebackup's exclusions (global/pg_control among them: it is copied last, on its own).
EXCLUDES = rsync_exclude_args()


def rsync(*args: str) -> None:
    """rsync -a; a file vanishing during the copy (exit 24) is normal on a live cluster."""
    done = subprocess.run(["rsync", "-a", *args])
    if done.returncode not in (0, RSYNC_VANISHED):
        raise subprocess.CalledProcessError(done.returncode, ["rsync", "-a", *args])


#: The copy as one shell command, for DAGs whose copy is a BashOperator (global/pg_control last).
COPY_COMMAND = (
    f"mkdir -p {DESTINATION} && {{ rsync -a {shlex.join(EXCLUDES)} {PGDATA}/ {DESTINATION}/"
    f" || [ $? -eq {RSYNC_VANISHED} ]; }} && rsync -a {PGDATA}/global/pg_control {DESTINATION}/global/"
)


@task
def copy_data_directory(destination: str) -> None:
    """Copy base/ first, then force a checkpoint while the writer keeps inserting, then the rest
    (global/pg_control last). Only backup_label makes recovery start early enough for such a copy."""
    import psycopg

    # Which Celery worker ran the copy (demo/stack.py sets PGSB_AIRFLOW_COMPONENT in each component).
    print(f"copy ran on {os.environ.get('PGSB_AIRFLOW_COMPONENT')}")
    Path(destination).mkdir(parents=True)
    rsync(*EXCLUDES, f"{PGDATA}/base/", f"{destination}/base/")
    time.sleep(float(os.environ.get("E2E_CHECKPOINT_DELAY", "3")))
    with psycopg.connect(os.environ["E2E_PG_DSN"], autocommit=True) as conn:
        conn.execute("CHECKPOINT")
    rsync(*EXCLUDES, "--exclude=/base/", f"{PGDATA}/", f"{destination}/")
    rsync(f"{PGDATA}/global/pg_control", f"{destination}/global/")


@task
def copy_tablespaces(destination: str) -> None:
    """Each tablespace (pg_tblspc/OID links) to DESTINATION_tablespaces/OID."""
    Path(f"{destination}_tablespaces").mkdir(parents=True)
    for link in sorted(Path(PGDATA, "pg_tblspc").iterdir()):
        rsync(*EXCLUDES, f"{link.resolve()}/", f"{destination}_tablespaces/{link.name}/")


def backup_dag(
    dag_id: str,
    failing_copy: bool,
    copy_queue: str | None = None,
    copy_operator: bool = False,
    destination: str = DESTINATION,
    **copy_kwargs: str,
) -> DAG:
    """The backup group (real copy, or one that fails), the store and the restore check.

    :param copy_queue: the queue of the copy tasks (the worker that sees the data directory); the default
        queue if None.
    :param copy_operator: copy with PostgresCopyDataDirectoryOperator instead of the rsync tasks.
    :param destination: where the copy operator copies (an object store: stored, not checked in the DAG).
    :param copy_kwargs: more arguments of the copy operator (``format``, ``compression``).
    """
    pinned = {"queue": copy_queue} if copy_queue else {}
    with DAG(dag_id, schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False) as dag:
        with PostgresOnlineBackup(
            group_id="backup",
            postgres_conn_id="pg_e2e",
            fast_checkpoint=True,
            backup_timeout=600,
            poll_interval=1.0,
        ) as backup:
            if failing_copy:
                BashOperator(task_id="copy_data_directory", bash_command="echo copy broke; exit 3", **pinned)
            elif copy_operator:
                PostgresCopyDataDirectoryOperator(
                    task_id="copy_data_directory",
                    source=PGDATA,
                    destination=destination,
                    progress_interval=1.0,
                    **pinned,
                    **copy_kwargs,
                )
            else:
                copy_data_directory.override(**pinned)(DESTINATION)
                copy_tablespaces.override(**pinned)(DESTINATION)
        if destination == DESTINATION:
            store_and_verify(backup)
        else:
            PostgresStoreBackupLabelOperator(
                task_id="store_backup_label", backup=backup, destination=destination
            )
    return dag


def store_and_verify(backup: PostgresOnlineBackup) -> None:
    """Store the group's label with the copy, then verify the backup, in the DAG itself (the archive holds
    the WAL up to the stop point)."""
    store = PostgresStoreBackupLabelOperator(
        task_id="store_backup_label", backup=backup, destination=DESTINATION
    )
    store >> PostgresVerifyBackupOperator(
        task_id="verify_backup",
        backup_dir=DESTINATION,
        wal_archive=os.environ.get("E2E_WAL_ARCHIVE", "/nonexistent"),
    )


e2e_backup = backup_dag("e2e_backup", failing_copy=False)
e2e_copy_operator = backup_dag("e2e_copy_operator", failing_copy=False, copy_operator=True)
e2e_copy_fails = backup_dag("e2e_copy_fails", failing_copy=True)
e2e_copy_s3 = backup_dag(
    "e2e_copy_s3",
    failing_copy=False,
    copy_operator=True,
    destination=S3_ROOT + "/{{ run_id }}",
    format="tar",
    compression="zstd",
)

# The restore drill of the newest backup under the backups root (catalogued by the store task), after each
# backup stored there (the store task's outlet), as example_dags/pg_restore_drill_example.py is; unpaused, or
# triggered, by the tests.
with DAG(
    "e2e_drill",
    schedule=catalog_asset(os.environ.get("E2E_BACKUP_ROOT", "/nonexistent")),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
) as e2e_drill:
    PostgresRestoreDrillOperator(
        task_id="restore_drill",
        root=os.environ.get("E2E_BACKUP_ROOT", "/nonexistent"),
        wal_archive=os.environ.get("E2E_WAL_ARCHIVE", "/nonexistent"),
        max_age="{{ dag_run.conf.get('max_age', 3600) }}",
        invariant_sql="SELECT count(*) > 0 FROM ledger",
    )

# The same drill of the newest backup under a root in an object store.
with DAG(
    "e2e_drill_s3", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False
) as e2e_drill_s3:
    PostgresRestoreDrillOperator(
        task_id="restore_drill",
        root=S3_ROOT,
        wal_archive=os.environ.get("E2E_WAL_ARCHIVE", "/nonexistent"),
        invariant_sql="SELECT count(*) > 0 FROM ledger",
    )
