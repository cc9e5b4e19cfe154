"""The DAGs of figure 11 (bench/fleetbench.py), set by it through the environment.

``pg_fleet_bench``: one mapped ``PostgresOnlineBackup`` group over FLEET_CLUSTERS (JSON list of
{"conn_id", "pgdata"}), its holds in the backup-mode pool FLEET_POOL, each copy by the copy operator
into FLEET_BACKUP_ROOT/<run>/<map index>, its label stored there.

``pg_fleet_holders``: FLEET_HOLDERS hold tasks (mapped, one backup table each) on the one cluster of the
connection ``fleet_holders``, with their run's and their finish's Airflow checks on, and no copy: what a
triggerer process pays per held backup.
"""

from __future__ import annotations

import json
import os

import pendulum

from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.sdk import DAG, task_group

from pg_safe_backup.operators.backup import PostgresStartBackupOperator, PostgresStoreBackupLabelOperator
from pg_safe_backup.operators.copy import PostgresCopyDataDirectoryOperator
from pg_safe_backup.task_group import PostgresOnlineBackup

CLUSTERS = json.loads(os.environ.get("FLEET_CLUSTERS", "[]"))
POOL = os.environ.get("FLEET_POOL") or None
ROOT = os.environ.get("FLEET_BACKUP_ROOT", "/nonexistent")
HOLDERS = int(os.environ.get("FLEET_HOLDERS", "1"))
START = pendulum.datetime(2026, 1, 1, tz="UTC")

with DAG("pg_fleet_bench", schedule=None, start_date=START, catchup=False, tags=["benchmark"]):

    @task_group(group_id="clusters")
    def one_cluster(conn_id: str, pgdata: str) -> None:
        destination = f"{ROOT}/{{{{ run_id }}}}/{{{{ ti.map_index }}}}"
        with PostgresOnlineBackup(
            group_id="backup",
            postgres_conn_id=conn_id,
            fast_checkpoint=True,
            backup_timeout=3600,
            backup_mode_pool=POOL,
            # The gates of clusters waiting for a pool slot wait in the triggerer, not in worker slots.
            deferrable=True,
        ) as backup:
            PostgresCopyDataDirectoryOperator(task_id="copy", source=pgdata, destination=destination)
        PostgresStoreBackupLabelOperator(task_id="store_backup_label", backup=backup, destination=destination)

    one_cluster.expand_kwargs(CLUSTERS or [{"conn_id": "none", "pgdata": "/nonexistent"}])

with DAG("pg_fleet_holders", schedule=None, start_date=START, catchup=False, tags=["benchmark"]):
    holds = PostgresStartBackupOperator.partial(
        task_id="hold",
        postgres_conn_id="fleet_holders",
        fast_checkpoint=True,
        wait_for_archive=False,
        backup_key="holders",
        finish_task_id="finish",
    ).expand(table=[f"holder_{i:04d}" for i in range(HOLDERS)])
    # Never runs while the holds are held: the holders' check reads its state at every map index.
    holds >> EmptyOperator(task_id="finish")
