"""End to end, snapshot backups (PostgresOnlineBackup(snapshot=...)): a real Airflow (demo/stack.py) and a
cluster whose data directory and tablespace live on btrfs subvolumes of a loop device the module makes and
removes. Each backup that completes is restored and its rows checked; each fault ends backup mode, fails the
backup, stores no label and leaves no snapshot."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from demo.load import wait_archived
from pg_safe_backup.local_cluster import find_bindir, give_to_server_user
from pg_safe_backup.snapshots import KeptSnapshot, delete_all

from backup_helpers import backup_row, holder_sessions, recovered, run_cli
from btrfs_helpers import btrfs_volume, subvolume, subvolumes
from e2e_helpers import (
    FINISH,
    GATE,
    HOLD,
    assert_failed_cleanly,
    assert_restores_with_every_commit,
    assert_run_ended,
    backup_stack,
    backup_under_write_load,
    failure_report,
    log_offset,
    log_since,
    no_backup_left_behind,  # noqa: F401 - an autouse fixture
    run_dag,
    task_log,
    trigger,
    wait_for_tasks,
)

pytestmark = pytest.mark.e2e

DAGS = Path(__file__).parent / "e2e_snapshot_dags"
PASSWORD = "pgsbSnap-Hq3Vt81Zr"
DAG_IDS = ["e2e_snapshot", "e2e_snapshot_commands", "e2e_snapshot_fails", "e2e_snapshot_keep"]
SNAPSHOT, COPY_OUT, REMOVE, STORE = (
    "backup.snapshot",
    "backup.copy_out",
    "backup.remove_snapshots",
    "store_backup_label",
)
#: ledger on the data directory's volume, ledger_space in the tablespace on the other one.
TABLES = ("ledger", "ledger_space")
LIVE_VOLUMES = ["pgdata", "space"]


@pytest.fixture(scope="module")
def env() -> Iterator[dict]:
    with btrfs_volume("pgsb-e2e-snap-") as mount:
        data_volume, space_volume = subvolume(mount / "pgdata"), subvolume(mount / "space")
        for folder in (data_volume, space_volume):
            give_to_server_user(folder)
        (space_volume / "ts").mkdir()
        give_to_server_user(space_volume / "ts")
        snapshots = mount / "snapshots"
        snapshots.mkdir()
        with backup_stack(
            "pgsb-e2e-snap-",
            PASSWORD,
            DAGS,
            DAG_IDS,
            extra_env=lambda root: {
                "E2E_SNAPSHOT_DIR": str(snapshots),
                "E2E_SNAPSHOT_HOLD": str(root / "hold_snapshot"),
                "E2E_SNAPSHOT_WAITING": str(root / "snapshot_waiting"),
                # A restarted triggerer adopts a dead one's triggers once its heartbeat is older than this.
                "AIRFLOW__TRIGGERER__JOB_HEARTBEAT_SEC": "1",
                "AIRFLOW__TRIGGERER__TRIGGERER_HEALTH_CHECK_THRESHOLD": "6",
            },
            datadir=data_volume / "data",
        ) as env:
            cluster = env["cluster"]
            cluster.sql(f"CREATE TABLESPACE space1 LOCATION '{space_volume / 'ts'}'")
            cluster.sql("CREATE TABLE ledger (id bigint PRIMARY KEY, v text NOT NULL)")
            cluster.sql(
                "CREATE TABLE ledger_space (id bigint PRIMARY KEY, v text NOT NULL) TABLESPACE space1"
            )
            pgbench(cluster, "-i", "-s", "4", "--tablespace=space1")
            env.update(mount=mount, snapshots=snapshots)
            yield env
            assert subvolumes(mount) == LIVE_VOLUMES, "a snapshot was left behind"


def pgbench(cluster, *args: str, background: bool = False) -> subprocess.Popen | None:
    cmd = [
        str(find_bindir() / "pgbench"),
        "-h",
        str(cluster.socket_dir),
        "-p",
        str(cluster.port),
        "-U",
        "postgres",
    ]
    if background:
        return subprocess.Popen([*cmd, *args, "postgres"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    subprocess.run([*cmd, *args, "postgres"], check=True, capture_output=True)
    return None


def snapshot_seconds(env: dict, dag_id: str, run_id: str) -> float:
    return env["stack"].xcom(dag_id, run_id, SNAPSHOT)["seconds"]


def test_a_snapshot_backup_under_pgbench_load_with_a_tablespace_restores_every_commit(env):
    cluster = env["cluster"]
    load = pgbench(cluster, "-c", "2", "-j", "1", "-T", "600", "-n", background=True)
    try:
        completed = backup_under_write_load(env, "e2e_snapshot", "snap_load", TABLES)
    finally:
        load.terminate()
        load.communicate(timeout=30)
    assert cluster.sql("SELECT count(*) FROM pgbench_history")[0][0] > 100, "pgbench did not run"
    stack = env["stack"]
    # Label, page-LSN check, pg_verifybackup (WAL parsed) and the DAG's restore check; then a recovery to the
    # end of the archive with every row committed before the run ended, the tablespace's included.
    assert_restores_with_every_commit(env, completed, TABLES)
    # Backup mode lasted the snapshots, the copy-out ran after it ended, from the snapshots.
    copy_log = task_log(stack, "e2e_snapshot", "snap_load", COPY_OUT, "copying out of the snapshots")
    assert f"tablespace {tablespace_oid(env)} from {env['snapshots']}/pgsb-" in copy_log, copy_log[-3000:]
    assert snapshot_seconds(env, "e2e_snapshot", "snap_load") < 30
    states = stack.task_states("e2e_snapshot", "snap_load")
    assert states[REMOVE] == "success", states
    assert subvolumes(env["mount"]) == LIVE_VOLUMES


def tablespace_oid(env: dict) -> str:
    return str(env["cluster"].sql("SELECT oid FROM pg_tablespace WHERE spcname = 'space1'")[0][0])


def test_a_failing_snapshot_fails_the_backup_ends_backup_mode_and_leaves_no_snapshot(env):
    dag_id, run_id = "e2e_snapshot_fails", "snap_fails"
    trigger(env, dag_id, run_id)
    assert_run_ended(
        env["stack"],
        dag_id,
        run_id,
        "failed",
        {
            HOLD: "failed",
            GATE: "success",
            SNAPSHOT: "failed",
            FINISH: "failed",
            COPY_OUT: "upstream_failed",
            REMOVE: "success",
            STORE: "upstream_failed",
        },
    )
    snap_log = task_log(env["stack"], dag_id, run_id, SNAPSHOT, "snapshot refused: quota exceeded")
    assert "snapshot not taken: snapshot_command of" in snap_log and "(exit 5)" in snap_log
    assert_failed_cleanly(env, dag_id, run_id, f"{SNAPSHOT} is failed")
    # The tablespace's snapshot, taken first, was deleted when the data directory's failed.
    assert subvolumes(env["mount"]) == LIVE_VOLUMES


def test_a_triggerer_killed_during_the_snapshot_step_fails_the_backup_once_and_removes_the_snapshots(env):
    """The snapshot command waits (on a file the test holds) while backup mode is on; the triggerer holding
    the session is killed: PostgreSQL aborts the backup, the re-run holder fails it (never restarts it), the
    snapshots then taken are removed by the teardown, and no label is stored."""
    cluster, stack, root = env["cluster"], env["stack"], env["root"]
    dag_id, run_id = "e2e_snapshot_commands", "snap_killed"
    hold, waiting = root / "hold_snapshot", root / "snapshot_waiting"
    hold.touch()
    offset = log_offset(cluster)
    try:
        trigger(env, dag_id, run_id)
        wait_for_tasks(
            stack, dag_id, run_id, lambda s: waiting.exists() and s.get(HOLD) == "deferred", "snapshotting"
        )
        assert holder_sessions(cluster) == 1
        stack.kill_component("triggerer")  # SIGKILL: the holder's session dies, PostgreSQL aborts the backup
        deadline = time.monotonic() + 60
        while "aborting backup due to backend exiting" not in log_since(cluster, offset):
            assert time.monotonic() < deadline, "the server did not abort the backup"
            time.sleep(0.2)
        stack.restart_component("triggerer")
    finally:
        hold.unlink(missing_ok=True)  # the snapshot command goes on
    assert_run_ended(
        stack,
        dag_id,
        run_id,
        "failed",
        {
            HOLD: "failed",
            GATE: "success",
            SNAPSHOT: "success",
            FINISH: "failed",
            COPY_OUT: "upstream_failed",
            REMOVE: "success",
            STORE: "upstream_failed",
        },
    )
    # Marked failed by whichever sees the session gone first: the finish ("is gone") or the re-run holder
    # ("ended before the backup finished").
    pid = backup_row(cluster)["pid"]
    assert_failed_cleanly(env, dag_id, run_id, f"the session holding backup mode (pid {pid})")
    removed = stack.xcom(dag_id, run_id, REMOVE)["removed"]
    assert len(removed) == 2 and all(p.startswith(f"{env['snapshots']}/pgsb-") for p in removed), removed
    assert subvolumes(env["mount"]) == LIVE_VOLUMES
    assert backup_row(cluster)["state"] == "failed"


def test_a_kept_snapshot_taken_by_command_templates_is_catalogued_listed_and_restored(env):
    """keep=True and the command driver (btrfs commands as its templates): the snapshots stay, catalogued
    beside them; ``pg-safe-backup list`` proves the entry, ``restore`` brings back every row from them."""
    cluster, stack = env["cluster"], env["stack"]
    dag_id, run_id = "e2e_snapshot_keep", "snap_keep"
    state, tasks = run_dag(env, dag_id, run_id)
    assert state == "success", failure_report(stack, dag_id, run_id, tasks)
    kept = stack.xcom(dag_id, run_id, REMOVE)
    entry = Path(kept["kept"])
    assert entry.parent == env["snapshots"] and len(kept["snapshots"]) == 2, kept
    assert sorted(v for v in subvolumes(env["mount"]) if v.startswith("snapshots/")) == sorted(
        f"snapshots/{Path(p).name}" for p in kept["snapshots"]
    )
    try:
        committed = cluster.sql("SELECT count(*) FROM ledger")[0][0]
        wait_archived(cluster)
        listed = json.loads(run_cli("list", env["snapshots"], "--json", timeout=60).stdout)
        assert [(Path(b["folder"]), b["status"], b["info"]["format"]) for b in listed] == [
            (entry, "proven", "snapshot")
        ], listed
        assert listed[0]["proof"]["stop_lsn"] == stack.xcom(dag_id, run_id, FINISH)["stop_lsn"]

        place = env["root"] / "kept"  # the restored server writes its log beside its data directory
        place.mkdir()
        give_to_server_user(place)
        target, space = place / "restored", place / "space"
        done = run_cli(
            "restore",
            entry,
            target,
            "--wal-archive",
            env["archive"],
            "--tablespace",
            f"{tablespace_oid(env)}={space}",
            "--archive-mode",
            "off",
            timeout=300,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        with recovered(target) as server:
            assert server.sql("SELECT count(*) >= %s FROM ledger", [committed]) == [(True,)]
            assert server.sql("SELECT count(*) FROM pgbench_accounts") == [(400000,)]
    finally:
        # The module ends with no snapshot: this kept one removed as retention would (snapshots, then entry).
        record = KeptSnapshot.read(entry)
        assert delete_all(None, record.snapshots) == []
        shutil.rmtree(entry)
    assert subvolumes(env["mount"]) == LIVE_VOLUMES
