"""End to end: a real Airflow (demo/stack.py: PostgreSQL metadata DB, CeleryExecutor with a Redis broker)
backs up a real cluster under write load, and every backup is restored and checked."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from demo.load import invariant_sql
from demo.stack import AirflowStack
from pg_safe_backup.local_cluster import LocalCluster, give_to_server_user
from pg_safe_backup.verify import verify_backup

from e2e_helpers import (
    assert_restores_with_every_commit,
    backup_under_write_load,
    cluster_env,
    holder_sessions,
    run_dag,
)

pytestmark = pytest.mark.e2e

DAGS = Path(__file__).parent / "e2e_dags"
PASSWORD = "e2e-Pa55word"

TABLES = ("ledger", "spaced")


@pytest.fixture(scope="module")
def env() -> Iterator[dict]:
    root = Path(tempfile.mkdtemp(prefix="pgsb-e2e-"))
    os.chmod(root, 0o755)
    archive, space, backups = root / "wal_archive", root / "space1", root / "backups"
    for d in (archive, space, backups):
        d.mkdir()
        give_to_server_user(d)
    cluster = (
        LocalCluster(root / "pg" / "data")
        .init(password=PASSWORD, settings={"archive_mode": "on", "archive_command": f"'cp %p {archive}/%f'"})
        .start()
    )
    stack = None
    try:
        cluster.sql(f"CREATE TABLESPACE space1 LOCATION '{space}'")
        cluster.sql("CREATE TABLE ledger (id bigint PRIMARY KEY, v text NOT NULL)")
        cluster.sql("CREATE TABLE spaced (id bigint PRIMARY KEY, v text NOT NULL) TABLESPACE space1")
        stack = AirflowStack(
            root / "airflow",
            DAGS,
            extra_env={
                **cluster_env(cluster, PASSWORD, archive, backups),
            },
        )
        stack.start(expect_dag_ids=["e2e_backup", "e2e_copy_fails"])
        yield {"cluster": cluster, "stack": stack, "archive": archive, "backups": backups, "root": root}
    finally:
        if stack:
            stack.stop()
        cluster.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def completed_backup(env) -> dict:
    """One backup DAG run under a continuous write load, its WAL archived."""
    return backup_under_write_load(env, "e2e_backup", "e2e_ok", TABLES)


def test_backup_under_write_load_with_tablespace_restores(env, completed_backup):
    cluster, backup_dir = env["cluster"], completed_backup["dir"]
    row = cluster.sql("SELECT state::text, backup_label, tablespace_map, owner FROM backup")[0]
    assert row[0] == "complete" and row[3] == "e2e_backup/e2e_ok/backup"
    assert (backup_dir / "backup_label").read_text() == row[1]
    oid = cluster.sql("SELECT oid FROM pg_tablespace WHERE spcname = 'space1'")[0][0]
    assert (backup_dir / "tablespace_map").read_text() == row[2] and row[2].startswith(f"{oid} ")
    # The DAG's own restore check, and a replay of the whole archive with every committed row.
    assert_restores_with_every_commit(env, completed_backup, TABLES)


def test_negative_control_same_copy_without_backup_label_fails(env, completed_backup, tmp_path):
    unlabeled = env["root"] / "unlabeled"
    shutil.copytree(completed_backup["dir"], unlabeled, symlinks=True)
    shutil.copytree(f"{completed_backup['dir']}_tablespaces", f"{unlabeled}_tablespaces", symlinks=True)
    (unlabeled / "backup_label").unlink()
    assert not verify_backup(unlabeled, env["archive"]).ok  # refused outright: no backup_label
    # And checked anyway, the data checks catch what recovery from the wrong checkpoint lost.
    result = verify_backup(
        unlabeled,
        env["archive"],
        recovery_target_immediate=False,
        require_backup_label=False,
        invariant_sql=invariant_sql(TABLES, completed_backup["committed"]),
    )
    assert not result.ok, "a copy without its backup_label passed the restore check"
    assert "has no backup_label" not in result.summary(), result.summary()  # failed in recovery or the data


def test_copy_failure_ends_backup_and_fails_run(env, completed_backup):
    cluster = env["cluster"]
    state, tasks = run_dag(env, "e2e_copy_fails", "e2e_broken")
    assert state == "failed"
    assert tasks["backup.copy_data_directory"] == "failed"
    assert tasks["backup.finish_backup"] == "failed" and tasks["store_backup_label"] == "upstream_failed"
    assert tasks["verify_backup"] == "upstream_failed"
    log = env["stack"].task_log("e2e_copy_fails", "e2e_broken", "backup.finish_backup")
    assert "the copy did not succeed: backup.copy_data_directory is failed" in log
    state_row = cluster.sql("SELECT state::text, backup_label, error, owner FROM backup")[0]
    assert state_row[0] == "failed" and state_row[1] is None and "copy_data_directory" in state_row[2]
    assert state_row[3] == "e2e_copy_fails/e2e_broken/backup"
    assert not (env["backups"] / "e2e_broken" / "backup_label").exists()
    assert holder_sessions(cluster) == 0
    assert "aborting backup" in cluster.log_text() or "backup mode ended" in env["stack"].task_log(
        "e2e_copy_fails", "e2e_broken", "backup.hold_backup_session"
    )
