"""Provider metadata, DAG wiring and parameter validation (no database needed)."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.sdk import DAG

from pg_safe_backup.operators.backup import PostgresStartBackupOperator, PostgresStoreBackupLabelOperator
from pg_safe_backup.task_group import PostgresOnlineBackup
from pg_safe_backup.triggers.backup import (
    PostgresBackupStartedTrigger,
    PostgresFinishBackupTrigger,
    PostgresHoldBackupTrigger,
)

from conftest import serialization_round_trip

ROOT = Path(__file__).resolve().parents[1]


def test_airflow_providers_list_shows_the_provider(tmp_path):
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path), "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
    out = subprocess.run(
        [str(Path(sys.executable).with_name("airflow")), "providers", "list", "-o", "json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    names = {p["package_name"] for p in json.loads(out[out.index("[") :])}
    assert "airflow-provider-pg-safe-backup" in names


def example_dag(module: str) -> DAG:
    """The ``dag`` of ``example_dags/<module>.py``."""
    sys.path.insert(0, str(ROOT / "example_dags"))
    try:
        return importlib.import_module(module).dag
    finally:
        sys.path.pop(0)


def test_example_dag_wiring_and_serialization():
    dag = example_dag("pg_backup_example")
    tasks = {t.task_id: t for t in dag.tasks}
    gate, finish = tasks["backup.wait_for_backup_mode"], tasks["backup.finish_backup"]
    copy, hold = tasks["backup.copy_data_directory"], tasks["backup.hold_backup_session"]
    assert copy.upstream_task_ids == {gate.task_id}
    assert finish.is_teardown and gate.is_setup and finish.on_failure_fail_dagrun
    assert finish.trigger_rule == "all_done"  # ends the backup even when the gate failed
    assert finish.upstream_task_ids == {gate.task_id, copy.task_id}
    assert hold.upstream_task_ids == set() and hold.retries == 0 and hold.deferrable
    assert tasks["store_backup_label"].upstream_task_ids == {finish.task_id}
    restored = serialization_round_trip(dag)
    assert {t.task_id for t in restored.tasks} == set(tasks)


def test_group_without_copy_task_is_refused():
    with DAG("empty_group", schedule=None):
        with pytest.raises(ValueError, match="no copy task"):
            with PostgresOnlineBackup(group_id="b", postgres_conn_id="x"):
                pass


def test_two_clusters_in_one_dag_get_distinct_backup_keys():
    with DAG("many", schedule=None) as dag:
        for name in ("east", "west"):
            with PostgresOnlineBackup(group_id=name, postgres_conn_id=f"pg_{name}"):
                EmptyOperator(task_id="copy")
    keys = {t.task_id: t.backup_key for t in dag.tasks if hasattr(t, "backup_key")}
    assert keys["east.hold_backup_session"] == "east" and keys["west.finish_backup"] == "west"


def test_nested_groups_with_the_same_local_id_get_distinct_backup_keys():
    """Two PostgresOnlineBackup(group_id="backup") in two parent groups are two backups, not one."""
    from airflow.sdk import TaskGroup

    with DAG("nested", schedule=None) as dag:
        for parent in ("east", "west"):
            with TaskGroup(parent):
                with PostgresOnlineBackup(group_id="backup", postgres_conn_id=f"pg_{parent}"):
                    EmptyOperator(task_id="copy")
    keys = {t.task_id: t.backup_key for t in dag.tasks if hasattr(t, "backup_key")}
    assert keys["east.backup.hold_backup_session"] == "east.backup"
    assert keys["west.backup.hold_backup_session"] == "west.backup"
    assert keys["west.backup.wait_for_backup_mode"] == keys["west.backup.finish_backup"] == "west.backup"
    holds = {t.task_id: t.finish_task_id for t in dag.tasks if isinstance(t, PostgresStartBackupOperator)}
    assert holds == {
        "east.backup.hold_backup_session": "east.backup.finish_backup",
        "west.backup.hold_backup_session": "west.backup.finish_backup",
    }


def test_the_owner_carries_the_map_index():
    from pg_safe_backup.state import BackupRef

    assert (
        BackupRef("d", "scheduled__2026-11-24", "clusters.backup").owner
        == "d/scheduled__2026-11-24/clusters.backup"
    )
    assert BackupRef("d", "r", "clusters.backup", map_index=2).owner == "d/r/clusters.backup[2]"


def test_a_mapped_group_over_connection_ids_parses_and_serializes():
    """`@task_group` + `expand` over connection ids: the connection id is rendered per map index."""
    from airflow.sdk import task_group

    with DAG("mapped", schedule=None) as dag:

        @task_group(group_id="clusters")
        def one_cluster(conn_id: str):
            with PostgresOnlineBackup(group_id="backup", postgres_conn_id=conn_id):
                EmptyOperator(task_id="copy")

        one_cluster.expand(conn_id=["pg_a", "pg_b", "pg_c"])
    tasks = {t.task_id: t for t in dag.tasks}
    hold = tasks["clusters.backup.hold_backup_session"]
    assert "postgres_conn_id" in hold.template_fields
    assert hold.backup_key == "clusters.backup"
    restored = serialization_round_trip(dag)
    assert {t.task_id for t in restored.tasks} == set(tasks)


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"backup_timeout": -1}, "backup_timeout"),
        ({"backup_timeout": "an hour"}, "backup_timeout"),
        ({"backup_timeout": True}, "backup_timeout"),
        ({"poll_interval": 0}, "poll_interval"),
        ({"table": ""}, "table"),
        ({"table": 'backup"; DROP TABLE x; --'}, "table"),
        ({"table_schema": "a b"}, "table_schema"),
        ({"label": ""}, "label"),
        ({"label": "two\nlines"}, "label"),
        ({"label": "x" * 2000}, "label"),
        ({"postgres_conn_id": ""}, "postgres_conn_id"),
        ({"fast_checkpoint": "yes"}, "fast_checkpoint"),
    ],
)
def test_bad_parameters_name_the_parameter(kwargs, param):
    with pytest.raises(ValueError, match=param):
        PostgresStartBackupOperator(task_id="hold", **kwargs)


def test_hostile_label_is_accepted_as_a_parameter_value():
    op = PostgresStartBackupOperator(task_id="hold", label="it's; DROP TABLE backup; --")
    assert op.pg_label == "it's; DROP TABLE backup; --"


def test_store_needs_a_backup():
    with pytest.raises(ValueError, match="backup"):
        PostgresStoreBackupLabelOperator(task_id="s", backup=42, destination="/tmp/x")
    with pytest.raises(ValueError, match="destination"):
        PostgresStoreBackupLabelOperator(task_id="s", backup="b.finish_backup", destination="")


def test_triggers_serialize_to_their_own_classpath():
    hook_kwargs = {"postgres_conn_id": "c", "database": None, "table": "backup", "schema": "public"}
    ref = {
        "dag_id": "d",
        "run_id": "r",
        "backup_key": "b",
        "map_index": 2,
        "hold_task_id": "b.hold",
        "finish_task_id": "b.finish",
    }
    for trig in (
        PostgresHoldBackupTrigger(
            hook_kwargs, request={"owner": "d/r/b[2]", "attempt": "0193-uuid", "label": "l"}, ref=ref
        ),
        PostgresBackupStartedTrigger(hook_kwargs, ref=ref, timeout=60),
        PostgresFinishBackupTrigger(
            hook_kwargs, attempt="0193-uuid", start_lsn="0/2000028", copy_problem=None
        ),
    ):
        path, kwargs = trig.serialize()
        module, _, name = path.rpartition(".")
        again = getattr(importlib.import_module(module), name)(**kwargs)
        assert again.serialize() == (path, kwargs)
        assert "password" not in json.dumps(kwargs)


def test_names_before_the_rename_still_work():
    """Postgres<Verb><Object>: the old operator name warns, and a trigger row written with an old class path
    still finds its class after an upgrade."""
    from airflow.exceptions import AirflowProviderDeprecationWarning

    import pg_safe_backup.operators.backup as operators
    import pg_safe_backup.triggers.backup as triggers

    with pytest.warns(AirflowProviderDeprecationWarning, match="PostgresStartBackupOperator"):
        assert operators.PostgresBackupHoldOperator is PostgresStartBackupOperator
    with pytest.raises(AttributeError):
        operators.NoSuchOperator  # noqa: B018
    assert triggers.BackupHolderTrigger is PostgresHoldBackupTrigger
    assert triggers.BackupStartedTrigger is PostgresBackupStartedTrigger
    assert triggers.BackupFinishTrigger is PostgresFinishBackupTrigger


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"format": "zip"}, "format must be one of plain, tar"),
        ({"compression": "gzip"}, "compression='gzip' needs format='tar'"),
        ({"format": "tar", "compression": "lz4"}, "compression"),
        ({"parallel": 0}, "parallel"),
        ({"overwrite": "yes"}, "overwrite"),
        ({"source": ""}, "source"),
    ],
)
def test_copy_operator_parameters_are_checked_naming_them(kwargs, error):
    from pg_safe_backup.operators.copy import PostgresCopyDataDirectoryOperator

    with pytest.raises((ValueError, TypeError), match=error):
        PostgresCopyDataDirectoryOperator(task_id="c", **{"source": "/pgdata", "destination": "/b", **kwargs})


def test_the_drill_example_runs_on_the_asset_the_backup_examples_store_tasks_update():
    backup, rsync = example_dag("pg_backup_example"), example_dag("pg_backup_rsync_example")
    drill = example_dag("pg_restore_drill_example")
    stored = [dag.get_task("store_backup_label").outlets for dag in (backup, rsync)]
    assert stored[0] == stored[1] == [drill.timetable.asset_condition] != []
    assert drill.timetable.asset_condition.uri == "file:///backups"


def test_a_failed_task_of_the_backup_example_calls_its_notifier(tmp_path, monkeypatch, task_context):
    """Every task of the group, and the store task, name the example's notifier; it writes one line."""
    dag = example_dag("pg_backup_example")
    callbacks = {t.task_id: t.on_failure_callback for t in dag.tasks}
    assert all(callbacks.values()), callbacks
    store = dag.get_task("store_backup_label")
    monkeypatch.setenv("PG_BACKUP_FAILURE_LOG", str(tmp_path / "failures"))
    context = {**task_context(store), "exception": OSError("No space left on device\non /backups")}
    notifier = store.on_failure_callback[0] if isinstance(store.on_failure_callback, list) else None
    (notifier or store.on_failure_callback)(context)
    line = (tmp_path / "failures").read_text()
    assert line == (
        "pg-safe-backup: pg_backup_example manual__templating store_backup_label failed: No space left on"
        " device on /backups\n"
    )


def test_restore_drill_example_dag_serializes():
    dag = example_dag("pg_restore_drill_example")
    drill = dag.get_task("restore_drill")
    assert drill.max_age == 30 * 3600 and drill.template_fields[:2] == ("root", "wal_archive")
    assert dag.get_task("retention").upstream_task_ids == {"restore_drill"}  # a failed drill deletes nothing
    restored = serialization_round_trip(dag)
    assert sorted(t.task_id for t in restored.tasks) == ["restore_drill", "retention"]


def test_pip_installs_the_pg_safe_backup_console_script(tmp_path):
    """`pip install` (here: the venv's editable install) puts `pg-safe-backup` beside the interpreter."""
    from importlib.metadata import entry_points

    scripts = {
        ep.name: ep.value for ep in entry_points(group="console_scripts") if ep.name == "pg-safe-backup"
    }
    # pg_safe_backup.__main__:main: the spool shortcut of wal-push, then pg_safe_backup.cli.main
    assert scripts == {"pg-safe-backup": "pg_safe_backup.__main__:main"}
    script = Path(sys.executable).with_name("pg-safe-backup")
    listed = subprocess.run([str(script), "list", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0 and listed.stdout.strip().endswith("0 backups"), (
        listed.stdout + listed.stderr
    )
    for command in ("list", "verify", "retention", "restore"):
        shown = subprocess.run([str(script), command, "--help"], capture_output=True, text=True, timeout=60)
        assert shown.returncode == 0 and "example" in shown.stdout, shown.stdout


def test_every_module_the_provider_metadata_lists_imports():
    """Airflow's ProvidersManager imports what get_provider_info lists; the retention operator is there."""
    from pg_safe_backup.get_provider_info import get_provider_info

    info = get_provider_info()
    modules = [
        m for kind in ("operators", "sensors", "hooks", "triggers") for m in info[kind][0]["python-modules"]
    ]
    assert "pg_safe_backup.operators.lifecycle" in modules
    for module in modules:
        importlib.import_module(module)
    assert hasattr(
        importlib.import_module("pg_safe_backup.operators.lifecycle"), "PostgresBackupRetentionOperator"
    )


def test_the_provider_metadata_holds_to_airflows_schema_and_its_plugin_and_link_import():
    """ProvidersManager validates the metadata, then imports each plugin class and extra link it names."""
    import jsonschema

    import airflow
    from airflow.sdk import BaseOperatorLink

    from pg_safe_backup.get_provider_info import get_provider_info

    info = get_provider_info()
    schema = json.loads((Path(airflow.__file__).parent / "provider_info.schema.json").read_text())
    jsonschema.validate(info, schema)
    for plugin in info["plugins"]:
        module, _, name = plugin["plugin-class"].rpartition(".")
        assert getattr(importlib.import_module(module), name).name == plugin["name"]
    for link in info["extra-links"]:
        module, _, name = link.rpartition(".")
        assert issubclass(getattr(importlib.import_module(module), name), BaseOperatorLink)


def test_the_shared_keywords_take_default_args_on_hold_gate_and_finish():
    """Declared once on the base operator, the connection keywords still come from a DAG's default_args."""
    from pg_safe_backup.operators.backup import PostgresFinishBackupOperator
    from pg_safe_backup.sensors.backup import PostgresBackupStartedSensor

    defaults = {"postgres_conn_id": "pg_x", "table": "backups", "poll_interval": 2}
    with DAG("defaults", schedule=None, default_args=defaults):
        tasks = [
            PostgresStartBackupOperator(task_id="hold"),
            PostgresBackupStartedSensor(task_id="gate", holder_task_id="hold", timeout=30),
            PostgresFinishBackupOperator(task_id="finish", gate_task_id="gate"),
        ]
    for task in tasks:
        assert (task.postgres_conn_id, task.table, task.poll_interval) == ("pg_x", "backups", 2), task.task_id


def _domain_errors() -> list:
    from pg_safe_backup.files.copier import CopyError, DestinationNotEmpty
    from pg_safe_backup.files.pgcontrol import CopyMismatch
    from pg_safe_backup.store import StoreFailed, StoreRefused
    from pg_safe_backup.verify import CheckNotRun

    return [
        (CopyError("x"), True),
        (DestinationNotEmpty("x"), False),
        (CheckNotRun("x"), True),
        (CopyMismatch("x"), False),
        (StoreFailed("x"), True),
        (StoreRefused("x"), False),
    ]


@pytest.mark.parametrize(("err", "retried"), _domain_errors(), ids=lambda v: type(v).__name__)
def test_a_domain_error_ends_a_task_by_its_branch_of_the_error_tree(err, retried):
    from airflow.providers.common.compat.sdk import AirflowException, AirflowFailException

    from pg_safe_backup.utils.mixins import task_error

    raised = task_error(err, "the task's message")
    assert isinstance(raised, AirflowException)
    assert isinstance(raised, AirflowFailException) is not retried
    assert str(raised) == "the task's message"


@pytest.mark.parametrize("lazy", ["True", "False"])
def test_the_backups_page_plugin_is_registered_once_whatever_lazy_discover_providers_says(lazy, tmp_path):
    """Through the ``airflow.plugins`` entry point (lazy discovery, the default) or provider info (without
    it): one plugin, and no plugin import error for the UI to show."""
    probe = (
        "from airflow import plugins_manager as pm\n"
        "loaded = pm._get_plugins() if hasattr(pm, '_get_plugins') else None\n"
        "if loaded is None:\n"
        "    pm.ensure_plugins_loaded()\n"
        "    loaded = (pm.plugins, pm.import_errors)\n"
        "plugins, errors = loaded\n"
        "print(sum(p.name == 'pg_safe_backup' for p in plugins), sorted(errors))\n"
    )
    env = {
        **os.environ,
        "AIRFLOW__CORE__LAZY_DISCOVER_PROVIDERS": lazy,
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(tmp_path),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    }
    shown = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=300
    )
    assert shown.returncode == 0, shown.stderr[-3000:]
    assert shown.stdout.strip().splitlines()[-1] == "1 []", shown.stdout
