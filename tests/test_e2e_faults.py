"""End to end, under faults: a real Airflow (demo/stack.py: PostgreSQL metadata DB, CeleryExecutor) and a
real cluster, one of each for the whole module. Each fault must end with a clear error naming its cause, the
``backup`` table saying why, no session left in backup mode, no backup_label stored, and the next backup able
to run (the module's last backup is a normal one, restore-checked in its DAG)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

# Shared helpers of the end-to-end suite. pytest's default "prepend" import mode puts tests/ (no __init__.py)
# on sys.path, which is also how tests/test_e2e.py itself is imported (as the module ``test_e2e``).
from backup_helpers import backup_starts_in
from e2e_helpers import (
    COPY,
    FINISH,
    GATE,
    HOLD,
    STORE,
    assert_concurrent_runs_refused,
    assert_failed_cleanly,
    assert_lost_backup_failed_once,
    backup_row,
    backup_running,
    backup_stack,
    failure_report,
    holder_failed_with,
    holder_sessions,
    log_offset,
    log_since,
    no_backup_left_behind,  # noqa: F401 - an autouse fixture
    run_dag,
    task_log,
    trigger,
    trigger_starts,
    wait_for_tasks,
)

pytestmark = pytest.mark.e2e

DAGS = Path(__file__).parent / "e2e_faults_dags"  # holds only e2e_fault_dags.py
PASSWORD = "pgsbFault-Zq7Xk29Lw"  # distinctive: searched for in every file and XCom at the end
DAG_IDS = [
    "e2e_fault_triggerer",
    "e2e_fault_mark_failed",
    "e2e_fault_concurrent",
    "e2e_fault_other",
    "e2e_fault_unwritable",
    "e2e_fault_final",
]


@pytest.fixture(scope="module")
def env() -> Iterator[dict]:
    def faults_env(root: Path) -> dict[str, str]:
        afile = root / "afile"
        afile.write_text("a regular file: nothing can be created under it\n")
        return {
            "E2E_UNWRITABLE_DESTINATION": str(afile / "sub"),
            # written by the mark-failed case's copy (a 120 s sleep) only if it ran to its end
            "E2E_COPY_ENDED": str(root / "copy_ended"),
            # Gates and finishes wait in worker slots (not deferrable by default): the concurrency case
            # has five tasks waiting or running at once.
            "AIRFLOW__CORE__PARALLELISM": "8",
            # A restarted triggerer adopts the triggers of a dead one once that one's heartbeat is older
            # than the threshold (default 30 s); shortened so the re-run holder runs while the copy still
            # does.
            "AIRFLOW__TRIGGERER__JOB_HEARTBEAT_SEC": "1",
            "AIRFLOW__TRIGGERER__TRIGGERER_HEALTH_CHECK_THRESHOLD": "6",
        }

    with backup_stack(
        "pgsb-e2e-faults-",
        PASSWORD,
        DAGS,
        DAG_IDS,
        extra_env=faults_env,
    ) as env:
        env["afile"] = env["root"] / "afile"
        yield env


# --------------------------------------------------------------------------------------------------- cases


def test_triggerer_killed_mid_backup_never_restarts_the_backup(env):
    cluster, stack = env["cluster"], env["stack"]
    dag_id, run_id = "e2e_fault_triggerer", "fault_triggerer"
    offset = log_offset(cluster)
    trigger(env, dag_id, run_id)
    states = wait_for_tasks(stack, dag_id, run_id, backup_running, "in backup mode")
    assert states.get(COPY) not in ("success", "failed"), states  # the 25 s copy is still to come / running
    first_pid = backup_row(cluster)["pid"]
    assert holder_sessions(cluster) == 1
    starts = trigger_starts(stack, dag_id, run_id)

    stack.kill_component("triggerer")  # SIGKILL: the holder's session dies, PostgreSQL aborts the backup
    time.sleep(2)
    stack.restart_component("triggerer")
    assert_lost_backup_failed_once(env, dag_id, run_id, first_pid, offset, starts)


def test_copy_marked_failed_by_hand_fails_and_ends_the_backup(env):
    cluster, stack = env["cluster"], env["stack"]
    dag_id, run_id = "e2e_fault_mark_failed", "fault_mark_failed"
    offset = log_offset(cluster)
    trigger(env, dag_id, run_id)
    wait_for_tasks(stack, dag_id, run_id, lambda s: backup_running(s) and s.get(COPY) == "running", "copying")
    assert holder_sessions(cluster) == 1
    resp = stack._api(
        "PATCH", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{COPY}", {"new_state": "failed"}
    )
    assert [ti["state"] for ti in resp["task_instances"]] == ["failed"], resp
    marked = time.monotonic()
    state = stack.wait_for_run(dag_id, run_id, timeout=120)
    # Read at once: the copy's command (sleep 120, then this file) had not ended when the run did.
    copy_ended = (env["root"] / "copy_ended").exists()
    took = time.monotonic() - marked
    tasks = stack.task_states(dag_id, run_id)
    report = failure_report(stack, dag_id, run_id, tasks)
    assert state == "failed", report
    assert tasks == {
        HOLD: "failed",
        GATE: "success",
        COPY: "failed",
        FINISH: "failed",
        STORE: "upstream_failed",
    }, report
    # The order (the file), and a bound with a minute of headroom under a slow scheduler: the teardown
    # acted on the failed state, it did not wait for the (120 s) copy.
    assert not copy_ended, "the teardown waited for the (120 s) copy instead of its failed state"
    assert took < 90, f"the run took {took:.0f} s to end after its copy was marked failed"

    reason = f"the copy did not succeed: {COPY} is failed"
    assert_failed_cleanly(env, dag_id, run_id, reason)
    finish_log = task_log(stack, dag_id, run_id, FINISH, f"backup not usable: backup failed: {reason}")
    assert (
        f"{reason}; failing the backup" in finish_log
        and f"backup not usable: backup failed: {reason}" in finish_log
    )
    holder_failed_with(stack, dag_id, run_id, f"backup marked failed: {reason}; backup mode ended")
    server_log = log_since(cluster, offset)
    assert backup_starts_in(server_log) == 1 and "pg_backup_stop(" in server_log


def test_concurrent_runs_are_refused_and_leave_the_live_backup_alone(env):
    assert_concurrent_runs_refused(env, "e2e_fault_concurrent", "e2e_fault_other")


def test_unwritable_destination_fails_the_store_task(env):
    cluster, stack = env["cluster"], env["stack"]
    dag_id, run_id = "e2e_fault_unwritable", "fault_unwritable"
    destination = str(env["afile"] / "sub")
    env["runs"].append((dag_id, run_id))
    state, tasks = run_dag(env, dag_id, run_id)
    report = failure_report(stack, dag_id, run_id, tasks)
    assert state == "failed", report
    assert tasks == {HOLD: "success", GATE: "success", COPY: "success", FINISH: "success", STORE: "failed"}, (
        report
    )
    store_log = task_log(stack, dag_id, run_id, STORE, "cannot write")
    assert f"cannot write the backup label into destination {destination!r}" in store_log, report
    # Unlike the other cases the table says complete: the backup itself was fine (pg_backup_stop returned, the
    # label is in the table and the finish's XCom); only storing it failed, and the task says where.
    row = backup_row(cluster)
    assert (
        row["state"] == "complete" and row["owner"] == f"{dag_id}/{run_id}/backup" and row["error"] is None
    ), row
    assert row["backup_label"] == stack.xcom(dag_id, run_id, FINISH, key="backup_label")
    assert holder_sessions(cluster) == 0
    assert env["afile"].is_file() and not (env["backups"] / run_id).exists()


def test_next_backup_runs_and_restores(env):
    cluster, stack = env["cluster"], env["stack"]
    dag_id, run_id = "e2e_fault_final", "final_after_faults"
    offset = log_offset(cluster)
    env["runs"].append((dag_id, run_id))
    state, tasks = run_dag(env, dag_id, run_id)
    assert state == "success", failure_report(stack, dag_id, run_id, tasks)
    row = backup_row(cluster)
    assert (
        row["state"] == "complete" and row["owner"] == f"{dag_id}/{run_id}/backup" and row["error"] is None
    ), row
    assert (env["backups"] / run_id / "backup_label").read_text() == row["backup_label"]
    assert stack.xcom(dag_id, run_id, FINISH, key="backup_label") == row["backup_label"]
    verified = stack.xcom(dag_id, run_id, "verify_backup")
    assert verified["ok"] and verified["summary"].startswith("PASS"), verified
    assert holder_sessions(cluster) == 0
    assert backup_starts_in(log_since(cluster, offset)) == 1


def test_cluster_password_leaks_nowhere(env):
    cluster, stack = env["cluster"], env["stack"]
    assert PASSWORD in stack.env["AIRFLOW_CONN_PG_E2E"]  # every task had it
    secret = PASSWORD.encode()
    scanned, leaks = [], []
    for path in sorted(p for p in stack.home.rglob("*") if p.is_file()):
        if path.name == "passwords.json":  # the stack's own (its metadata DB lives outside home)
            continue
        scanned.append(path)
        if secret in path.read_bytes():
            leaks.append(str(path.relative_to(stack.home)))
    assert not leaks, f"the cluster password is in {leaks}"
    scanned_text = "\n".join(str(p) for p in scanned)
    for dag_id, run_id in env["runs"]:  # the scan covered every run's task logs
        assert f"dag_id={dag_id}/run_id={run_id}/task_id={HOLD}" in scanned_text, (dag_id, run_id)

    rows = cluster.sql("SELECT row_to_json(b)::text FROM backup b")
    assert rows and all(PASSWORD not in r[0] for r in rows)

    entries = [
        e
        for e in stack._get_all("/api/v2/dags/~/dagRuns/~/taskInstances/~/xcomEntries", "xcom_entries")
        if e["task_id"] == FINISH
    ]
    # the finishes of the three complete backups (concurrent_first, fault_unwritable, final_after_faults)
    assert {e["run_id"] for e in entries} == {"concurrent_first", "fault_unwritable", "final_after_faults"}, (
        entries
    )
    for e in entries:
        value = stack.xcom(e["dag_id"], e["run_id"], FINISH, key=e["key"], map_index=e["map_index"])
        assert PASSWORD not in json.dumps(value), (e["run_id"], e["key"])
