"""End to end, with retries on: a DAG whose default_args let every task retry twice never retries a dead
backup into a confusing state. A real Airflow (tests/e2e_retries_dags/) and a real cluster, one of each for
the module; the backup's parameters are templates of the run's params.

A backup that died (its copy failed every try, or its session was ended on the server mid-copy) ends once:
the hold is never retried, the finish fails on its first try with AirflowFailException, the ``backup`` table
says why, nothing holds backup mode, no label reaches XCom or the destination, and the next run restores.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from demo.stack import AirflowStack, ApiError

from backup_helpers import backup_starts_in
from e2e_helpers import (
    COPY,
    FINISH,
    GATE,
    HOLD,
    STORE,
    assert_failed_cleanly,
    backup_row,
    backup_stack,
    failure_report,
    holder_sessions,
    log_offset,
    log_since,
    task_log,
    wait_for_tasks,
)

pytestmark = pytest.mark.e2e

DAGS = Path(__file__).parent / "e2e_retries_dags"  # holds only e2e_retry_dags.py
DAG_ID = "e2e_retries"
PASSWORD = "pgsbRetry-Kx83Vw"
VERIFY = "verify_backup"


@pytest.fixture(scope="module")
def env() -> Iterator[dict]:
    with backup_stack(
        "pgsb-e2e-retries-", PASSWORD, DAGS, [DAG_ID], extra_env={"E2E_CHECKPOINT_DELAY": "1"}
    ) as env:
        yield env


def try_numbers(stack: AirflowStack, run_id: str) -> dict[str, int]:
    """task_id -> the try it ended on."""
    tis = stack._get_all(f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances", "task_instances")
    return {ti["task_id"]: ti["try_number"] for ti in tis}


def assert_ended_once(
    env: dict, run_id: str, offset: int, copy_state: str, copy_tries: int, reason: str
) -> str:
    """The dead backup's run ends: failed, one backup started (server log from ``offset``), the hold and
    the finish on their first try, the finish failed for good (no retry) saying ``reason``, the backup
    failed cleanly, and no label anywhere. Returns the server log of the run."""
    stack = env["stack"]
    state = stack.wait_for_run(DAG_ID, run_id, timeout=240)
    tasks = stack.task_states(DAG_ID, run_id)
    report = failure_report(stack, DAG_ID, run_id, tasks)
    assert state == "failed", report
    assert tasks == {
        HOLD: "failed",
        GATE: "success",
        COPY: copy_state,
        FINISH: "failed",
        STORE: "upstream_failed",
        VERIFY: "upstream_failed",
    }, report
    tries = try_numbers(stack, run_id)
    assert tries[COPY] == copy_tries, tries  # retries are on: a copy that fails is retried
    assert tries[HOLD] == 1, tries
    assert tries[GATE] == 1, tries
    assert tries[FINISH] == 1, tries
    assert [f.name for f in stack.task_log_files(DAG_ID, run_id, FINISH)] == ["attempt=1.log"]
    finish_log = task_log(stack, DAG_ID, run_id, FINISH, "AirflowFailException")
    assert f"backup not usable: backup failed: {reason}" in finish_log, report
    assert "AirflowFailException" in finish_log, finish_log
    assert_failed_cleanly(env, DAG_ID, run_id, reason)
    with pytest.raises(ApiError) as no_label:
        stack.xcom(DAG_ID, run_id, FINISH, key="backup_label")
    assert no_label.value.status == 404
    server_log = log_since(env["cluster"], offset)
    assert backup_starts_in(server_log) == 1, "a second backup was started"
    return server_log


def test_a_copy_failing_every_retry_fails_the_backup_once(env):
    cluster, stack = env["cluster"], env["stack"]
    run_id = "retries_copy_fails"
    offset = log_offset(cluster)
    stack.trigger(DAG_ID, conf={"mode": "fail"}, run_id=run_id)
    server_log = assert_ended_once(
        env, run_id, offset, "failed", 3, f"the copy did not succeed: {COPY} is failed"
    )
    assert "pg_backup_stop(" in server_log


def test_the_backup_session_ended_mid_copy_fails_the_backup_once(env):
    cluster, stack = env["cluster"], env["stack"]
    run_id = "retries_session_ended"
    offset = log_offset(cluster)
    stack.trigger(DAG_ID, conf={"mode": "slow"}, run_id=run_id)
    wait_for_tasks(
        stack,
        DAG_ID,
        run_id,
        lambda s: s.get(HOLD) == "deferred" and s.get(GATE) == "success" and s.get(COPY) == "running",
        "copying in backup mode",
    )
    pid = backup_row(cluster)["pid"]
    assert holder_sessions(cluster) == 1
    assert cluster.sql("SELECT pg_terminate_backend(%s)", [pid]) == [(True,)]
    server_log = assert_ended_once(
        env, run_id, offset, "success", 1, "the session holding backup mode was lost"
    )
    assert "aborting backup due to backend exiting before pg_backup_stop was called" in server_log


def test_the_next_run_backs_up_and_restores(env):
    cluster, stack = env["cluster"], env["stack"]
    run_id = "retries_next"
    offset = log_offset(cluster)
    stack.trigger(DAG_ID, run_id=run_id)
    state = stack.wait_for_run(DAG_ID, run_id, timeout=300)
    assert state == "success", failure_report(stack, DAG_ID, run_id, stack.task_states(DAG_ID, run_id))
    row = backup_row(cluster)
    assert row["state"] == "complete", row
    assert row["owner"] == f"{DAG_ID}/{run_id}/backup", row
    assert f"LABEL: retries {run_id}\n" in row["backup_label"]  # the label, rendered from its template
    assert (env["backups"] / run_id / "backup_label").read_text() == row["backup_label"]
    assert stack.xcom(DAG_ID, run_id, FINISH, key="backup_label") == row["backup_label"]
    verified = stack.xcom(DAG_ID, run_id, VERIFY)
    assert verified["ok"], verified
    assert verified["summary"].startswith("PASS"), verified
    assert holder_sessions(cluster) == 0
    assert backup_starts_in(log_since(cluster, offset)) == 1
