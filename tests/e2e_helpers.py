"""Helpers shared by the end-to-end test modules (real Airflow + real PostgreSQL)."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from demo.load import Writer, invariant_sql, wait_archived
from demo.stack import FINAL_RUN_STATES, AirflowStack
from pg_safe_backup.local_cluster import LocalCluster, give_to_server_user
from pg_safe_backup.verify import verify_backup

from backup_helpers import archiving_cluster, backup_row, backup_starts_in, holder_sessions

#: Task ids of tests/e2e_faults_dags' ``fault_dag`` (also used by tests/e2e_production_dags).
HOLD, GATE, COPY, FINISH, STORE = (
    "backup.hold_backup_session",
    "backup.wait_for_backup_mode",
    "backup.copy",
    "backup.finish_backup",
    "store_backup_label",
)


def run_dag(env: dict, dag_id: str, run_id: str) -> tuple[str, dict[str, str]]:
    stack: AirflowStack = env["stack"]
    stack.trigger(dag_id, run_id=run_id)
    seen: set[str] = set()
    state = stack.wait_for_run(
        dag_id, run_id, timeout=300, on_progress=lambda s: seen.update(f"{t}={v}" for t, v in s.items())
    )
    assert "backup.hold_backup_session=deferred" in seen, "the holder never waited in the triggerer"
    return state, stack.task_states(dag_id, run_id)


def failure_report(stack: AirflowStack, dag_id: str, run_id: str, tasks: dict[str, str]) -> str:
    """Task states and the error lines of each task's log."""
    lines = [f"{dag_id} {run_id}: {tasks}"]
    for task_id in tasks:
        base = task_id.split("[")[0]  # "task[i]": a mapped task's logs are under its task id
        errors = [
            ln[:600] for ln in stack.task_log(dag_id, run_id, base).splitlines() if " error " in ln.lower()
        ]
        lines += [f"--- {task_id}", *errors[-5:]]
    return "\n".join(lines)


def assert_run_ended(
    stack: AirflowStack, dag_id: str, run_id: str, run_state: str, tasks: dict[str, str], timeout: float = 180
) -> str:
    """Wait for the run to end; assert its state and every task's. Returns the failure report."""
    state = stack.wait_for_run(dag_id, run_id, timeout=timeout)
    seen = stack.task_states(dag_id, run_id)
    report = failure_report(stack, dag_id, run_id, seen)
    assert state == run_state, report
    assert seen == tasks, report
    return report


# ------------------------------------------------------------------------------------------------ set-up


def temp_root(prefix: str, *dirs: str) -> tuple[Path, ...]:
    """A temp root the server's OS user can enter, and ``dirs`` under it, owned by that user.

    :return: (root, *dirs).
    """
    root = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(root, 0o755)
    made = [root / d for d in dirs]
    for d in made:
        d.mkdir()
        give_to_server_user(d)
    return (root, *made)


def archived_cluster(
    prefix: str, password: str, datadir: Path | None = None
) -> tuple[Path, LocalCluster, Path, Path]:
    """A temp root the server's OS user can enter, and a running cluster under it whose WAL is archived
    into ``root/wal_archive``, with ``root/backups`` for the copies.

    :param prefix: the temp root's name prefix.
    :param password: the password of the cluster's ``postgres`` role (scram on 127.0.0.1).
    :param datadir: the cluster's data directory, elsewhere than under the root (a btrfs subvolume).
    :return: (root, cluster, archive, backups).
    """
    root, archive, backups = temp_root(prefix, "wal_archive", "backups")
    return root, archiving_cluster(datadir or root / "pg" / "data", archive, password), archive, backups


def cluster_env(cluster: LocalCluster, password: str, archive: Path, backups: Path) -> dict[str, str]:
    """The environment tests/e2e_dags' DAGs read: the ``pg_e2e`` connection, data directory, backup root,
    WAL archive, and a DSN over the unix socket."""
    return {
        "AIRFLOW_CONN_PG_E2E": cluster.airflow_conn_uri(password=password),
        "E2E_PGDATA": str(cluster.datadir),
        "E2E_BACKUP_ROOT": str(backups),
        "E2E_WAL_ARCHIVE": str(archive),
        "E2E_PG_DSN": f"host={cluster.socket_dir} port={cluster.port} user=postgres dbname=postgres",
    }


def tear_down(stack: AirflowStack | None, cluster: LocalCluster, root: Path) -> None:
    """Stop the stack and the cluster; remove ``root`` unless PGSB_KEEP_E2E is set (to look at the logs)."""
    if stack:
        stack.stop()
    cluster.stop("immediate")
    if os.environ.get("PGSB_KEEP_E2E"):
        print(f"kept {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)


# ------------------------------------------------------------------------------- a backup under write load


def backup_under_write_load(env: dict, dag_id: str, run_id: str, tables: tuple[str, ...]) -> dict:
    """One backup DAG run (tests/e2e_dags' ``backup_dag``) under a continuous write load, its WAL archived.

    Returns the backup's folder, the ids committed before the run ended, the finish's XCom and the DAG's own
    restore check (``verify_backup``)."""
    cluster, stack = env["cluster"], env["stack"]
    writer = Writer(cluster, tables)
    writer.start()
    try:
        state, tasks = run_dag(env, dag_id, run_id)
    finally:
        committed = writer.stop()
    assert state == "success", failure_report(stack, dag_id, run_id, tasks)
    wait_archived(cluster)
    return {
        "dir": env["backups"] / run_id,
        "committed": committed,
        "xcom": stack.xcom(dag_id, run_id, "backup.finish_backup"),
        "verified": stack.xcom(dag_id, run_id, "verify_backup") if "verify_backup" in tasks else None,
    }


def assert_restores_with_every_commit(env: dict, completed: dict, tables: tuple[str, ...]) -> None:
    """The backup's label is the one stored, the DAG's restore check passed, and a recovery replaying the
    whole archive has every row committed before pg_backup_stop returned."""
    backup_dir = completed["dir"]
    assert (backup_dir / "backup_label").read_text() == completed["xcom"]["backup_label"]
    assert holder_sessions(env["cluster"]) == 0
    assert completed["committed"] > 500, "the write load did not run during the backup"
    # The DAG's own restore check (PostgresVerifyBackupOperator, recovery to the consistent point).
    assert completed["verified"]["ok"] and completed["verified"]["summary"].startswith("PASS")
    # ... after its page-LSN check and PostgreSQL's pg_verifybackup (WAL parsed) of the manifest it stored.
    checks = completed["verified"]["checks"]
    assert checks["page-LSN check"]["status"] == "PASS", checks
    assert (
        checks["pg_verifybackup"]["status"] == "PASS" and checks["pg_verifybackup"]["details"]["wal_parsed"]
    )
    assert (backup_dir / "backup_manifest").is_file()
    result = verify_backup(
        backup_dir,
        env["archive"],
        recovery_target_immediate=False,
        invariant_sql=invariant_sql(tables, completed["committed"]),
    )
    assert result.ok, result.summary()


# ------------------------------------------------- runs of fault_dag (env: cluster, stack, backups, runs)


def log_offset(cluster: LocalCluster) -> int:
    return cluster.logfile.stat().st_size


def log_since(cluster: LocalCluster, offset: int) -> str:
    with cluster.logfile.open("rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


def trigger(env: dict, dag_id: str, run_id: str) -> None:
    env["stack"].trigger(dag_id, run_id=run_id)
    env["runs"].append((dag_id, run_id))


def wait_for_tasks(
    stack: AirflowStack,
    dag_id: str,
    run_id: str,
    ready: Callable[[dict[str, str]], bool],
    what: str,
    timeout: float = 120,
) -> dict[str, str]:
    """Poll the run's task states until ``ready(states)``; fails if the run ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        states = stack.task_states(dag_id, run_id)
        if ready(states):
            return states
        run_state = stack.run_state(dag_id, run_id)
        if run_state in FINAL_RUN_STATES or time.monotonic() > deadline:
            pytest.fail(f"never {what}: run {run_state}\n{failure_report(stack, dag_id, run_id, states)}")
        time.sleep(0.5)


def task_log(
    stack: AirflowStack, dag_id: str, run_id: str, task_id: str, *expected: str, timeout: float = 15
) -> str:
    """The task's log, once it holds every ``expected`` text (or the timeout passed): a task's last log
    lines may reach its file a moment after its state was set."""
    deadline = time.monotonic() + timeout
    while True:
        text = stack.task_log(dag_id, run_id, task_id)
        if all(e in text for e in expected) or time.monotonic() > deadline:
            return text
        time.sleep(0.5)


def holder_failed_with(stack: AirflowStack, dag_id: str, run_id: str, message: str) -> str:
    """Assert the holder task failed with ``message``; returns its log.

    The holder's trigger ends the task itself (TaskFailedEvent) after logging "backup not taken: ...". A task
    resumed on a worker instead could be failed by Airflow 3.3.2 when its trigger fires soon after the
    deferral (the executor's late success event of the deferral's exit; apache/airflow#67287): the scheduler
    must never have said so about this task.
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


def assert_failed_cleanly(env: dict, dag_id: str, run_id: str, reason: str) -> dict:
    """The backup table says failed with ``reason``, nothing holds backup mode, no label was stored."""
    cluster = env["cluster"]
    row = backup_row(cluster)
    assert row["state"] == "failed" and row["owner"] == f"{dag_id}/{run_id}/backup", row
    assert reason in (row["error"] or ""), row
    assert row["backup_label"] is None
    assert holder_sessions(cluster) == 0
    assert (
        cluster.sql(
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"
            " AND application_name LIKE 'pg_safe_backup%'"
        )[0][0]
        == 0
    ), "a backup session was left open"
    assert not (env["backups"] / run_id / "backup_label").exists()
    return row


@pytest.fixture(autouse=True)
def no_backup_left_behind(env: dict) -> Iterator[None]:
    """After each case, end what a failed case left running, so that it cannot fail the cases after it.

    Autouse in the modules that import it (their ``env`` has ``cluster``, ``stack`` and ``runs``).

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


def assert_concurrent_runs_refused(env: dict, dag_id: str, other_dag: str) -> None:
    """A run of ``dag_id`` (max_active_runs=2) holds backup mode; a second run of it and a run of
    ``other_dag`` (same cluster) are refused and leave the live backup alone; the first one completes, and
    its copy (the DAG's copy is real) restores with the backup table as it was in backup mode."""
    cluster, stack, backups = env["cluster"], env["stack"], env["backups"]
    first, second, third = "concurrent_first", "concurrent_second", "concurrent_other_dag"
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
    for dag, run in refused:
        report = assert_run_ended(
            stack,
            dag,
            run,
            "failed",
            {
                HOLD: "failed",
                GATE: "failed",
                COPY: "upstream_failed",
                FINISH: "failed",
                STORE: "upstream_failed",
            },
        )
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
    assert backup_starts_in(log_since(cluster, offset)) == 1, "a refused run started a backup"
    # The copy taken under the first run's backup restores, and holds that backup's own row.
    restored = verify_backup(
        backups / first,
        env["archive"],
        invariant_sql=f"SELECT count(*) = 1, format('%s rows of {owner}', count(*)) FROM public.backup"
        f" WHERE owner = '{owner}'",
    )
    assert restored.ok, restored.summary()


def trigger_starts(stack: AirflowStack, dag_id: str, run_id: str) -> int:
    """How many times a triggerer started the holder's trigger (its trigger logs' "starting" lines)."""
    files = [f for f in stack.task_log_files(dag_id, run_id, HOLD) if ".trigger." in f.name]
    return sum(f.read_text().count(") starting") for f in files)


def assert_lost_backup_failed_once(
    env: dict, dag_id: str, run_id: str, first_pid: int, offset: int, starts_before: int
) -> None:
    """The triggerer running the holder's trigger was killed while the copy ran (``first_pid``: the holder's
    backend, ``offset``: the server log's size before the run, ``starts_before``: :func:`trigger_starts`
    before the kill): another triggerer job re-ran the trigger, which found its backup's session gone and
    failed the backup instead of starting a second one.

    A trigger may have been started more than once before the kill: a triggerer whose heartbeat stalled
    (its first Task SDK call builds its execution API) hands its triggers over; the holder makes that call
    before backup mode, so the server log shows one backup start whatever happened before it.
    """
    cluster, stack = env["cluster"], env["stack"]
    report = assert_run_ended(
        stack,
        dag_id,
        run_id,
        "failed",
        {HOLD: "failed", GATE: "success", COPY: "success", FINISH: "failed", STORE: "upstream_failed"},
    )

    # The adopted (re-run) holder trigger found its own backup's session gone and failed it, while the copy
    # still ran; it did not start a second backup (a copy may already have begun under the first one).
    lost = f"the session holding backup mode (pid {first_pid}) ended before the backup finished"
    assert_failed_cleanly(env, dag_id, run_id, lost)
    hold_log = holder_failed_with(stack, dag_id, run_id, f"backup failed: {lost}")
    assert "was not restarted" in hold_log
    # Another triggerer job ran the holder's trigger again; it found its backup already claimed, session gone.
    logs = {
        f.name: f.read_text()[-3000:]
        for f in stack.task_log_files(dag_id, run_id, HOLD)
        if ".trigger." in f.name
    }
    assert trigger_starts(stack, dag_id, run_id) > starts_before, logs
    assert f"backup of {dag_id}/{run_id}/backup was already claimed (lost)" in hold_log
    finish_log = task_log(stack, dag_id, run_id, FINISH, f"backup not usable: backup failed: {lost}")
    assert f"backup not usable: backup failed: {lost}" in finish_log, report
    server_log = log_since(cluster, offset)
    assert backup_starts_in(server_log) == 1, "a second backup was started"
    assert "aborting backup due to backend exiting before pg_backup_stop was called" in server_log


@contextmanager
def backup_stack(
    prefix: str,
    password: str,
    dags: Path,
    dag_ids: list[str],
    extra_env: dict[str, str] | Callable[[Path], dict[str, str]] | None = None,
    datadir: Path | None = None,
    **stack_kwargs: Any,
) -> Iterator[dict]:
    """A cluster (:func:`archived_cluster`) and an Airflow stack parsing ``dags`` with the environment of
    :func:`cluster_env` (and ``extra_env``): ``{"cluster", "stack", "archive", "backups", "root", "runs"}``.
    All is stopped and removed at the end (:func:`tear_down`).

    :param extra_env: more environment, or a function of the temp root that makes it (for files under it).
    :param datadir: the cluster's data directory, elsewhere than under the root (a btrfs subvolume).
    :param stack_kwargs: passed to :class:`AirflowStack` (``executor``, ``triggerers``, ``workers``).
    """
    root, cluster, archive, backups = archived_cluster(prefix, password, datadir)
    stack = None
    try:
        more = extra_env(root) if callable(extra_env) else extra_env or {}
        env = {**cluster_env(cluster, password, archive, backups), **more}
        stack = AirflowStack(root / "airflow", dags, extra_env=env, **stack_kwargs)
        stack.start(expect_dag_ids=dag_ids)
        yield {
            "cluster": cluster,
            "stack": stack,
            "archive": archive,
            "backups": backups,
            "root": root,
            "runs": [],
        }
    finally:
        tear_down(stack, cluster, root)
