"""Templated parameters render, are checked as rendered, and failures a retry cannot fix end the task
for good.

Templates render through each operator's own ``render_template_fields`` with the context the Task SDK builds
for a manual run (``task_context`` in conftest.py). The failures come from real backups on throwaway
clusters, through the session functions the triggers run.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from airflow.providers.common.compat.sdk import AirflowException, AirflowFailException
from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.sdk import DAG, task_group

from pg_safe_backup.operators.backup import PostgresStoreBackupLabelOperator, PostgresVerifyBackupOperator
from pg_safe_backup.session import FAILED, finish_backup, hold_backup, wait_for_start
from pg_safe_backup.task_group import PostgresOnlineBackup

from backup_helpers import backup_starts, copy_data_dir, finish, gate, req, run_backup, started
from conftest import CONN_ID, serialization_round_trip

#: Every templated parameter of the group, as a template of the run's conf (params).
GROUP_TEMPLATES = {
    "postgres_conn_id": "{{ params.conn }}",
    "state_conn_id": "{{ params.conn }}_state",
    "database": "{{ params.db }}",
    "backup_timeout": "{{ params.timeout }}",
    "fast_checkpoint": "{{ params.fast }}",
    "wait_for_archive": "{{ params.archive }}",
    "label": "nightly {{ params.db }} {{ run_id }}",
}
GOOD = {"conn": CONN_ID, "db": "postgres", "timeout": "90", "fast": "true", "archive": "False"}


def templated_dag(**group_kwargs) -> DAG:
    """A DAG (retries=2 for every task, as many deployments set) with one backup group and the tasks after."""
    kwargs = {**GROUP_TEMPLATES, **group_kwargs}
    with DAG(
        "templated",
        schedule=None,
        params={**GOOD, "dir": "/nonexistent", "archive_dir": "/nonexistent"},
        default_args={"retries": 2, "retry_delay": timedelta(seconds=1)},
    ) as dag:
        with PostgresOnlineBackup(group_id="backup", poll_interval=0.5, **kwargs) as backup:
            EmptyOperator(task_id="copy")
        store = PostgresStoreBackupLabelOperator(
            task_id="store_backup_label", backup=backup, destination="{{ params.dir }}/{{ run_id }}"
        )
        store >> PostgresVerifyBackupOperator(
            task_id="verify_backup", backup_dir="{{ params.dir }}", wal_archive="{{ params.archive_dir }}"
        )
    return dag


def rendered_task(task_context, dag: DAG, task_id: str, conf: dict | None = None):
    """The task with its template fields rendered for a run with ``conf``, and that run's context."""
    task = dag.get_task(task_id)
    context = task_context(task, conf)
    task.render_template_fields(context)
    return task, context


# ----------------------------------------------------------------------------------------------- rendering


@pytest.mark.parametrize(
    "task_id", ["backup.hold_backup_session", "backup.wait_for_backup_mode", "backup.finish_backup"]
)
def test_connection_fields_render_on_each_task_of_the_group(task_context, task_id):
    task, _ = rendered_task(task_context, templated_dag(), task_id, {"conn": "pg_east", "db": "app"})
    assert task.postgres_conn_id == "pg_east"
    assert task.state_conn_id == "pg_east_state"
    assert task.database == "app"


def test_hold_parameters_render_and_become_the_bools_and_numbers_they_spell(task_context):
    """Airflow renders to text (render_template_as_native_obj is off by default): "90" is 90 seconds and
    "true"/"False" are bools, in the trigger the hold defers on."""
    hold, context = rendered_task(task_context, templated_dag(), "backup.hold_backup_session")
    assert (hold.backup_timeout, hold.fast_checkpoint, hold.wait_for_archive) == ("90", "true", "False")
    classpath, kwargs = hold.hold_trigger(context).serialize()
    request = kwargs["request"]
    assert classpath.endswith("PostgresHoldBackupTrigger")
    assert request["backup_timeout"] == 90.0
    assert request["fast_checkpoint"] is True
    assert request["wait_for_archive"] is False
    assert request["label"] == "nightly postgres manual__templating"
    assert kwargs["hook_kwargs"]["postgres_conn_id"] == CONN_ID
    assert kwargs["hook_kwargs"]["state_conn_id"] == f"{CONN_ID}_state"
    assert kwargs["hook_kwargs"]["database"] == "postgres"


def test_native_rendering_keeps_bools_and_numbers(task_context):
    dag = templated_dag()
    dag.render_template_as_native_obj = True
    hold, context = rendered_task(
        task_context, dag, "backup.hold_backup_session", {"timeout": 0, "fast": False}
    )
    assert (hold.backup_timeout, hold.fast_checkpoint) == (0, False)
    request = hold.hold_trigger(context).serialize()[1]["request"]
    assert (request["backup_timeout"], request["fast_checkpoint"]) == (0, False)


def test_store_and_verify_paths_render(task_context):
    conf = {"dir": "/backups/east", "archive_dir": "/archive/east"}
    store, _ = rendered_task(task_context, templated_dag(), "store_backup_label", conf)
    verify, _ = rendered_task(task_context, templated_dag(), "verify_backup", conf)
    assert store.destination == "/backups/east/manual__templating"
    assert (verify.backup_dir, verify.wal_archive) == ("/backups/east", "/archive/east")


def test_a_mapped_group_maps_over_hold_parameters():
    """`@task_group` + `expand`: a per-cluster timeout and checkpoint are argument objects until run time,
    not values refused when the DAG is parsed."""
    with DAG("mapped_hold", schedule=None) as dag:

        @task_group(group_id="clusters")
        def one_cluster(timeout: float, fast: bool):
            with PostgresOnlineBackup(group_id="backup", backup_timeout=timeout, fast_checkpoint=fast):
                EmptyOperator(task_id="copy")

        one_cluster.expand(timeout=[60, 3600], fast=[True, False])
    hold = dag.get_task("clusters.backup.hold_backup_session")
    assert {"backup_timeout", "fast_checkpoint"} <= set(hold.template_fields)
    restored = serialization_round_trip(dag)
    assert {t.task_id for t in restored.tasks} == {t.task_id for t in dag.tasks}


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"backup_timeout": "an hour"}, "backup_timeout"),
        ({"fast_checkpoint": "yes"}, "fast_checkpoint"),
        ({"wait_for_archive": 1}, "wait_for_archive"),
        ({"database": 5}, "database"),
        ({"label": "two\nlines"}, "label"),
    ],
)
def test_a_value_that_is_not_a_template_is_still_checked_at_parse_time(kwargs, param):
    with pytest.raises(ValueError, match=param):
        templated_dag(**kwargs)


# ------------------------------------------------------------------------------- checks of rendered values


BAD_RENDERED = [
    ({"timeout": "abc"}, "backup_timeout", "must be a number of seconds, got 'abc'"),
    ({"timeout": "-1"}, "backup_timeout", "must be >= 0, got -1.0"),
    ({"fast": "yes"}, "fast_checkpoint", "must be True or False"),
    ({"archive": "1"}, "wait_for_archive", "must be True or False"),
    ({"db": "ok\nnext"}, "label", "must be a single line"),
    ({"conn": ""}, "postgres_conn_id", "must be a non-empty string, got ''"),
    ({"db": " "}, "database", "must be a non-empty string, got ' '"),
]


def test_a_bad_rendered_value_fails_the_hold_for_good_before_backup_mode(cluster, task_context):
    for conf, param, message in BAD_RENDERED:
        dag = templated_dag(state_conn_id=None)  # rendering changes the task: a fresh one each time
        hold, context = rendered_task(task_context, dag, "backup.hold_backup_session", conf)
        with pytest.raises(AirflowFailException) as failed:
            hold.execute(context)
        assert f"invalid rendered parameter: {param} {message}" in str(failed.value), conf
    assert backup_starts(cluster) == 0
    assert cluster.sql("SELECT to_regclass('backup')") == [(None,)], "a hold reached the server"


@pytest.mark.parametrize("task_id", ["backup.wait_for_backup_mode", "backup.finish_backup"])
def test_a_bad_rendered_connection_fails_gate_and_finish_for_good(task_context, task_id):
    task, context = rendered_task(task_context, templated_dag(), task_id, {"conn": " "})
    with pytest.raises(AirflowFailException, match="invalid rendered parameter: postgres_conn_id must be"):
        task.execute(context)


@pytest.mark.parametrize(
    ("task_id", "param"), [("store_backup_label", "destination"), ("verify_backup", "backup_dir")]
)
def test_a_bad_rendered_path_fails_store_and_verify_for_good(task_context, task_id, param):
    task, context = rendered_task(task_context, templated_dag(), task_id)
    setattr(task, param, "  ")  # as a template rendering to blanks leaves it
    with pytest.raises(AirflowFailException, match=f"invalid rendered parameter: {param} must be"):
        task.execute(context)


# ------------------------------------------------------------------------- failures a retry cannot fix


def test_a_failed_backup_fails_gate_finish_and_inline_hold_for_good(hook, task_context):
    dag = templated_dag()
    reason = "the copy did not succeed: backup.copy is failed"

    async def failed_backup() -> tuple[dict, dict, dict]:
        r = req("templated/manual__templating/backup")
        holder, opened = await started(hook, r)
        done = await finish(hook, r.attempt, opened["backup"]["start_lsn"], copy_problem=reason)
        return await asyncio.wait_for(holder, 60), await gate(hook, r.attempt), done

    held, gate_event, done = asyncio.run(failed_backup())
    assert held["status"] == gate_event["status"] == done["status"] == FAILED
    for task_id, event, message in [
        ("backup.hold_backup_session", held, "backup not taken: backup marked failed: " + reason),
        ("backup.wait_for_backup_mode", gate_event, "backup did not start: backup failed: " + reason),
        ("backup.finish_backup", done, "backup not usable: backup failed: " + reason),
    ]:
        task, context = rendered_task(task_context, dag, task_id)
        with pytest.raises(AirflowFailException) as failed:
            task.execute_complete(context, event)
        assert message in str(failed.value), task_id


def test_a_refused_backup_fails_the_inline_hold_for_good(hook, task_context):
    async def refused() -> dict:
        live = req("other/run/backup")
        holder, opened = await started(hook, live)
        try:
            return await asyncio.wait_for(hold_backup(hook, req("templated/manual__templating/backup")), 60)
        finally:
            await finish(hook, live.attempt, opened["backup"]["start_lsn"])
            await asyncio.wait_for(holder, 60)

    event = asyncio.run(refused())
    hold, context = rendered_task(task_context, templated_dag(), "backup.hold_backup_session")
    with pytest.raises(AirflowFailException, match="backup not taken: refused to start: a backup owned by"):
        hold.execute_complete(context, event)


def test_an_unreachable_server_fails_gate_and_finish_for_a_retry(hook, cluster, task_context):
    """Connection refused is transient: AirflowException, which Airflow retries (the hold keeps its
    backup)."""
    cluster.stop("immediate")
    waits = {
        "backup.wait_for_backup_mode": wait_for_start(hook, "some-attempt", timeout=30),
        "backup.finish_backup": finish_backup(hook, "some-attempt", "0/2000028"),
    }
    for task_id, wait in waits.items():
        event = asyncio.run(wait)
        assert event["retryable"] is True, event
        task, context = rendered_task(task_context, templated_dag(), task_id)
        with pytest.raises(
            AirflowException, match=f"cannot connect to PostgreSQL through connection '{CONN_ID}'"
        ) as failed:
            task.execute_complete(context, event)
        assert not isinstance(failed.value, AirflowFailException), task_id


def test_a_copy_that_does_not_match_its_label_fails_the_store_for_good(hook, cluster, tmp_root):
    before = tmp_root / "before"
    copy_data_dir(cluster.datadir, before)
    backup = run_backup(hook, "templated/manual__templating/backup", lambda: None)
    store = templated_dag().get_task("store_backup_label")
    with pytest.raises(AirflowFailException, match="taken before this backup started"):
        store.store(str(before), backup)
    assert not (before / "backup_label").exists()


def test_a_failed_restore_check_fails_verify_for_good(cluster, tmp_root, task_context):
    copy, archive = tmp_root / "copy", tmp_root / "archive"
    copy_data_dir(cluster.datadir, copy)  # a copy without its backup_label: the check refuses it
    archive.mkdir()
    verify, context = rendered_task(
        task_context, templated_dag(), "verify_backup", {"dir": str(copy), "archive_dir": str(archive)}
    )
    with pytest.raises(AirflowFailException, match=f"checks failed for {copy}: .*has no backup_label"):
        verify.execute(context)
