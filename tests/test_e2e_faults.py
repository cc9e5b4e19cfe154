"""End to end, under faults: a real Airflow (api-server, scheduler, dag-processor, triggerer; LocalExecutor)
and a
real cluster, one of each for the whole module. Each fault must end with a clear error naming its cause, the
``backup`` table saying why, no session left in backup mode, no backup_label stored, and the next backup able
to run (the module's last backup is a normal one, restore-checked in its DAG)."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from demo.stack import FINAL_RUN_STATES, AirflowStack
from pg_safe_backup.local_cluster import LocalCluster, give_to_server_user

# Shared helpers of the end-to-end suite. pytest's default "prepend" import mode puts tests/ (no __init__.py)
# on sys.path, which is also how tests/test_e2e.py itself is imported (as the module ``test_e2e``).
from e2e_helpers import (
    assert_failed_cleanly,
    backup_row,
    failure_report,
    holder_sessions,
    log_offset,
    log_since,
    run_dag,
    task_log,
    wait_for_tasks,
)

pytestmark = pytest.mark.e2e

DAGS = Path(__file__).parent / "e2e_faults_dags"  # holds only e2e_fault_dags.py
PASSWORD = "pgsbFault-Zq7Xk29Lw"  # distinctive: searched for in every file and XCom at the end
HOLD, GATE, COPY, FINISH, STORE = (
    "backup.hold_backup_session",
    "backup.wait_for_backup_mode",
    "backup.copy",
    "backup.finish_backup",
    "store_backup_label",
)
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
    root = Path(tempfile.mkdtemp(prefix="pgsb-e2e-faults-"))
    os.chmod(root, 0o755)
    archive, backups = root / "wal_archive", root / "backups"
    for d in (archive, backups):
        d.mkdir()
        give_to_server_user(d)
    afile = root / "afile"
    afile.write_text("a regular file: nothing can be created under it\n")
    # log_statement=all: every pg_backup_start is in the server log, so the tests can count them.
    cluster = (
        LocalCluster(root / "pg" / "data")
        .init(
            password=PASSWORD,
            settings={
                "archive_mode": "on",
                "archive_command": f"'cp %p {archive}/%f'",
                "log_statement": "'all'",
            },
        )
        .start()
    )
    stack = None
    try:
        stack = AirflowStack(
            root / "airflow",
            DAGS,
            extra_env={
                "AIRFLOW_CONN_PG_E2E": cluster.airflow_conn_uri(password=PASSWORD),
                "E2E_PGDATA": str(cluster.datadir),
                "E2E_BACKUP_ROOT": str(backups),
                "E2E_WAL_ARCHIVE": str(archive),
                "E2E_PG_DSN": f"host={cluster.socket_dir} port={cluster.port} user=postgres dbname=postgres",
                "E2E_UNWRITABLE_DESTINATION": str(afile / "sub"),
                # Gates and finishes wait in worker slots (not deferrable by default): the concurrency case
                # has
                # five tasks waiting or running at once.
                "AIRFLOW__CORE__PARALLELISM": "8",
                # A restarted triggerer adopts the triggers of a dead one once that one's heartbeat is older
                # than
                # the threshold (default 30 s); shortened so the re-run holder runs while the copy still does.
                "AIRFLOW__TRIGGERER__JOB_HEARTBEAT_SEC": "1",
                "AIRFLOW__TRIGGERER__TRIGGERER_HEALTH_CHECK_THRESHOLD": "6",
            },
        )
        stack.start(expect_dag_ids=DAG_IDS)
        yield {
            "cluster": cluster,
            "stack": stack,
            "archive": archive,
            "backups": backups,
            "root": root,
            "afile": afile,
            "runs": [],
        }
    finally:
        if stack:
            stack.stop()
        cluster.stop("immediate")
        if os.environ.get("PGSB_KEEP_E2E"):  # keep the stack's files and logs to look at
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(autouse=True)
def no_backup_left_behind(env: dict) -> Iterator[None]:
    """After each case, end what a failed case left running, so that it cannot fail the cases after it.

    A run still going is marked failed through the REST API (its holder's trigger is cancelled, marks the
    backup failed and closes its session); a holder session that survives that is terminated. A case that
    passed has nothing left to end: each one asserts that no holder session remains.
    """
    yield
    stack, cluster = env["stack"], env["cluster"]
    for dag_id, run_id in env["runs"]:
        try:
            if stack.run_state(dag_id, run_id) not in FINAL_RUN_STATES:
                stack._api("PATCH", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}", {"state": "failed"})
        except Exception as exc:  # the api-server may be what failed; the sessions are ended below anyway
            print(f"could not end {dag_id} {run_id}: {exc}")
    deadline = time.monotonic() + 30
    while holder_sessions(cluster) and time.monotonic() < deadline:
        time.sleep(0.5)
    cluster.sql(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name LIKE 'pg_safe_backup%'"
    )


# ------------------------------------------------------------------------------------------------- helpers


def trigger(env: dict, dag_id: str, run_id: str) -> None:
    env["stack"].trigger(dag_id, run_id=run_id)
    env["runs"].append((dag_id, run_id))


def holder_failed_with(stack: AirflowStack, dag_id: str, run_id: str, message: str) -> str:
    """Assert the holder task failed with ``message``; returns its log.

    The holder's trigger ends the task itself (TaskFailedEvent) after logging "backup not taken: ...". A task
    resumed on a worker instead could be failed by Airflow 3.3.2 when its trigger fires soon after the
    deferral
    (the executor's late success event of the deferral's exit; apache/airflow#67287): the scheduler must never
    have said so about this task.
    """
    assert stack.task_states(dag_id, run_id)[HOLD] == "failed"
    stale = re.compile(
        rf"reported that the task instance <TaskInstance: {re.escape(dag_id)}\.{re.escape(HOLD)}"
        rf" {re.escape(run_id)} \[\w+\][^>]*> finished with state success, but the task instance's"
        " state attribute is"
    )
    log = task_log(stack, dag_id, run_id, HOLD, f"backup not taken: {message}")
    assert f"backup not taken: {message}" in log, log
    assert not stale.search((stack.logs_dir / "scheduler.log").read_text(errors="replace"))
    return log


def backup_running(states: dict[str, str]) -> bool:
    """Backup mode on and the copy under way: holder deferred in the triggerer, gate open."""
    return states.get(HOLD) == "deferred" and states.get(GATE) == "success"


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

    stack.kill_component("triggerer")  # SIGKILL: the holder's session dies, PostgreSQL aborts the backup
    time.sleep(2)
    stack.restart_component("triggerer")
    state = stack.wait_for_run(dag_id, run_id, timeout=180)
    tasks = stack.task_states(dag_id, run_id)
    report = failure_report(stack, dag_id, run_id, tasks)
    assert state == "failed", report
    assert tasks == {
        HOLD: "failed",
        GATE: "success",
        COPY: "success",
        FINISH: "failed",
        STORE: "upstream_failed",
    }, report

    # The adopted (re-run) holder trigger found its own backup's session gone and failed it, while the copy
    # still ran; it did not start a second backup (a copy may already have begun under the first one).
    lost = f"the session holding backup mode (pid {first_pid}) ended before the backup finished"
    assert_failed_cleanly(env, dag_id, run_id, lost)
    hold_log = holder_failed_with(stack, dag_id, run_id, f"backup failed: {lost}")
    assert "was not restarted" in hold_log
    # Two triggerer jobs ran the holder's trigger; the second one found its backup already claimed, session
    # gone.
    assert len([f for f in stack.task_log_files(dag_id, run_id, HOLD) if ".trigger." in f.name]) == 2
    assert f"backup of {dag_id}/{run_id}/backup was already claimed (lost)" in hold_log
    finish_log = task_log(stack, dag_id, run_id, FINISH, f"backup not usable: backup failed: {lost}")
    assert f"backup not usable: backup failed: {lost}" in finish_log, report
    server_log = log_since(cluster, offset)
    assert server_log.count("pg_backup_start(") == 1, "a second backup was started"
    assert "aborting backup due to backend exiting before pg_backup_stop was called" in server_log


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
    assert time.monotonic() - marked < 28, (
        "the teardown waited for the (30 s) copy instead of its failed state"
    )

    reason = f"the copy did not succeed: {COPY} is failed"
    assert_failed_cleanly(env, dag_id, run_id, reason)
    finish_log = task_log(stack, dag_id, run_id, FINISH, f"backup not usable: backup failed: {reason}")
    assert (
        f"{reason}; failing the backup" in finish_log
        and f"backup not usable: backup failed: {reason}" in finish_log
    )
    holder_failed_with(stack, dag_id, run_id, f"backup marked failed: {reason}; backup mode ended")
    server_log = log_since(cluster, offset)
    assert server_log.count("pg_backup_start(") == 1 and "pg_backup_stop(" in server_log


def test_concurrent_runs_are_refused_and_leave_the_live_backup_alone(env):
    cluster, stack, backups = env["cluster"], env["stack"], env["backups"]
    dag_id, first, second = "e2e_fault_concurrent", "concurrent_first", "concurrent_second"
    other_dag, third = "e2e_fault_other", "concurrent_other_dag"
    owner = f"{dag_id}/{first}/backup"
    offset = log_offset(cluster)
    trigger(env, dag_id, first)
    wait_for_tasks(stack, dag_id, first, backup_running, "in backup mode")
    live = backup_row(cluster)
    assert live["state"] == "running" and live["owner"] == owner, live

    trigger(env, dag_id, second)  # same DAG, max_active_runs=2
    trigger(env, other_dag, third)  # another DAG, same cluster
    # Until both end, the row stays the first run's backup, untouched (sampled all along).
    refused = {(dag_id, second): "", (other_dag, third): ""}
    deadline = time.monotonic() + 120
    while not all(refused.values()):
        for dag, run in refused:
            state = refused[dag, run] or stack.run_state(dag, run)
            refused[dag, run] = state if state in FINAL_RUN_STATES else ""
        row = backup_row(cluster)
        if not (
            row["owner"] == owner
            and row["pid"] == live["pid"]
            and row["error"] is None
            and row["state"] in ("running", "done", "complete")
        ):
            raise AssertionError(
                f"the live backup was touched: {row}\n"
                + failure_report(stack, dag_id, first, stack.task_states(dag_id, first))
            )
        assert time.monotonic() < deadline, f"the refused runs did not end: {refused}"
        time.sleep(0.5)
    for (dag, run), state in refused.items():
        tasks = stack.task_states(dag, run)
        report = failure_report(stack, dag, run, tasks)
        assert state == "failed", report
        assert tasks == {
            HOLD: "failed",
            GATE: "failed",
            COPY: "upstream_failed",
            FINISH: "failed",
            STORE: "upstream_failed",
        }, report
        holder_failed_with(
            stack,
            dag,
            run,
            f"refused to start: a backup owned by {owner} (label"
            f" 'airflow {dag_id} {first}', holder pid {live['pid']}) is running on this cluster;"
            " it was left untouched.",
        )
        gate_log = task_log(stack, dag, run, GATE, "without starting")
        assert (
            f"the backup holder task {HOLD} ended (failed) without starting this run's backup" in gate_log
        ), report
        finish_log = task_log(stack, dag, run, FINISH, "did not open")
        assert (
            f"backup not usable: the gate {GATE} did not open (failed), so no copy ran under a backup of "
            "this run" in finish_log
        ), report
        assert not (backups / run / "backup_label").exists()

    state = stack.wait_for_run(dag_id, first, timeout=120)
    tasks = stack.task_states(dag_id, first)
    assert state == "success", failure_report(stack, dag_id, first, tasks)
    row = backup_row(cluster)
    assert row["state"] == "complete" and row["owner"] == owner and row["error"] is None, row
    assert (backups / first / "backup_label").read_text() == row["backup_label"]
    assert stack.xcom(dag_id, first, FINISH)["owner"] == owner
    assert holder_sessions(cluster) == 0
    assert log_since(cluster, offset).count("pg_backup_start(") == 1, "a refused run started a backup"


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
    assert log_since(cluster, offset).count("pg_backup_start(") == 1


def test_cluster_password_leaks_nowhere(env):
    cluster, stack = env["cluster"], env["stack"]
    assert PASSWORD in stack.env["AIRFLOW_CONN_PG_E2E"]  # every task had it
    secret = PASSWORD.encode()
    scanned, leaks = [], []
    for path in sorted(p for p in stack.home.rglob("*") if p.is_file()):
        if path.name == "passwords.json" or path.name.startswith("airflow.db"):  # the stack's own / SQLite DB
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
