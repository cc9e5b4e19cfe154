"""DAGs of the snapshot end-to-end tests (tests/test_e2e_snapshots.py sets the E2E_* environment and the
pg_e2e connection): the data directory and its tablespace live on btrfs subvolumes of a loop device."""

from __future__ import annotations

import os

import pendulum

from airflow.sdk import DAG

from pg_safe_backup.operators.backup import PostgresStoreBackupLabelOperator, PostgresVerifyBackupOperator
from pg_safe_backup.operators.copy import PostgresCopyDataDirectoryOperator
from pg_safe_backup.task_group import PostgresOnlineBackup

PGDATA = os.environ.get("E2E_PGDATA", "/nonexistent")
DESTINATION = os.environ.get("E2E_BACKUP_ROOT", "/tmp") + "/{{ run_id }}"
SNAPSHOTS = os.environ.get("E2E_SNAPSHOT_DIR", "/nonexistent")
WAL_ARCHIVE = os.environ.get("E2E_WAL_ARCHIVE", "/nonexistent")
#: The btrfs driver as command templates. The test's file E2E_SNAPSHOT_HOLD, while it exists, holds the
#: snapshot command (it names the file it waits in, E2E_SNAPSHOT_WAITING): a condition the test controls.
HOLD, WAITING = (
    os.environ.get("E2E_SNAPSHOT_HOLD", "/nonexistent"),
    os.environ.get("E2E_SNAPSHOT_WAITING", ""),
)
COMMANDS = {
    "driver": "command",
    "snapshot_command": (
        f"if [ -e {HOLD} ]; then touch {WAITING}; while [ -e {HOLD} ]; do sleep 0.1; done; fi;"
        " btrfs subvolume snapshot -r {volume} {snapshot}"
    ),
    "delete_command": "if [ -e {snapshot} ]; then btrfs subvolume delete {snapshot}; fi",
}
#: The data directory's volume cannot be snapshotted (the tablespace's, taken first, can).
FAILING = {
    **COMMANDS,
    "snapshot_command": "case {volume} in *pgdata) echo 'snapshot refused: quota exceeded' >&2; exit 5;;"
    " esac; btrfs subvolume snapshot -r {volume} {snapshot}",
}


def snapshot_dag(dag_id: str, verify: bool = True, **snapshot: object) -> DAG:
    """The snapshot group with a copy-out into DESTINATION, the store, and (``verify``) the DAG's checks."""
    with DAG(dag_id, schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False) as dag:
        with PostgresOnlineBackup(
            group_id="backup",
            postgres_conn_id="pg_e2e",
            fast_checkpoint=True,
            backup_timeout=600,
            poll_interval=1.0,
            snapshot={"data_directory": PGDATA, "snapshot_dir": SNAPSHOTS, **snapshot},
        ) as backup:
            PostgresCopyDataDirectoryOperator(
                task_id="copy_out", source=PGDATA, destination=DESTINATION, progress_interval=1.0
            )
        store = PostgresStoreBackupLabelOperator(
            task_id="store_backup_label", backup=backup, destination=DESTINATION
        )
        if verify:
            store >> PostgresVerifyBackupOperator(
                task_id="verify_backup", backup_dir=DESTINATION, wal_archive=WAL_ARCHIVE
            )
    return dag


e2e_snapshot = snapshot_dag("e2e_snapshot")
e2e_snapshot_commands = snapshot_dag("e2e_snapshot_commands", verify=False, **COMMANDS)
e2e_snapshot_fails = snapshot_dag("e2e_snapshot_fails", verify=False, **FAILING)
e2e_snapshot_keep = snapshot_dag("e2e_snapshot_keep", verify=False, keep=True, **COMMANDS)
