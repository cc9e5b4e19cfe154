"""The Backups page (pg_safe_backup.plugins.backups) and the store task's link to it: real backups stored by
the store's own code, an Airflow API app built by Airflow's ``create_app`` with the provider's plugin, its
SimpleAuthManager's tokens; the rows, charts and cache (pg_safe_backup.backups_page) without Airflow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import pytest

from pg_safe_backup.backups_page import BackupsCache, root_of
from pg_safe_backup.catalog import append_verification, entry_path, read_info, write_info
from pg_safe_backup.files.copier import copy_data_directory
from pg_safe_backup.get_provider_info import get_provider_info
from pg_safe_backup.hooks.backup import PostgresBackupHook
from pg_safe_backup.links import BackupsPageLink, page_url, stored_folder
from pg_safe_backup.operators.backup import PostgresStoreBackupLabelOperator
from pg_safe_backup.store import store_backup

from backup_helpers import cluster_with_space, linked_copy, run_backup
from conftest import CONN_ID, ROOT, pyproject

#: The backups under the root: folder below it -> the DAG that took it (None: the CLI).
BACKUPS = {"main/b0": "page_a", "main/b1": "page_b", "b2": None}
DRILL_S = 12.5


def stored(cluster: Any, folder: Path, dag_id: str | None) -> dict[str, Any]:
    """A whole backup of ``cluster`` copied into ``folder`` and stored by the store task's code
    (:func:`store_backup`): its result, the store task's XCom."""
    owner = f"{dag_id or 'cli'}/manual/backup"
    backup = run_backup(
        PostgresBackupHook(CONN_ID), owner, lambda: copy_data_directory(cluster.datadir, folder, fsync=False)
    )
    run = {"dag_id": dag_id, "run_id": "manual", "task_id": "store"} if dag_id else None
    return store_backup(folder, backup, None, run)


@pytest.fixture(scope="module")
def fleet(module_tmp_root: Path) -> Iterator[tuple[Path, dict[str, dict[str, Any]]]]:
    """The root and each backup's store result; b0 has a drill's record."""
    root = module_tmp_root / "backups"
    with cluster_with_space(module_tmp_root) as (cluster, _, _):
        results = {name: stored(cluster, root / name, dag) for name, dag in BACKUPS.items()}
    record = {"ok": True, "by": "drill page_a/manual", "seconds": DRILL_S, "summary": "restored"}
    append_verification(root / "main/b0", record)
    yield root, results


@pytest.fixture(scope="module")
def airflow_env(module_tmp_root: Path, fleet: tuple[Path, dict]) -> dict[str, str]:
    """An Airflow home with a migrated metadata database that knows the DAGs page_a and page_b, and the
    environment that builds its API with the page on ``fleet``'s root."""
    dags = module_tmp_root / "dags"
    dags.mkdir()
    for dag_id in ("page_a", "page_b"):
        (dags / f"{dag_id}.py").write_text(
            "from airflow.sdk import DAG\n"
            "from airflow.providers.standard.operators.empty import EmptyOperator\n"
            f"with DAG({dag_id!r}, schedule=None):\n"
            "    EmptyOperator(task_id='t')\n"
        )
    keep = ("PATH", "HOME", "LANG", "TMPDIR")
    env = {k: v for k, v in os.environ.items() if k in keep}
    env.update(
        {
            "PYTHONPATH": os.pathsep.join(str(ROOT / p) for p in ("core", "provider", "tests", ".")),
            "AIRFLOW_HOME": str(module_tmp_root / "airflow_home"),
            "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            # The provider's plugins load from its provider info (the airflow.plugins entry point needs
            # the package installed again after pyproject.toml changed; test_the_plugin_is_registered...).
            "AIRFLOW__CORE__LAZY_DISCOVER_PROVIDERS": "False",
            "AIRFLOW__CORE__AUTH_MANAGER": "page_client.OneDagAuthManager",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin,one:viewer",
            "AIRFLOW__API_AUTH__JWT_SECRET": "page-test-secret",
            "AIRFLOW__API__BASE_URL": "http://airflow.example:8080",
            "AIRFLOW__PG_SAFE_BACKUP__CATALOG_ROOTS": str(fleet[0]),
            "PGSB_PAGE_ONE_DAG": "one:page_a",
        }
    )
    airflow = str(Path(sys.executable).with_name("airflow"))
    for command in (["db", "migrate"], ["dags", "reserialize"]):
        done = subprocess.run([airflow, *command], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    return env


def ask(env: dict[str, str], *requests: dict[str, Any]) -> list[dict[str, Any]]:
    """The answers of the app Airflow builds to ``requests`` (tests/page_client.py)."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "page_client.py"), json.dumps(list(requests))],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (line,) = [x for x in done.stdout.splitlines() if x.startswith("PAGE-CLIENT ")]
    return json.loads(line.removeprefix("PAGE-CLIENT "))


ADMIN = {"user": "admin", "role": "ADMIN"}
ONE = {"user": "one", "role": "VIEWER"}


@pytest.fixture(scope="module")
def answers(airflow_env: dict[str, str], fleet: tuple[Path, dict]) -> dict[str, dict[str, Any]]:
    """One app, every request of the tests below (building the app takes seconds)."""
    root, results = fleet
    link = urlsplit(page_url(stored_folder(results["main/b1"]) or "?"))
    asked = {
        "anonymous page": {"path": "/pg-safe-backup/backups"},
        "anonymous api": {"path": "/pg-safe-backup/api/backups"},
        "admin page": {"path": "/pg-safe-backup/backups", **ADMIN},
        "admin api": {"path": "/pg-safe-backup/api/backups", **ADMIN},
        "one page": {"path": "/pg-safe-backup/backups", **ONE},
        "one api": {"path": "/pg-safe-backup/api/backups", **ONE},
        "unknown root": {"path": "/pg-safe-backup/api/backups?root=/etc", **ADMIN},
        "link": {"path": f"{link.path}?{link.query}", **ADMIN},
        "plugins": {"path": "/api/v2/plugins", **ADMIN},
    }
    return dict(zip(asked, ask(airflow_env, *asked.values()), strict=True))


def test_an_anonymous_request_is_refused(answers):
    assert answers["anonymous page"]["status"] == 401
    assert answers["anonymous api"]["status"] == 401
    assert answers["anonymous page"]["rows"] == []


def test_a_user_who_may_read_every_dag_sees_every_backup_and_the_charts(answers):
    page = answers["admin page"]
    assert page["status"] == 200
    assert sorted(page["rows"]) == sorted(BACKUPS)  # the CLI's backup (no DAG) too
    assert (
        page["paths"] == 2
    )  # the duration of one cluster, the drill's restore time (no size without records)
    backups = {b["id"]: b for b in answers["admin api"]["json"]["backups"]}
    assert {i: b["dag_id"] for i, b in backups.items()} == BACKUPS
    assert backups["main/b0"]["drill_restore_s"] == DRILL_S
    assert all(b["status"] == "proven" for b in backups.values())
    assert answers["admin api"]["json"]["hidden"] == 0


def test_a_user_allowed_one_dag_sees_only_its_backups(answers):
    assert answers["one page"]["status"] == 200
    assert answers["one page"]["rows"] == ["main/b0"]
    assert [b["id"] for b in answers["one api"]["json"]["backups"]] == ["main/b0"]
    assert answers["one api"]["json"]["hidden"] == 2


def test_a_root_not_configured_is_refused_naming_the_parameter(answers):
    assert answers["unknown root"]["status"] == 404
    assert answers["unknown root"]["json"]["detail"].startswith("root '/etc' is not one of")


def test_the_page_is_a_plugin_airflow_lists_with_its_menu_entry(answers):
    (plugin,) = [p for p in answers["plugins"]["json"]["plugins"] if p["name"] == "pg_safe_backup"]
    assert [a["url_prefix"] for a in plugin["fastapi_apps"]] == ["/pg-safe-backup"]
    assert [v["href"] for v in plugin["external_views"]] == ["/pg-safe-backup/backups"]


def test_the_store_tasks_link_opens_the_stored_backup_at_its_row(answers, fleet):
    root, results = fleet
    folder = stored_folder(results["main/b1"])
    assert folder == str(root / "main/b1")
    assert page_url(folder).startswith("http://") or page_url(folder).startswith("/")
    assert answers["link"]["status"] == 303
    assert answers["link"]["location"] == f"?root={quote(str(root), safe='')}#main/b1"
    assert any(
        isinstance(link, BackupsPageLink) for link in PostgresStoreBackupLabelOperator.operator_extra_links
    )


def test_a_store_that_stored_nothing_gets_no_link():
    assert stored_folder(None) is None
    assert stored_folder({"backup_label": "/b/backup_label"}) is None


def test_the_roots_are_matched_by_folder_not_by_text():
    roots = ["/backups/main", "/backups/main2", "s3://aws@bucket/db1"]
    assert root_of("/backups/main2/b0/", roots) == "/backups/main2"
    assert root_of("/backups/main/x/../b0", roots) == "/backups/main"
    assert root_of("s3://aws@bucket/db1/2026-01-01/", roots) == "s3://aws@bucket/db1"
    assert root_of("/backups/mainly/b0", roots) is None


def test_the_cache_shows_a_new_backup_and_a_new_check_and_proves_only_what_changed(fleet, tmp_root):
    root = tmp_root / "root"
    for name in BACKUPS:
        linked_copy(fleet[0] / name, root / name)
        write_info(root / name, read_info(fleet[0] / name))
    cache = BackupsCache()
    first = cache.rows(str(root), root)
    assert [r.id for r in first] == ["main/b0", "main/b1", "b2"]  # by stop time
    assert cache.rows(str(root), root) is first  # nothing changed: not listed again
    linked_copy(root / "b2", root / "late" / "b3")
    write_info(root / "late" / "b3", read_info(root / "b2"))
    assert sorted(r.id for r in cache.rows(str(root), root)) == sorted([*BACKUPS, "late/b3"])
    assert {r.id: r.verified for r in cache.rows(str(root), root)}["main/b1"] == "never"
    append_verification(root / "main/b1", {"ok": False, "by": "pg-safe-backup verify"})
    assert {r.id: r.verified for r in cache.rows(str(root), root)}["main/b1"] == "FAILED"
    entry_path(root / "b2").unlink()
    assert {r.id: r.dag_id for r in cache.rows(str(root), root)}["b2"] is None


def test_the_plugin_is_registered_by_entry_point_and_provider_info():
    from pg_safe_backup.plugins.backups import BackupsPagePlugin

    info = get_provider_info()
    assert info["plugins"] == [
        {"name": BackupsPagePlugin.name, "plugin-class": "pg_safe_backup.plugins.backups.BackupsPagePlugin"}
    ]
    assert info["extra-links"] == ["pg_safe_backup.links.BackupsPageLink"]
    points = pyproject()["project"]["entry-points"]["airflow.plugins"]
    # ENTRY_POINT is the plugin while lazy discovery is on (test_provider.py: registered once either way)
    assert points == {"pg_safe_backup": "pg_safe_backup.plugins.backups:ENTRY_POINT"}
    assert "catalog_roots" in info["config"]["pg_safe_backup"]["options"]
