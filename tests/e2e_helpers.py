"""Helpers shared by the end-to-end test modules (real Airflow + real PostgreSQL)."""

from __future__ import annotations

from demo.stack import AirflowStack
from pg_safe_backup.local_cluster import LocalCluster


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
