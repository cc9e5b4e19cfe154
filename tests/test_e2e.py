"""End to end: a real Airflow (demo/stack.py: PostgreSQL metadata DB, CeleryExecutor with a Redis broker)
backs up a real cluster under write load, and every backup is restored and checked."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from demo.load import invariant_sql
from pg_safe_backup.catalog import read_info
from pg_safe_backup.local_cluster import give_to_server_user
from pg_safe_backup.verify import verify_backup

from e2e_helpers import (
    assert_restores_with_every_commit,
    backup_stack,
    backup_under_write_load,
    holder_sessions,
    run_dag,
    task_log,
)

pytestmark = pytest.mark.e2e

DAGS = Path(__file__).parent / "e2e_dags"
PASSWORD = "e2e-Pa55word"

TABLES = ("ledger", "spaced")


@pytest.fixture(scope="module")
def env() -> Iterator[dict]:
    with backup_stack(
        "pgsb-e2e-", PASSWORD, DAGS, ["e2e_backup", "e2e_copy_fails", "e2e_copy_operator", "e2e_drill"]
    ) as env:
        cluster, space = env["cluster"], env["root"] / "space1"
        space.mkdir()
        give_to_server_user(space)
        cluster.sql(f"CREATE TABLESPACE space1 LOCATION '{space}'")
        cluster.sql("CREATE TABLE ledger (id bigint PRIMARY KEY, v text NOT NULL)")
        cluster.sql("CREATE TABLE spaced (id bigint PRIMARY KEY, v text NOT NULL) TABLESPACE space1")
        yield env


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


def test_copy_operator_backup_under_write_load_with_tablespace_restores(env):
    """PostgresCopyDataDirectoryOperator: the tablespace inside the copy, the manifest from the copy's
    checksums, the DAG's page-LSN check, pg_verifybackup and restore check, and every committed row."""
    env["cluster"].sql("TRUNCATE ledger, spaced")  # the writer counts ids from 1 again (last test here)
    completed = backup_under_write_load(env, "e2e_copy_operator", "e2e_copier", TABLES)
    assert_restores_with_every_commit(env, completed, TABLES)
    oid = env["cluster"].sql("SELECT oid FROM pg_tablespace WHERE spcname = 'space1'")[0][0]
    inside = completed["dir"] / "pg_tblspc" / str(oid)
    assert inside.is_dir() and not inside.is_symlink(), "the tablespace is in the copy, not a link to it"
    copied = env["stack"].xcom("e2e_copy_operator", "e2e_copier", "backup.copy_data_directory")
    assert copied["format"] == "plain" and copied["files"] > 500 and copied["bytes"] > 0, copied
    log = task_log(env["stack"], "e2e_copy_operator", "e2e_copier", "store_backup_label", "backup_manifest")
    assert "from the copy's checksums" in log, log[-2000:]


def test_restore_drill_of_the_newest_backup_records_its_rto(env):
    """After the copy operator's backup (the newest under the root): the drill DAG restores it and records
    how long that took; a max_age shorter than its age fails the drill, naming the age."""
    stack = env["stack"]
    stack.trigger("e2e_drill", run_id="drill_ok")
    assert stack.wait_for_run("e2e_drill", "drill_ok", timeout=300) == "success", stack.task_log(
        "e2e_drill", "drill_ok", "restore_drill"
    )[-3000:]
    drilled = stack.xcom("e2e_drill", "drill_ok", "restore_drill")
    newest = env["backups"] / "e2e_copier"
    assert drilled["backup"] == str(newest) and drilled["ok"], drilled
    assert (
        0 < drilled["restore_s"] <= drilled["rto_s"]
        and drilled["checks"]["restore check"]["status"] == "PASS"
    )
    recorded = read_info(newest).verifications[-1]
    assert recorded["by"] == "drill e2e_drill/drill_ok" and recorded["ok"] and recorded["seconds"] > 0
    log = task_log(stack, "e2e_drill", "drill_ok", "restore_drill", "drill: the restore took")
    assert f"drill: the restore took {drilled['restore_s']:.1f} s (RTO: {drilled['rto_s']:.1f} s" in log
    stack.trigger("e2e_drill", conf={"max_age": 0.5}, run_id="drill_too_old")
    assert stack.wait_for_run("e2e_drill", "drill_too_old", timeout=300) == "failed"
    log = task_log(stack, "e2e_drill", "drill_too_old", "restore_drill", "older than max_age")
    assert "older than max_age 0:00:00.500000: are the backups still running?" in log, log[-3000:]
