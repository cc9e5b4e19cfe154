"""End to end, as users clear and re-run: a real Airflow (demo/stack.py: PostgreSQL metadata DB,
CeleryExecutor) clears task instances through the REST API as the UI does, and every backup taken is restored
and its data checked (each DAG's own restore check, with an invariant on that cluster's rows)."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from demo.stack import FINAL_RUN_STATES, AirflowStack
from pg_safe_backup.local_cluster import LocalCluster, give_to_server_user

from backup_helpers import backup_row, backup_starts
from e2e_helpers import archiving_cluster, failure_report, holder_sessions, temp_root

pytestmark = pytest.mark.e2e

DAGS = Path(__file__).parent / "e2e_rerun_dags"
PASSWORD = "e2e-Rerun-Pa55"
HOLD, GATE, COPY, FINISH = (
    "backup.hold_backup_session",
    "backup.wait_for_backup_mode",
    "backup.copy_cluster",
    "backup.finish_backup",
)
STORE, VERIFY = "store_backup_label", "verify_backup"
CLUSTER_NAMES = ("main", "x", "y", "z")
#: The mapped group's pool (deferred tasks counted) and its slots: clusters in backup mode at once, at most.
BACKUP_MODE_POOL, BACKUP_MODE_SLOTS = "pgsb_backup_mode", 2


@pytest.fixture(scope="module")
def env() -> Iterator[dict]:
    root, backups = temp_root("pgsb-e2e-rerun-", "backups")
    clusters: dict[str, LocalCluster] = {}
    stack = None
    try:
        described = {}
        for name in CLUSTER_NAMES:
            archive = root / f"wal_archive_{name}"
            archive.mkdir()
            give_to_server_user(archive)
            # Each its own system identifier: the tests tell the clusters' backups apart by it.
            c = clusters[name] = archiving_cluster(
                root / f"pg_{name}" / "data", archive, PASSWORD, fresh=True
            )
            c.sql("CREATE TABLE who (id int PRIMARY KEY, cluster text NOT NULL)")
            c.sql("INSERT INTO who SELECT g, %s FROM generate_series(1, 1000) g", [name])
            described[name] = {"conn_id": f"pg_{name}", "pgdata": str(c.datadir), "wal_archive": str(archive)}
        stack = AirflowStack(
            root / "airflow",
            DAGS,
            extra_env={
                **{
                    f"AIRFLOW_CONN_PG_{n.upper()}": c.airflow_conn_uri(password=PASSWORD)
                    for n, c in clusters.items()
                },
                "E2E_CLUSTERS": json.dumps(described),
                "E2E_BACKUP_ROOT": str(backups),
                "E2E_FAIL_ONCE": str(root / "fail_once"),
                "E2E_BACKUP_MODE_POOL": BACKUP_MODE_POOL,
                # three mapped groups: gates and finishes wait in worker slots
                "AIRFLOW__CORE__PARALLELISM": "12",
            },
        )
        stack.start(
            expect_dag_ids=[
                "e2e_rerun_clear",
                "e2e_rerun_hold",
                "e2e_nested_groups",
                "e2e_mapped_group",
                "e2e_wrong_gate",
            ]
        )
        stack.add_pool(BACKUP_MODE_POOL, BACKUP_MODE_SLOTS)
        yield {"clusters": clusters, "stack": stack, "backups": backups, "root": root}
    finally:
        if stack:
            stack.stop()
        for c in clusters.values():
            c.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)


# ------------------------------------------------------------------------------------------------- helpers


def system_identifier(cluster: LocalCluster) -> int:
    return cluster.sql("SELECT system_identifier FROM pg_control_system()")[0][0]


def run(stack: AirflowStack, dag_id: str, run_id: str) -> tuple[str, dict[str, str]]:
    stack.trigger(dag_id, run_id=run_id)
    return stack.wait_for_run(dag_id, run_id, timeout=240), stack.task_states(dag_id, run_id)


def clear(
    stack: AirflowStack,
    dag_id: str,
    run_id: str,
    task_ids: list[str] | None = None,
    include_downstream: bool = False,
) -> list[str]:
    """Clear task instances of one run as the UI does (POST clearTaskInstances); returns the cleared task
    ids."""
    body: dict = {
        "dry_run": False,
        "dag_run_id": run_id,
        "only_failed": False,
        "reset_dag_runs": True,
        "include_downstream": include_downstream,
    }
    if task_ids is not None:
        body["task_ids"] = task_ids
    resp = stack._api("POST", f"/api/v2/dags/{dag_id}/clearTaskInstances", body)
    return sorted(ti["task_id"] for ti in resp["task_instances"])


def wait_rerun(
    stack: AirflowStack, dag_id: str, run_id: str, timeout: float = 240
) -> tuple[str, dict[str, str]]:
    """After a clear: wait until the run is running again, then until it ends."""
    deadline = time.monotonic() + 30
    while stack.run_state(dag_id, run_id) in FINAL_RUN_STATES and time.monotonic() < deadline:
        time.sleep(0.3)
    return stack.wait_for_run(dag_id, run_id, timeout=timeout), stack.task_states(dag_id, run_id)


def log_of(
    stack: AirflowStack, dag_id: str, run_id: str, task_id: str, expected: str, timeout: float = 15
) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = stack.task_log(dag_id, run_id, task_id)
        if expected in text or time.monotonic() > deadline:
            return text
        time.sleep(0.5)


def restored(
    stack: AirflowStack, dag_id: str, run_id: str, task_id: str = VERIFY, map_index: int = -1
) -> str:
    """The DAG's own restore check passed: recovery, amcheck, and the invariant (the copy holds exactly the
    1000
    rows of the cluster it belongs to, see e2e_rerun_dags.INVARIANT). Returns its summary."""
    result = stack.xcom(dag_id, run_id, task_id, map_index=map_index)
    summary = result["summary"] if isinstance(result, dict) else result
    assert summary.startswith("PASS") and "invariant: 1 rows ok" in summary, summary
    return summary


def nothing_in_backup_mode(env: dict) -> None:
    for name, c in env["clusters"].items():
        assert holder_sessions(c) == 0, f"{name}: a holder session is still open"
        live = (
            c.sql("SELECT count(*) FROM backup WHERE state IN ('running', 'done')")
            if c.sql("SELECT to_regclass('backup')")[0][0]
            else [(0,)]
        )
        assert live == [(0,)], f"{name}: a backup is still running"


# --------------------------------------------------------------------------------------------------- cases


def test_clearing_a_failed_run_takes_a_new_backup_that_restores(env):
    stack, cluster = env["stack"], env["clusters"]["main"]
    dag_id, run_id = "e2e_rerun_clear", "copy_failed_then_cleared"
    (env["root"] / "fail_once").touch()
    state, tasks = run(stack, dag_id, run_id)
    assert state == "failed", failure_report(stack, dag_id, run_id, tasks)
    assert tasks[COPY] == "failed" and tasks[FINISH] == "failed" and tasks[HOLD] == "failed", tasks
    first = backup_row(cluster)
    assert first["state"] == "failed" and first["owner"] == f"{dag_id}/{run_id}/backup", first
    assert backup_starts(cluster) == 1

    cleared = clear(stack, dag_id, run_id)
    assert HOLD in cleared and GATE in cleared and COPY in cleared, cleared
    state, tasks = wait_rerun(stack, dag_id, run_id)
    assert state == "success", failure_report(stack, dag_id, run_id, tasks)
    row = backup_row(cluster)
    assert row["state"] == "complete" and row["owner"] == first["owner"] and row["error"] is None, row
    assert row["attempt"] != first["attempt"], "the re-run reported the first attempt's backup"
    assert backup_starts(cluster) == 2
    destination = env["backups"] / dag_id / run_id
    assert (destination / "backup_label").read_text() == row["backup_label"]
    assert stack.xcom(dag_id, run_id, FINISH, key="backup_label") == row["backup_label"]
    restored(stack, dag_id, run_id)
    nothing_in_backup_mode(env)


def test_clearing_only_the_hold_of_a_completed_run_leaves_nothing_in_backup_mode(env):
    stack, cluster = env["stack"], env["clusters"]["main"]
    dag_id, run_id = "e2e_rerun_hold", "completed_then_hold_cleared"
    state, tasks = run(stack, dag_id, run_id)
    assert state == "success", failure_report(stack, dag_id, run_id, tasks)
    done = backup_row(cluster)
    starts = backup_starts(cluster)
    restored(stack, dag_id, run_id)

    assert clear(stack, dag_id, run_id, task_ids=[HOLD]) == [HOLD]
    state, tasks = wait_rerun(stack, dag_id, run_id, timeout=120)
    report = failure_report(stack, dag_id, run_id, tasks)
    assert tasks[HOLD] == "failed", report
    # The hold task found it on its worker, before deferring: no trigger, no session.
    log = log_of(stack, dag_id, run_id, HOLD, "backup not started")
    assert f"backup not started: this run's {FINISH} already ended (success)" in log, report
    assert backup_starts(cluster) == starts, "a backup nobody would end was started"
    assert backup_row(cluster) == done  # the completed backup's row is untouched
    nothing_in_backup_mode(env)

    # The next run is not refused, and restores.
    state, tasks = run(stack, dag_id, "next_after_hold_cleared")
    assert state == "success", failure_report(stack, dag_id, "next_after_hold_cleared", tasks)
    assert backup_row(cluster)["owner"] == f"{dag_id}/next_after_hold_cleared/backup"
    restored(stack, dag_id, "next_after_hold_cleared")
    nothing_in_backup_mode(env)


def test_re_running_the_copy_of_a_completed_run_reports_no_label(env):
    """The copy re-runs after the backup ended: its gate cannot open, so the finish has no label to give and
    the store writes nothing (it wrote the right label the first time, and that one stays)."""
    stack, cluster = env["stack"], env["clusters"]["main"]
    dag_id, run_id = "e2e_rerun_hold", "completed_then_copy_cleared"
    state, tasks = run(stack, dag_id, run_id)
    assert state == "success", failure_report(stack, dag_id, run_id, tasks)
    label_file = env["backups"] / dag_id / run_id / "backup_label"
    first_label, first_mtime = label_file.read_text(), label_file.stat().st_mtime_ns
    done = backup_row(cluster)
    starts = backup_starts(cluster)

    cleared = clear(stack, dag_id, run_id, task_ids=[COPY], include_downstream=True)
    assert {GATE, COPY, FINISH, STORE} <= set(cleared), cleared
    state, tasks = wait_rerun(stack, dag_id, run_id, timeout=120)
    report = failure_report(stack, dag_id, run_id, tasks)
    assert state == "failed", report
    assert tasks[GATE] == "failed" and tasks[COPY] == "upstream_failed" and tasks[FINISH] == "failed", report
    assert tasks[STORE] == "upstream_failed", report
    gate_log = log_of(stack, dag_id, run_id, GATE, "already complete")
    assert "this run's backup already complete before its copy could start" in gate_log, report
    finish_log = log_of(stack, dag_id, run_id, FINISH, "did not open")
    assert (
        f"the gate {GATE} did not open (failed), so no copy ran under a backup of this run" in finish_log
    ), report
    assert label_file.read_text() == first_label and label_file.stat().st_mtime_ns == first_mtime
    assert backup_row(cluster) == done
    assert backup_starts(cluster) == starts
    nothing_in_backup_mode(env)


def assert_own_backup(
    env: dict,
    dag_id: str,
    run_id: str,
    cluster_name: str,
    key: str,
    map_index: int,
    destination: Path,
    check_task: str,
) -> int:
    """Cluster ``cluster_name``'s backup is this group's (owner), complete, of this cluster (system
    identifier,
    which the store task also checked against the copy's pg_control), stored with its own label, and restored.
    Returns the system identifier."""
    stack, cluster = env["stack"], env["clusters"][cluster_name]
    row = backup_row(cluster)
    owner = f"{dag_id}/{run_id}/{key}" + (f"[{map_index}]" if map_index >= 0 else "")
    assert row["state"] == "complete" and row["owner"] == owner, row
    assert row["system_identifier"] == system_identifier(cluster)
    finish = stack.xcom(dag_id, run_id, f"{key}.finish_backup", key="system_identifier", map_index=map_index)
    assert finish == str(row["system_identifier"])
    assert (destination / "backup_label").read_text() == row["backup_label"]
    restored(stack, dag_id, run_id, check_task, map_index=map_index)
    return row["system_identifier"]


def test_nested_groups_with_the_same_id_take_two_backups(env):
    stack = env["stack"]
    dag_id, run_id = "e2e_nested_groups", "nested"
    state, tasks = run(stack, dag_id, run_id)
    assert state == "success", failure_report(stack, dag_id, run_id, tasks)
    systems = {
        assert_own_backup(
            env,
            dag_id,
            run_id,
            name,
            f"{parent}.backup",
            -1,
            env["backups"] / dag_id / run_id / parent,
            f"{parent}.{VERIFY}",
        )
        for parent, name in (("east", "x"), ("west", "y"))
    }
    assert len(systems) == 2
    # Both deferrable. East's gate and finish settled inline, in their worker slots; west's (inline_wait=0)
    # deferred at once and resumed on a worker when their triggers fired.
    for task in ("wait_for_backup_mode", "finish_backup"):
        east = stack.task_log_files(dag_id, run_id, f"east.backup.{task}")
        west = stack.task_log_files(dag_id, run_id, f"west.backup.{task}")
        assert [".trigger." in p.name for p in east] == [False], east
        assert "Pausing task as DEFERRED" not in east[0].read_text()
        assert ".trigger." in west[-1].name and "Pausing task as DEFERRED" in west[0].read_text(), west
    nothing_in_backup_mode(env)


class BackupModeSampler(threading.Thread):
    """Counts, over and over until stopped, the clusters whose backup row says they are in backup mode
    (running: pg_backup_start called; done: the copy ended, pg_backup_stop not yet returned)."""

    def __init__(self, clusters: list[LocalCluster]) -> None:
        super().__init__(daemon=True)
        self.clusters, self.stopped = clusters, threading.Event()
        self.samples: list[int] = []

    def run(self) -> None:
        while not self.stopped.wait(0.05):  # a sample every 50 ms or so, for as long as the run goes
            states = [c.sql(IN_BACKUP_MODE) if c.sql(TABLE_THERE) else [] for c in self.clusters]
            self.samples.append(sum(1 for rows in states if rows))

    def stop(self) -> list[int]:
        self.stopped.set()
        self.join(60)
        return self.samples


TABLE_THERE = "SELECT 1 FROM pg_tables WHERE schemaname = 'public' AND tablename = 'backup'"
IN_BACKUP_MODE = "SELECT 1 FROM backup WHERE state IN ('running', 'done')"


def test_a_mapped_group_over_three_clusters_takes_three_backups(env):
    """Each map index its own backup of its own cluster; the group's pool (2 slots, deferred tasks counted)
    keeps at most two of the three clusters in backup mode at any moment, sampled from the servers."""
    stack = env["stack"]
    dag_id, run_id = "e2e_mapped_group", "mapped"
    sampler = BackupModeSampler([env["clusters"][name] for name in ("x", "y", "z")])
    sampler.start()
    try:
        state, tasks = run(stack, dag_id, run_id)
    finally:
        samples = sampler.stop()
    assert state == "success", failure_report(stack, dag_id, run_id, tasks)
    assert len(samples) > 20, samples  # sampled all along the run
    assert max(samples) >= 1, samples
    assert max(samples) <= BACKUP_MODE_SLOTS, f"more clusters in backup mode than the pool's slots: {samples}"
    systems = {
        assert_own_backup(
            env,
            dag_id,
            run_id,
            name,
            "clusters.backup",
            index,
            env["backups"] / dag_id / run_id / str(index),
            "clusters.check_restore",
        )
        for index, name in enumerate(("x", "y", "z"))
    }
    assert len(systems) == 3
    nothing_in_backup_mode(env)


def test_a_finish_wired_to_the_wrong_gate_fails_naming_gate_task_id_and_the_backup_is_ended(env):
    """Without the gate's start LSN and attempt the finish cannot tell which backup the copy ran under: it
    fails naming gate_task_id, and the holder, seeing its finish ended, fails the backup and ends backup
    mode."""
    stack, cluster = env["stack"], env["clusters"]["main"]
    dag_id, run_id = "e2e_wrong_gate", "wrong_gate"
    state, tasks = run(stack, dag_id, run_id)
    report = failure_report(stack, dag_id, run_id, tasks)
    assert state == "failed", report
    assert tasks == {
        "hold": "failed",
        "gate": "success",
        "copy": "success",
        "not_the_gate": "success",
        "finish": "failed",
    }, report
    finish_log = log_of(stack, dag_id, run_id, "finish", "gate_task_id")
    assert "gate_task_id='not_the_gate' succeeded but published no start_lsn and attempt" in finish_log, (
        report
    )
    hold_log = log_of(stack, dag_id, run_id, "hold", "nothing would end this backup")
    assert (
        "backup not taken: this run's finish already ended (failed): nothing would end this backup; backup "
        "mode"
        " ended" in hold_log
    ), report
    row = backup_row(cluster)
    assert row["state"] == "failed" and row["owner"] == f"{dag_id}/{run_id}/by_hand", row
    assert row["backup_label"] is None
    nothing_in_backup_mode(env)
