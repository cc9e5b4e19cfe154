"""End to end: a real Airflow (demo/stack.py: PostgreSQL metadata DB, CeleryExecutor with a Redis broker)
backs up a real cluster under write load, and every backup is restored and checked; the store task's Asset
schedules the drill; the workers and the triggerer send their metrics to a StatsD the test reads."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode

import pytest

from demo.load import invariant_sql
from demo.s3 import KEY, SECRET, LocalS3, local_s3
from demo.stack import AirflowStack
from pg_safe_backup.catalog import list_backups, read_info
from pg_safe_backup.links import PAGE, URL_PREFIX
from pg_safe_backup.local_cluster import give_to_server_user
from pg_safe_backup.utils.mixins import catalog_asset
from pg_safe_backup.verify import verify_backup

from backup_helpers import recovered, run_cli
from browser import Browser, chromium
from e2e_helpers import (
    assert_restores_with_every_commit,
    backup_stack,
    backup_under_write_load,
    holder_sessions,
    run_dag,
    task_log,
)
from metrics_helpers import StatsD

pytestmark = pytest.mark.e2e

DAGS = Path(__file__).parent / "e2e_dags"
PASSWORD = "e2e-Pa55word"

TABLES = ("ledger", "spaced")


#: The bucket of the module's S3 server (moto), and where the backups go in it.
BUCKET = "pgsb-e2e"
#: The DAGs' root: the server attached under a connection id (tests/e2e_dags); the CLI's: the plain URL.
S3_ROOT, S3_URL = f"s3://pgsb_moto@{BUCKET}/backups", f"s3://{BUCKET}/backups"
DAG_IDS = ["e2e_backup", "e2e_copy_fails", "e2e_copy_operator", "e2e_drill", "e2e_copy_s3", "e2e_drill_s3"]


def store_env(s3: LocalS3) -> dict[str, str]:
    """What the DAGs read to attach the S3 server under the connection id of their root."""
    return {**s3.environment(), "E2E_S3_ROOT": S3_ROOT}


@pytest.fixture(scope="module")
def s3() -> Iterator[LocalS3]:
    with local_s3(BUCKET) as server:
        yield server


@pytest.fixture(scope="module")
def statsd() -> Iterator[StatsD]:
    server = StatsD()
    yield server
    server.close()


@pytest.fixture(scope="module")
def env(s3: LocalS3, statsd: StatsD) -> Iterator[dict]:
    def extra_env(root: Path) -> dict[str, str]:
        # The Backups page shows the DAGs' local root (backup_stack's root/backups).
        page = {"AIRFLOW__PG_SAFE_BACKUP__CATALOG_ROOTS": str(root / "backups")}
        return {**store_env(s3), **statsd.environment(), **page}

    with backup_stack("pgsb-e2e-", PASSWORD, DAGS, DAG_IDS, extra_env=extra_env) as env:
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
    # Its store task updates the root's Asset: the drill scheduled on it runs next (the drill's test).
    env["stack"]._api("PATCH", "/api/v2/dags/e2e_drill", {"is_paused": False})
    completed = backup_under_write_load(env, "e2e_copy_operator", "e2e_copier", TABLES)
    assert_restores_with_every_commit(env, completed, TABLES)
    oid = env["cluster"].sql("SELECT oid FROM pg_tablespace WHERE spcname = 'space1'")[0][0]
    inside = completed["dir"] / "pg_tblspc" / str(oid)
    assert inside.is_dir() and not inside.is_symlink(), "the tablespace is in the copy, not a link to it"
    copied = env["stack"].xcom("e2e_copy_operator", "e2e_copier", "backup.copy_data_directory")
    assert copied["format"] == "plain" and copied["files"] > 500 and copied["bytes"] > 0, copied
    log = task_log(env["stack"], "e2e_copy_operator", "e2e_copier", "store_backup_label", "backup_manifest")
    assert "from the copy's checksums" in log, log[-2000:]


def drill(stack: AirflowStack, dag_id: str, run_id: str) -> dict:
    """A drill DAG's run, succeeded: its XCom."""
    stack.trigger(dag_id, run_id=run_id)
    assert stack.wait_for_run(dag_id, run_id, timeout=300) == "success", stack.task_log(
        dag_id, run_id, "restore_drill"
    )[-3000:]
    return stack.xcom(dag_id, run_id, "restore_drill")


def asset_triggered_run(stack: AirflowStack, dag_id: str, timeout: float = 120) -> dict:
    """The run of ``dag_id`` an asset event started, once there is one."""
    deadline = time.monotonic() + timeout
    while not (runs := stack._get_all(f"/api/v2/dags/{dag_id}/dagRuns?run_type=asset_triggered", "dag_runs")):
        assert time.monotonic() < deadline, f"no asset-triggered run of {dag_id} in {timeout} s"
        time.sleep(1)
    assert len(runs) == 1, runs
    return runs[0]


def test_restore_drill_of_the_newest_backup_records_its_rto(env):
    """After the copy operator's backup (the newest under the root), its store task's Asset event starts the
    drill DAG scheduled on it: it restores that backup and records how long that took; a max_age shorter than
    its age fails the drill, naming the age."""
    stack = env["stack"]
    run = asset_triggered_run(stack, "e2e_drill")
    assert stack.wait_for_run("e2e_drill", run["dag_run_id"], timeout=300) == "success", stack.task_log(
        "e2e_drill", run["dag_run_id"], "restore_drill"
    )[-3000:]
    events = stack._get_all("/api/v2/assets/events?source_dag_id=e2e_copy_operator", "asset_events")
    assert [e["uri"] for e in events] == [catalog_asset(str(env["backups"])).uri], events
    assert events[0]["source_task_id"] == "store_backup_label" and events[0]["source_run_id"] == "e2e_copier"
    drilled = stack.xcom("e2e_drill", run["dag_run_id"], "restore_drill")
    newest = env["backups"] / "e2e_copier"
    assert drilled["backup"] == str(newest) and drilled["ok"], drilled
    assert (
        0 < drilled["restore_s"] <= drilled["rto_s"]
        and drilled["checks"]["restore check"]["status"] == "PASS"
    )
    # The drill's record (the DAG's own verify_backup may record its check after it: both follow the store).
    (recorded,) = [v for v in read_info(newest).verifications if v["by"].startswith("drill ")]
    assert recorded["by"] == f"drill e2e_drill/{run['dag_run_id']}"
    assert recorded["ok"] and recorded["seconds"] > 0
    log = task_log(stack, "e2e_drill", run["dag_run_id"], "restore_drill", "drill: the restore took")
    assert f"drill: the restore took {drilled['restore_s']:.1f} s (RTO: {drilled['rto_s']:.1f} s" in log
    stack.trigger("e2e_drill", conf={"max_age": 0.5}, run_id="drill_too_old")
    assert stack.wait_for_run("e2e_drill", "drill_too_old", timeout=300) == "failed"
    log = task_log(stack, "e2e_drill", "drill_too_old", "restore_drill", "older than max_age")
    assert "older than max_age 0:00:00.500000: are the backups still running?" in log, log[-3000:]


def test_a_tar_backup_in_s3_by_the_copy_operator_is_drilled_and_restored_from_its_url(env, s3):
    """The copy operator writes tar+zstd archives (the tablespace's its own) into S3 under write load, the
    store task puts the label, manifest and catalog entry beside them; the drill of the S3 root checks and
    restores it; then pg-safe-backup restore of the URL alone (the store's own credentials) streams it into
    a new data directory that holds every committed row."""
    env["cluster"].sql("TRUNCATE ledger, spaced")  # the writer counts ids from 1 again
    completed = backup_under_write_load(env, "e2e_copy_s3", "e2e_s3", TABLES)
    assert completed["committed"] > 500, "the write load did not run during the backup"
    stack = env["stack"]
    drilled = drill(stack, "e2e_drill_s3", "drill_s3")
    assert drilled["backup"] == f"{S3_ROOT}/e2e_s3" and drilled["ok"], drilled
    for check in ("download", "page-LSN check", "pg_verifybackup", "restore check"):
        assert drilled["checks"][check]["status"] == "PASS", drilled["checks"]
    stored = {path.rsplit("/", 1)[-1] for path in s3.filesystem().ls(f"{BUCKET}/backups/e2e_s3")}
    assert {"base.tar.zst", "backup_label", "backup_manifest"} <= stored, stored
    entry = json.loads(s3.filesystem().cat(f"{BUCKET}/backups/e2e_s3.backup_info.json"))
    last = entry["verifications"][-1]
    assert last["by"] == "drill e2e_drill_s3/drill_s3" and last["ok"], last
    work = env["root"] / "restored_from_s3"
    work.mkdir()
    give_to_server_user(work)
    oid = env["cluster"].sql("SELECT oid FROM pg_tablespace WHERE spcname = 'space1'")[0][0]
    flags = ["--storage-option", f"endpoint_url={s3.endpoint_url}", "--storage-option", f"key={KEY}"]
    flags += ["--storage-option", f"secret={SECRET}", "--tablespace", f"{oid}={work / 'space1'}"]
    url = f"{S3_URL}/e2e_s3"
    done = run_cli("restore", url, work / "restored", "--wal-archive", env["archive"], *flags)
    assert done.returncode == 0, done.stderr
    with recovered(work / "restored") as server:
        rows = server.sql(invariant_sql(TABLES, completed["committed"]))
        assert len(rows) == len(TABLES) and all(ok for ok, _ in rows), rows


def test_the_workers_and_the_triggerer_send_their_metrics(env, statsd, completed_backup):
    """Airflow's StatsD, configured in every component: the hold task (a worker) counts the start, the
    holder's trigger its wait for the archive and its looks at Airflow (the triggerer), the store task the
    backup completed, with fixed names and no run, DAG or cluster in them."""
    started = statsd.arrived("backup.started")
    assert {d.tags["mode"] for d in started} == {"full"} and all(d.kind == "c" for d in started)
    assert statsd.arrived("wal_archive.wait")[0].kind == "ms"
    assert all(d.tags == {} for d in statsd.arrived("holder_check.duration"))
    completed = statsd.arrived("backup.completed")
    assert {(d.kind, d.value) for d in completed} == {("c", 1.0)}, completed
    ours = [d for d in statsd.received if "pg_safe_backup." in d.name]
    assert not [d for d in ours if "e2e" in d.name or any("e2e" in v for v in d.tags.values())], ours


@pytest.mark.skipif(chromium() is None, reason="Debian's chromium is not installed (scripts/prereqs.sh test)")
def test_the_backups_page_in_a_browser_shows_every_backup_and_the_link_opens_its_row(env, tmp_path):
    """A person's view, after the copy operator's backup: log in to Airflow's UI in a real browser, follow the
    store task's extra link (computed by the worker), find the backup's row, count the rows and the chart
    paths, and keep screenshots (the page, and the page in Airflow's UI) in $PGSB_ARTIFACTS, else the
    checkout's test-artifacts/ (what README's docs/ shows is such a pair)."""
    stack = env["stack"]
    path = "/api/v2/dags/e2e_copy_operator/dagRuns/e2e_copier/taskInstances/store_backup_label/links"
    link = stack._api("GET", path)["extra_links"]["Backup on the Backups page"]
    query = urlencode({"backup": str(env["backups"] / "e2e_copier")})
    assert link == f"{stack.api_url}{URL_PREFIX}{PAGE}?{query}"  # below [api] base_url
    proven = [Path(e.name).name for e in list_backups(env["backups"]) if e.proof.status == "proven"]
    assert "e2e_copier" in proven, proven
    artifacts = Path(os.environ.get("PGSB_ARTIFACTS") or Path(__file__).parents[1] / "test-artifacts")
    artifacts.mkdir(parents=True, exist_ok=True)
    user, password = stack.login
    with Browser(tmp_path / "profile", width=1500, height=1000) as browser:
        browser.open(f"{stack.api_url}/auth/login")
        browser.wait_for("document.querySelector('input[name=password]')", what="the login form")
        browser.type_into("input[name=username]", user)
        browser.type_into("input[name=password]", password)
        browser.wait_for("!document.querySelector('button[type=submit]').disabled", what="the form filled")
        browser.evaluate("document.querySelector('button[type=submit]').click()")
        browser.wait_for("!location.pathname.startsWith('/auth/')", what="the login to pass")

        browser.open(link)
        assert browser.evaluate("decodeURIComponent(location.hash.slice(1))").endswith("e2e_copier")
        row = "document.getElementById(decodeURIComponent(location.hash.slice(1)))"
        assert "e2e_copier" in browser.evaluate(f"{row}.innerText")
        shown = browser.evaluate("document.querySelectorAll('tbody tr[id]').length")
        assert shown == len(proven), browser.evaluate("document.body.innerText")[:3000]
        assert browser.evaluate("document.querySelectorAll('svg path').length") >= 1
        browser.screenshot(artifacts / "backups-page.png")

        browser.open(f"{stack.api_url}/plugin/pg-safe-backup")
        inner = "document.querySelector('iframe')?.contentDocument"
        browser.wait_for(
            f"{inner}?.querySelectorAll('tbody tr[id]').length === {len(proven)}",
            what="the page inside Airflow's UI",
        )
        browser.screenshot(artifacts / "backups-page-in-airflow.png")
