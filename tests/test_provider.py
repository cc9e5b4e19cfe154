"""Provider metadata, DAG wiring and parameter validation (no database needed)."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from airflow.sdk import DAG
from airflow.providers.standard.operators.empty import EmptyOperator

from pg_safe_backup.operators.backup import PostgresBackupHoldOperator, PostgresStoreBackupLabelOperator
from pg_safe_backup.task_group import PostgresOnlineBackup
from pg_safe_backup.triggers.backup import BackupHolderTrigger, BackupStateTrigger

ROOT = Path(__file__).resolve().parents[1]


def test_airflow_providers_list_shows_the_provider(tmp_path):
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path), "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
    out = subprocess.run([str(Path(sys.executable).with_name("airflow")), "providers", "list", "-o", "json"],
                         env=env, capture_output=True, text=True, timeout=120, check=True).stdout
    names = {p["package_name"] for p in json.loads(out[out.index("["):])}
    assert "airflow-provider-pg-safe-backup" in names


def test_example_dag_wiring_and_serialization():
    from airflow.serialization.serialized_objects import DagSerialization

    sys.path.insert(0, str(ROOT / "example_dags"))
    try:
        dag = importlib.import_module("pg_backup_example").dag
    finally:
        sys.path.pop(0)
    tasks = {t.task_id: t for t in dag.tasks}
    gate, finish = tasks["backup.wait_for_backup_mode"], tasks["backup.finish_backup"]
    copy, hold = tasks["backup.copy_data_directory"], tasks["backup.hold_backup_session"]
    assert copy.upstream_task_ids == {gate.task_id}
    assert finish.is_teardown and gate.is_setup and finish.on_failure_fail_dagrun
    assert finish.trigger_rule == "all_done"  # ends the backup even when the gate failed
    assert finish.upstream_task_ids == {gate.task_id, copy.task_id}
    assert hold.upstream_task_ids == set() and hold.retries == 0 and hold.deferrable
    assert tasks["store_backup_label"].upstream_task_ids == {finish.task_id}
    restored = DagSerialization.from_dict(DagSerialization.to_dict(dag))
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


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"backup_timeout": -1}, "backup_timeout"),
        ({"backup_timeout": "3600"}, "backup_timeout"),
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
        PostgresBackupHoldOperator(task_id="hold", **kwargs)


def test_hostile_label_is_accepted_as_a_parameter_value():
    op = PostgresBackupHoldOperator(task_id="hold", label="it's; DROP TABLE backup; --")
    assert op.pg_label == "it's; DROP TABLE backup; --"


def test_store_needs_a_backup():
    with pytest.raises(ValueError, match="backup"):
        PostgresStoreBackupLabelOperator(task_id="s", backup=42, destination="/tmp/x")
    with pytest.raises(ValueError, match="destination"):
        PostgresStoreBackupLabelOperator(task_id="s", backup="b.finish_backup", destination="")


def test_triggers_serialize_to_their_own_classpath():
    hook_kwargs = {"postgres_conn_id": "c", "database": None, "table": "backup", "schema": "public"}
    for trig in (BackupHolderTrigger(hook_kwargs, owner="d/r/b", holder_try=1, label="l"),
                 BackupStateTrigger(hook_kwargs, owner="d/r/b", until="started")):
        path, kwargs = trig.serialize()
        module, _, name = path.rpartition(".")
        again = getattr(importlib.import_module(module), name)(**kwargs)
        assert again.serialize() == (path, kwargs)
        assert "password" not in json.dumps(kwargs)
