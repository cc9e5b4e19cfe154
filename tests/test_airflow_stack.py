"""demo.stack.AirflowStack drives a real Airflow (PostgreSQL metadata DB, Celery + Redis, two triggerers, a
worker per queue): deferral through the triggerer, a task pinned to a queue, env, XCom, logs, clean
stop; its long waits (start, run, stop) told as they go."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from demo.stack import PROGRESS_EVERY_S, STACK_ID_VAR, AirflowStack

DAG_ID = "stack_smoke"
DAG_FILE = textwrap.dedent("""
    import os
    from datetime import datetime, timedelta

    from airflow.providers.standard.operators.bash import BashOperator
    from airflow.providers.standard.sensors.time_delta import WaitSensor
    from airflow.sdk import DAG, task

    with DAG("stack_smoke", schedule=None, start_date=datetime(2024, 1, 1), catchup=False):
        # Always defers (the wait counts from the task's start), so the triggerer must fire it.
        wait = WaitSensor(task_id="wait", time_to_wait=timedelta(seconds=4), deferrable=True)
        echo = BashOperator(task_id="echo", bash_command='echo "marker: $STACK_SMOKE_MARKER"')

        @task
        def result():
            return {"answer": 42, "marker": os.environ["STACK_SMOKE_MARKER"], "items": ["a", "b"]}

        # Pinned to the second worker's queue: only that worker may run it.
        pinned = BashOperator(
            task_id="pinned", queue="pg-smoke", bash_command='echo "ran on $PGSB_AIRFLOW_COMPONENT"'
        )

        [wait, echo] >> result()
""")


def _stack_pids(stack: AirflowStack) -> dict[int, float]:
    """pid -> create_time of every live process that belongs to the stack (for pid-reuse-safe checks)."""
    pids: dict[int, float] = {}
    for proc in psutil.process_iter(["pid", "create_time", "environ"]):
        try:
            env = proc.info["environ"] or {}
        except psutil.Error:
            continue
        if env.get(STACK_ID_VAR) == stack.stack_id:
            pids[proc.pid] = proc.info["create_time"]
    for pid in stack.pids().values():
        try:
            proc = psutil.Process(pid)
            for p in [proc, *proc.children(recursive=True)]:
                pids[p.pid] = p.create_time()
        except psutil.NoSuchProcess:
            pass
    return pids


def _survivors(seen: dict[int, float]) -> list[str]:
    out = []
    for pid, created in seen.items():
        try:
            proc = psutil.Process(pid)
            if proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE:
                out.append(f"{pid} {proc.cmdline()}")
        except psutil.NoSuchProcess:
            pass
    return out


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_stack_runs_deferred_bash_and_xcom_dag(tmp_path: Path) -> None:
    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / "stack_smoke.py").write_text(DAG_FILE)
    marker = f"env-reached-the-task-{time.time_ns()}"
    told: list[str] = []
    stack = AirflowStack(
        tmp_path / "airflow",
        dags,
        extra_env={"STACK_SMOKE_MARKER": marker},
        triggerers=2,
        workers={"default": ["default"], "pg-smoke": ["pg-smoke"]},
        progress=told.append,
    )

    seen_states: dict[str, set[str]] = {}
    seen_pids: dict[int, float] = {}

    def progress(states: dict[str, str]) -> None:
        for task_id, state in states.items():
            seen_states.setdefault(task_id, set()).add(state)
        seen_pids.update(_stack_pids(stack))  # catches the task processes while they run

    with stack:
        seen_pids.update(_stack_pids(stack))
        assert set(stack.pids()) == {
            "api-server",
            "scheduler",
            "dag-processor",
            "triggerer",
            "triggerer-2",
            "worker-default",
            "worker-pg-smoke",
            "redis",
        }
        db_root = stack.metadata_db.datadir.parent
        run_id = stack.trigger(DAG_ID, conf={"k": "v"})
        state = stack.wait_for_run(DAG_ID, run_id, timeout=120, on_progress=progress, poll_interval=0.5)
        seen_pids.update(_stack_pids(stack))
        logs = {t: stack.task_log(DAG_ID, run_id, t) for t in ("wait", "echo", "result", "pinned")}
        assert state == "success", (
            f"run ended {state}: {stack.task_states(DAG_ID, run_id)}\n{logs}\n{stack.dump_logs()}"
        )
        assert stack.task_states(DAG_ID, run_id) == {
            "wait": "success",
            "echo": "success",
            "result": "success",
            "pinned": "success",
        }
        assert "deferred" in seen_states["wait"], f"the sensor never deferred: {seen_states}"
        assert "Trigger fired event" in logs["wait"], logs["wait"]  # the triggerer's part of the log
        assert stack.xcom(DAG_ID, run_id, "result") == {"answer": 42, "marker": marker, "items": ["a", "b"]}
        assert f"marker: {marker}" in logs["echo"], logs["echo"]
        assert stack.task_log_files(DAG_ID, run_id, "echo")[0].name == "attempt=1.log"
        assert len(seen_pids) >= 5, seen_pids  # the four components and at least one child each

        assert "ran on worker-pg-smoke" in logs["pinned"], logs["pinned"]
        # Celery ran the tasks (the workers' logs name them), with its result backend in the metadata DB.
        workers_log = "".join(
            (stack.logs_dir / f"worker-{w}.log").read_text(errors="replace") for w in ("default", "pg-smoke")
        )
        assert f"run_id='{run_id}'" in workers_log or run_id in workers_log, workers_log[-3000:]
        assert stack.metadata_sql("SELECT count(*) FROM celery_taskmeta")[0][0] >= 4
        # The metadata DB is the stack's PostgreSQL, through psycopg2.
        probe = (
            "from airflow import settings; settings.configure_orm(); e = settings.engine;"
            " print(e.dialect.name, e.dialect.driver, e.url.host, e.url.port)"
        )
        out = subprocess.run(
            [sys.executable, "-c", probe], env=stack.env, capture_output=True, text=True, timeout=60
        )
        assert out.stdout.strip().splitlines()[-1:] == [
            f"postgresql psycopg2 127.0.0.1 {stack.metadata_db.port}"
        ], out
        # Both triggerers are running jobs.
        assert stack.metadata_sql(
            "SELECT count(*) FROM job WHERE job_type = 'TriggererJob' AND state = 'running'"
        ) == [(2,)]

    assert not _survivors(seen_pids), _survivors(seen_pids)
    assert_told_as_it_went(told)
    assert not stack.processes()
    assert not _stack_pids(stack), "a process carrying the stack id survived"
    assert not db_root.exists(), "the metadata DB's cluster was left behind"


def assert_told_as_it_went(told: list[str]) -> None:
    """Each long wait said that it began, a "still waiting" line every PROGRESS_EVERY_S of it, and its end
    with how long it took."""
    waits = [
        ("starting Airflow", "Airflow ready at"),
        ("waiting for the stack_smoke run", "the stack_smoke run"),
        ("stopping Airflow", "Airflow stopped"),
    ]
    at = 0
    for begins, ends in waits:
        first = next(i for i in range(at, len(told)) if told[i].startswith(begins))
        last = next(i for i in range(first + 1, len(told)) if told[i].startswith(ends))
        took = int(re.search(r"\((\d+) s\)$", told[last]).group(1))
        still = told[first + 1 : last]
        assert all(line.startswith("still waiting for ") for line in still), still
        assert took // PROGRESS_EVERY_S - 1 <= len(still) <= took // PROGRESS_EVERY_S + 1, (took, still)
        at = last + 1
    assert told[-1].startswith("Airflow stopped"), told
