"""DAGs of tests/test_e2e_production.py: the production shape, with every copy pinned to the queue of the
worker that sees the data directory (E2E_COPY_QUEUE, named for the database host).

This folder holds only this file. The DAG factories come from tests/e2e_dags and tests/e2e_faults_dags;
importing them also auto-registers their module-level DAGs under this file, which stay paused and unused.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from airflow.sdk import DAG  # noqa: F401 - marks this file as one the dag-processor parses

TESTS = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(TESTS / "e2e_dags"), str(TESTS / "e2e_faults_dags")]
from e2e_backup_dags import COPY_COMMAND, backup_dag  # noqa: E402
from e2e_fault_dags import fault_dag  # noqa: E402

QUEUE = os.environ.get("E2E_COPY_QUEUE", "pg-localhost")
#: Tells which worker ran the copy stand-in (demo/stack.py sets PGSB_AIRFLOW_COMPONENT in each component).
WHERE = 'echo "copy ran on $PGSB_AIRFLOW_COMPONENT"; '

# 1. a real copy under write load (the restore check in the DAG); also the run after the failover
e2e_prod_backup = backup_dag("e2e_prod_backup", failing_copy=False, copy_queue=QUEUE)
# 2. the triggerer holding the backup session is killed while the copy runs
e2e_prod_failover = fault_dag("e2e_prod_failover", WHERE + "sleep 25", copy_queue=QUEUE)
# 3. two runs of one DAG at once, and a run of another DAG, against the same cluster
e2e_prod_concurrent = fault_dag(
    "e2e_prod_concurrent", WHERE + "sleep 20 && " + COPY_COMMAND, max_active_runs=2, copy_queue=QUEUE
)
e2e_prod_other = fault_dag("e2e_prod_other", WHERE + "sleep 1", copy_queue=QUEUE)
