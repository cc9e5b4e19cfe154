"""DAGs of tests/test_e2e_rerun.py: clearing and re-running, nested groups and a mapped group over clusters.

The test sets E2E_CLUSTERS (JSON: name -> {"conn_id", "pgdata", "wal_archive"}), E2E_BACKUP_ROOT and
E2E_FAIL_ONCE (a flag file: while it exists, the next copy removes it and fails).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pendulum

from airflow.sdk import DAG, TaskGroup, task, task_group

from pg_safe_backup.operators.backup import PostgresStoreBackupLabelOperator, PostgresVerifyBackupOperator
from pg_safe_backup.task_group import PostgresOnlineBackup

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e_dags"))
from e2e_backup_dags import EXCLUDES, rsync  # noqa: E402

CLUSTERS: dict[str, dict[str, str]] = json.loads(os.environ.get("E2E_CLUSTERS", "{}"))
#: The pool (deferred tasks counted) that bounds how many of the mapped group's clusters are in backup mode.
BACKUP_MODE_POOL = os.environ.get("E2E_BACKUP_MODE_POOL")
ROOT = os.environ.get("E2E_BACKUP_ROOT", "/tmp")
#: Restore check of each copy: the table the test filled holds exactly that cluster's rows.
INVARIANT = (
    "SELECT count(*) = 1000 AND bool_and(cluster = '{name}'), format('%s rows of %s', count(*),"
    " string_agg(DISTINCT cluster, ',')) FROM who"
)
START = pendulum.datetime(2026, 1, 1, tz="UTC")


@task
def copy_cluster(pgdata: str, destination: str) -> None:
    """The data directory to ``destination`` (global/pg_control last); fails once while E2E_FAIL_ONCE
    exists."""
    flag = Path(os.environ.get("E2E_FAIL_ONCE", "/nonexistent/flag"))
    if flag.exists():
        flag.unlink()
        raise RuntimeError("the copy failed (E2E_FAIL_ONCE)")
    Path(destination).mkdir(parents=True, exist_ok=True)
    rsync("--delete", *EXCLUDES, f"{pgdata}/", f"{destination}/")
    rsync(f"{pgdata}/global/pg_control", f"{destination}/global/")


def backup_and_check(
    name: str,
    conn_id: str,
    pgdata: str,
    wal_archive: str,
    destination: str,
    inline_wait: float | None = None,
) -> None:
    """One PostgresOnlineBackup group, its label stored into the copy, and the restore check."""
    with PostgresOnlineBackup(
        group_id="backup",
        postgres_conn_id=conn_id,
        fast_checkpoint=True,
        backup_timeout=600,
        poll_interval=1.0,
        # inline_wait given: deferrable gate and finish (the stack keeps Airflow's default_deferrable=False)
        **({} if inline_wait is None else {"deferrable": True, "inline_wait": inline_wait}),
    ) as backup:
        copy_cluster(pgdata, destination)
    store = PostgresStoreBackupLabelOperator(
        task_id="store_backup_label", backup=backup, destination=destination
    )
    store >> PostgresVerifyBackupOperator(
        task_id="verify_backup",
        backup_dir=destination,
        wal_archive=wal_archive,
        invariant_sql=INVARIANT.format(name=name),
    )


def one_cluster_dag(dag_id: str, name: str) -> DAG:
    with DAG(dag_id, schedule=None, start_date=START, catchup=False) as dag:
        c = CLUSTERS.get(name, {"conn_id": "none", "pgdata": "/nonexistent", "wal_archive": "/nonexistent"})
        backup_and_check(
            name, c["conn_id"], c["pgdata"], c["wal_archive"], f"{ROOT}/{dag_id}/{{{{ run_id }}}}"
        )
    return dag


# 1. a run whose copy fails, cleared whole, then its re-run restores
e2e_rerun_clear = one_cluster_dag("e2e_rerun_clear", "main")
# 2. only the hold of a completed run cleared; the next run; only the copy of a completed run cleared
e2e_rerun_hold = one_cluster_dag("e2e_rerun_hold", "main")

# 3. two PostgresOnlineBackup(group_id="backup") in two parent groups: two backups, two labels; the east
# group's deferrable gate and finish wait inline first (inline_wait), the west's defer at once (inline_wait=0)
with DAG("e2e_nested_groups", schedule=None, start_date=START, catchup=False) as e2e_nested_groups:
    for parent, name, inline_wait in (("east", "x", 30), ("west", "y", 0)):
        with TaskGroup(parent):
            c = CLUSTERS.get(
                name, {"conn_id": "none", "pgdata": "/nonexistent", "wal_archive": "/nonexistent"}
            )
            backup_and_check(
                name,
                c["conn_id"],
                c["pgdata"],
                c["wal_archive"],
                f"{ROOT}/e2e_nested_groups/{{{{ run_id }}}}/{parent}",
                inline_wait,
            )

# 4. a mapped task group over three clusters' connection ids: each map index its own backup and copy
with DAG("e2e_mapped_group", schedule=None, start_date=START, catchup=False) as e2e_mapped_group:

    @task_group(group_id="clusters")
    def one_cluster(name: str, conn_id: str, pgdata: str, wal_archive: str) -> None:
        destination = f"{ROOT}/e2e_mapped_group/{{{{ run_id }}}}/{{{{ ti.map_index }}}}"
        with PostgresOnlineBackup(
            group_id="backup",
            postgres_conn_id=conn_id,
            fast_checkpoint=True,
            backup_timeout=600,
            poll_interval=1.0,
            backup_mode_pool=BACKUP_MODE_POOL,
        ) as backup:
            copy_cluster(pgdata, destination)
        store = PostgresStoreBackupLabelOperator(
            task_id="store_backup_label", backup=backup, destination=destination
        )
        store >> check_restore(name, destination, wal_archive)

    @task
    def check_restore(name: str, destination: str, wal_archive: str) -> str:
        from pg_safe_backup.verify import verify_backup

        result = verify_backup(destination, wal_archive, invariant_sql=INVARIANT.format(name=name))
        if not result.ok:
            raise RuntimeError(f"restore check of {destination} failed: {result.summary()}")
        return result.summary()

    one_cluster.expand_kwargs(
        [{"name": n, **CLUSTERS[n]} for n in ("x", "y", "z") if n in CLUSTERS]
        or [{"name": "none", "conn_id": "none", "pgdata": "/nonexistent", "wal_archive": "/x"}]
    )

# 5. hand-wired, with the finish pointed at a task that is not the gate: no start LSN, no guard, so no label
with DAG("e2e_wrong_gate", schedule=None, start_date=START, catchup=False) as e2e_wrong_gate:
    from airflow.providers.standard.operators.bash import BashOperator
    from airflow.providers.standard.operators.empty import EmptyOperator

    from pg_safe_backup.operators.backup import PostgresFinishBackupOperator, PostgresStartBackupOperator
    from pg_safe_backup.sensors.backup import PostgresBackupStartedSensor

    _common = {
        "postgres_conn_id": CLUSTERS.get("main", {}).get("conn_id", "none"),
        "backup_key": "by_hand",
        "poll_interval": 1.0,
    }
    _hold = PostgresStartBackupOperator(
        task_id="hold", finish_task_id="finish", fast_checkpoint=True, backup_timeout=600, **_common
    )
    _gate = PostgresBackupStartedSensor(task_id="gate", holder_task_id="hold", **_common)
    _finish = PostgresFinishBackupOperator(task_id="finish", gate_task_id="not_the_gate", **_common)
    _gate >> BashOperator(task_id="copy", bash_command="sleep 1") >> _finish
    EmptyOperator(task_id="not_the_gate") >> _finish
