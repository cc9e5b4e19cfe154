"""Helpers shared by the end-to-end test modules (real Airflow + real PostgreSQL)."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from demo.stack import FINAL_RUN_STATES, AirflowStack
from pg_safe_backup.local_cluster import LocalCluster, give_to_server_user


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


def holder_sessions(cluster: LocalCluster) -> int:
    return cluster.sql(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pg_safe_backup holder'"
    )[0][0]


def log_offset(cluster: LocalCluster) -> int:
    return cluster.logfile.stat().st_size


def log_since(cluster: LocalCluster, offset: int) -> str:
    with cluster.logfile.open("rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


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


def backup_row(cluster: LocalCluster) -> dict:
    cols = ("state", "error", "owner", "backup_label", "pid")
    rows = cluster.sql("SELECT state::text, error, owner, backup_label, pid FROM backup")
    assert len(rows) == 1, rows
    return dict(zip(cols, rows[0], strict=True))


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


def archiving_cluster(datadir: Path, archive: Path, password: str) -> LocalCluster:
    """A started cluster that archives its WAL into ``archive`` and logs every statement (log_statement=all:
    the tests count the pg_backup_start calls in its log)."""
    return (
        LocalCluster(datadir)
        .init(
            password=password,
            settings={
                "archive_mode": "on",
                "archive_command": f"'cp %p {archive}/%f'",
                "log_statement": "'all'",
            },
        )
        .start()
    )


def backup_dag_env(cluster: LocalCluster, password: str, backups: Path, archive: Path) -> dict[str, str]:
    """What the e2e backup DAGs read: the ``pg_e2e`` connection to ``cluster``, its data directory, where
    copies go, the WAL archive and a DSN for the copy's own statements."""
    return {
        "AIRFLOW_CONN_PG_E2E": cluster.airflow_conn_uri(password=password),
        "E2E_PGDATA": str(cluster.datadir),
        "E2E_BACKUP_ROOT": str(backups),
        "E2E_WAL_ARCHIVE": str(archive),
        "E2E_PG_DSN": f"host={cluster.socket_dir} port={cluster.port} user=postgres dbname=postgres",
    }


@contextmanager
def backup_stack(
    prefix: str, password: str, dags: Path, dag_ids: list[str], extra_env: dict[str, str] | None = None
) -> Iterator[dict]:
    """A cluster (:func:`archiving_cluster`) and an Airflow stack parsing ``dags`` with the environment of
    :func:`backup_dag_env` (and ``extra_env``), in a fresh folder: ``{"cluster", "stack", "archive",
    "backups", "root"}``. All is stopped and removed at the end (kept with PGSB_KEEP_E2E set)."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(root, 0o755)
    archive, backups = root / "wal_archive", root / "backups"
    for d in (archive, backups):
        d.mkdir()
        give_to_server_user(d)
    cluster = archiving_cluster(root / "pg" / "data", archive, password)
    stack = None
    try:
        env = {**backup_dag_env(cluster, password, backups, archive), **(extra_env or {})}
        stack = AirflowStack(root / "airflow", dags, extra_env=env)
        stack.start(expect_dag_ids=dag_ids)
        yield {"cluster": cluster, "stack": stack, "archive": archive, "backups": backups, "root": root}
    finally:
        if stack:
            stack.stop()
        cluster.stop("immediate")
        if os.environ.get("PGSB_KEEP_E2E"):  # keep the stack's files and logs to look at
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
