"""DAGs of the end-to-end fault tests (tests/test_e2e_faults.py sets the E2E_* environment and pg_e2e
connection).

This folder holds only this file, so the fault suite's Airflow parses nothing else of tests/ on its own.
The normal backup DAG is reused from tests/e2e_dags/e2e_backup_dags.py (``backup_dag``). Importing that
module also auto-registers its two module-level DAGs (e2e_backup, e2e_copy_fails) under this file; they
stay paused and unused here.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pendulum

from airflow.providers.standard.operators.bash import BashOperator
from airflow.sdk import DAG

from pg_safe_backup.operators.backup import PostgresStoreBackupLabelOperator
from pg_safe_backup.task_group import PostgresOnlineBackup

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e_dags"))
from e2e_backup_dags import COPY_COMMAND, DESTINATION, backup_dag  # noqa: E402

CONN_ID = "pg_e2e"


def fault_dag(
    dag_id: str,
    copy_command: str,
    destination: str = DESTINATION,
    max_active_runs: int = 1,
    copy_queue: str | None = None,
) -> DAG:
    """The provider's task group around one BashOperator copy stand-in, then the store task.

    :param copy_queue: the copy's queue (the worker that sees the data directory); the default queue if None.
    """
    pinned = {"queue": copy_queue} if copy_queue else {}
    with DAG(
        dag_id,
        schedule=None,
        start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
        catchup=False,
        max_active_runs=max_active_runs,
    ) as dag:
        with PostgresOnlineBackup(
            group_id="backup",
            postgres_conn_id=CONN_ID,
            fast_checkpoint=True,
            backup_timeout=600,
            poll_interval=1.0,
        ) as backup:
            BashOperator(task_id="copy", bash_command=copy_command, **pinned)
        PostgresStoreBackupLabelOperator(task_id="store_backup_label", backup=backup, destination=destination)
    return dag


# 1. the triggerer holding the backup session is killed while the copy runs
e2e_fault_triggerer = fault_dag("e2e_fault_triggerer", "sleep 25")
# 2. the copy is marked failed by hand (REST API) while it runs; had it run to its end, it would leave a
#    file saying so: the test proves from its absence that the run ended without waiting for the copy
e2e_fault_mark_failed = fault_dag(
    "e2e_fault_mark_failed",
    "sleep 120 && touch " + os.environ.get("E2E_COPY_ENDED", "/nonexistent/copy_ended"),
)
# 3. two runs of one DAG at once, and a run of another DAG, against the same cluster
#    The first run's copy is real: its backup completes, and the test restores it.
e2e_fault_concurrent = fault_dag("e2e_fault_concurrent", "sleep 20 && " + COPY_COMMAND, max_active_runs=2)
e2e_fault_other = fault_dag("e2e_fault_other", "sleep 1")
# 4. the store task cannot write into its destination (a path under a regular file). The copy lasts 8 s so the
#    holder's trigger cannot fire before the scheduler took in its deferral (see tests/test_e2e_faults.py).
e2e_fault_unwritable = fault_dag(
    "e2e_fault_unwritable",
    "sleep 8",
    destination=os.environ.get("E2E_UNWRITABLE_DESTINATION", "/nonexistent/sub"),
)
# 6. the next normal backup (real copy, label stored, restore check in the DAG)
e2e_fault_final = backup_dag("e2e_fault_final", failing_copy=False)
