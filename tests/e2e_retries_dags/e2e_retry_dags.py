"""The DAG of the end-to-end retry test (tests/test_e2e_retries.py sets the E2E_* environment and the pg_e2e
connection): every task may be retried twice, as many deployments set in default_args, and the backup's
parameters are templates of the run's params.

The copy does what the run's ``mode`` param says: ``copy`` copies the data directory for real (the run is
restore-checked at its end), ``fail`` fails (every try), ``slow`` sleeps while the test ends the backup's
session on the server. This folder holds only this file, so the test's Airflow parses nothing else of tests/
on its own; the real copy is the normal e2e DAGs' (their module also registers its own DAGs, which stay
paused and unused here).
"""

from __future__ import annotations

import sys
import time
from datetime import timedelta
from pathlib import Path

import pendulum

from airflow.sdk import DAG, task

from pg_safe_backup.task_group import PostgresOnlineBackup

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e_dags"))
from e2e_backup_dags import DESTINATION, copy_data_directory, store_and_verify  # noqa: E402

#: Seconds the ``slow`` copy lasts: the test ends the backup's session meanwhile.
SLOW_COPY_S = 20


@task
def copy(mode: str, destination: str) -> None:
    """The copy of the run's ``mode`` (see the module's docstring)."""
    if mode == "fail":
        raise RuntimeError("copy broke (mode=fail)")
    if mode == "slow":
        time.sleep(SLOW_COPY_S)
        return
    copy_data_directory.function(destination)


with DAG(
    "e2e_retries",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    params={"mode": "copy", "fast": "true", "timeout": "600", "conn": "pg_e2e"},
    default_args={"retries": 2, "retry_delay": timedelta(seconds=2)},
) as e2e_retries:
    with PostgresOnlineBackup(
        group_id="backup",
        postgres_conn_id="{{ params.conn }}",
        fast_checkpoint="{{ params.fast }}",
        backup_timeout="{{ params.timeout }}",
        label="retries {{ run_id }}",
        poll_interval=1.0,
    ) as backup:
        copy("{{ params.mode }}", DESTINATION)
    store_and_verify(backup)
