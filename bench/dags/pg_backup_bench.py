"""The benchmark's backup DAG: example_dags/pg_backup_example.py with `cp -a` as the copy.

The same provider task group and settings as the example (fast checkpoint, as `make demo` runs
it); the copy is the very command the benchmark times on its own, so the difference between the
two is what Airflow and the provider add. Set by bench/dagbench.py: BENCH_PGDATA, BENCH_BACKUP_ROOT
and the connection bench_pg.
"""

from __future__ import annotations

import os

import pendulum

from airflow.providers.standard.operators.bash import BashOperator
from airflow.sdk import DAG

from pg_safe_backup.operators.backup import PostgresStoreBackupLabelOperator
from pg_safe_backup.task_group import PostgresOnlineBackup

PGDATA = os.environ.get("BENCH_PGDATA", "/nonexistent")
DESTINATION = os.environ.get("BENCH_BACKUP_ROOT", "/nonexistent") + "/{{ run_id }}"
TIMED = "TIMEFORMAT='cp -a: %R s elapsed, %S s system, %U s user'; time "

with DAG(
    "pg_backup_bench",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["postgres", "backup", "benchmark"],
):
    with PostgresOnlineBackup(
        group_id="backup",
        postgres_conn_id="bench_pg",
        backup_timeout=3600,
        fast_checkpoint=True,
        poll_interval=2.0,
    ) as backup:
        # The very command bench/dagbench.py times on its own (bash's `time` reports cp's CPU time too).
        BashOperator(task_id="copy_data_directory", bash_command=f"{TIMED}cp -a {PGDATA} {DESTINATION}")
    PostgresStoreBackupLabelOperator(task_id="store_backup_label", backup=backup, destination=DESTINATION)
