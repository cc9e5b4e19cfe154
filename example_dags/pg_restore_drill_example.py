"""A restore drill after each backup, then retention: prove the newest backup under BACKUP_ROOT still
restores, and how long it takes; then delete what the retention policy lets go.

``pg_backup_example`` stores each backup in its own folder under BACKUP_ROOT with a catalog entry
(``<folder>.backup_info.json``) beside it. This DAG takes the newest that proves itself (its label and
manifest agree), restores it on a temporary server in a scratch
folder, runs every check (page LSNs, ``pg_verifybackup``, recovery with the WAL archive, amcheck,
and the invariant below), and records the restore time (the RTO) in XCom, its log and the backup's
catalog entry. It fails, naming the age, when the newest backup is older than
DRILL_MAX_AGE_HOURS: the backups have stopped.

Once the drill passed, retention keeps the newest KEEP_LAST backups (and always the newest verified
one: the drill just verified it), deletes the others, then the WAL files older than the oldest kept
backup's start (as pg_archivecleanup); a failed drill deletes nothing.

Run it on a worker with PostgreSQL binaries of the backup's major and room for one more copy
(``queue=``, PG_DRILL_QUEUE). Set WAL_ARCHIVE to the folder archive_command copies into.

Scheduled on the Airflow Asset of BACKUP_ROOT, which the backup DAG's store task updates: it runs after each
stored backup, not on a clock. A failure calls the notifier of ``pg_backup_notifier``.
"""

from __future__ import annotations

import os
from datetime import timedelta

import pendulum
from pg_backup_notifier import BackupFailureNotifier

from airflow.sdk import DAG

from pg_safe_backup.operators.lifecycle import PostgresBackupRetentionOperator, PostgresRestoreDrillOperator
from pg_safe_backup.utils.mixins import catalog_asset

BACKUP_ROOT = os.environ.get("BACKUP_ROOT", "/backups")

with DAG(
    "pg_restore_drill_example",
    # After each stored backup. Run only then, it cannot see the backups stop (max_age): for that, add a
    # clock, AssetOrTimeSchedule(timetable=CronTriggerTimetable("0 7 * * *", timezone="UTC"), assets=...).
    schedule=catalog_asset(BACKUP_ROOT),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args={"on_failure_callback": BackupFailureNotifier()},
    tags=["postgres", "backup", "drill"],
) as dag:
    drill = PostgresRestoreDrillOperator(
        task_id="restore_drill",
        root=BACKUP_ROOT,
        wal_archive=os.environ.get("WAL_ARCHIVE", "/var/lib/postgresql/wal_archive"),
        max_age=timedelta(hours=float(os.environ.get("DRILL_MAX_AGE_HOURS", "30"))),
        # Rows every restore must show: adapt to your data (true in every row, or the drill fails).
        invariant_sql="SELECT count(*) > 0 FROM pg_catalog.pg_database WHERE datname = current_database()",
        queue=os.environ.get("PG_DRILL_QUEUE", "default"),
    )
    drill >> PostgresBackupRetentionOperator(
        task_id="retention",
        root=BACKUP_ROOT,
        wal_archive=os.environ.get("WAL_ARCHIVE", "/var/lib/postgresql/wal_archive"),
        keep_last=int(os.environ.get("KEEP_LAST", "7")),
    )
