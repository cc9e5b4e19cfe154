"""The provider's metrics reach Airflow's StatsD (a UDP socket the test opens): a real backup of a throwaway
cluster through the code the hold's trigger, the copy and the store tasks run, and the datagrams that arrive.
A Stats client whose every send fails fails nothing."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import pytest
from statsd import StatsClient

from airflow.sdk import DAG

from pg_safe_backup.hooks.backup import PostgresBackupHook
from pg_safe_backup.local_cluster import LocalCluster
from pg_safe_backup.operators.backup import PostgresStoreBackupLabelOperator
from pg_safe_backup.operators.copy import PostgresCopyDataDirectoryOperator
from pg_safe_backup.session import COMPLETE, FAILED
from pg_safe_backup.state import BackupRef, BackupTarget
from pg_safe_backup.store import CopyRecords
from pg_safe_backup.task_group import PostgresOnlineBackup
from pg_safe_backup.triggers.backup import PostgresHoldBackupTrigger
from pg_safe_backup.utils import metrics

from backup_helpers import cluster_with_space, finish, gate, req
from conftest import CONN_ID, PASSWORD
from metrics_helpers import PREFIX, StatsD


def reset_stats() -> None:
    """Airflow's Stats made again from ``[metrics]`` as the environment says now: Airflow keeps the client it
    made first, as its own tests reset it."""
    from airflow.providers.common.compat.sdk import Stats

    try:  # Airflow 3.2+: the Task SDK's Stats, given its factory as a task runner gives it
        from airflow.sdk.observability.metrics.stats_utils import get_stats_factory
    except ImportError:  # Airflow 3.1: airflow.stats picks its factory once, makes its instance on first use
        from airflow.configuration import conf
        from airflow.metrics import statsd_logger
        from airflow.metrics.base_stats_logger import NoStatsLogger

        on = conf.getboolean("metrics", "statsd_on")
        type(Stats).factory = statsd_logger.get_statsd_logger if on else NoStatsLogger
        Stats.instance = None  # the metaclass keeps the factory, the class the instance
    else:
        Stats.initialize(factory=get_stats_factory(), export_legacy_names=False)


@pytest.fixture
def statsd(monkeypatch: pytest.MonkeyPatch) -> Iterator[StatsD]:
    """Airflow's metrics on, to a StatsD the test reads."""
    server = StatsD()
    for key, value in server.environment().items():
        monkeypatch.setenv(key, value)
    reset_stats()
    try:
        yield server
    finally:
        for key in server.environment():
            monkeypatch.delenv(key)
        reset_stats()
        server.close()


@pytest.fixture
def archiving(tmp_root: Path) -> Iterator[LocalCluster]:
    """A cluster whose WAL is archived, reachable as the connection ``pg_test``."""
    with cluster_with_space(tmp_root) as (cluster, _archive, _location):
        yield cluster


def backup_dag() -> tuple[PostgresCopyDataDirectoryOperator, PostgresStoreBackupLabelOperator]:
    with DAG("metered", schedule=None):
        with PostgresOnlineBackup(group_id="backup", postgres_conn_id=CONN_ID) as backup:
            copy = PostgresCopyDataDirectoryOperator(
                task_id="copy_data_directory", source="/nonexistent", destination="/nonexistent/{{ ts }}"
            )
        store = PostgresStoreBackupLabelOperator(
            task_id="store_backup_label", backup=backup, destination="/nonexistent/{{ ts }}"
        )
    return copy, store


def hold_trigger(owner: str) -> PostgresHoldBackupTrigger:
    """The hold's trigger as the hold task defers on it (its run's ref: the holder looks at Airflow)."""
    ref = BackupRef(
        "metered",
        "manual__metrics",
        "backup",
        hold_task_id="backup.hold_backup_session",
        finish_task_id="backup.finish_backup",
    )
    request = req(owner, wait_for_archive=True, poll_interval=0.5)
    return PostgresHoldBackupTrigger(
        BackupTarget(postgres_conn_id=CONN_ID).hook_kwargs, request=asdict(request), ref=asdict(ref)
    )


def test_a_backup_sends_its_metrics_with_fixed_names_and_few_tags(archiving, statsd, tmp_root):
    """The holder's trigger (the backup, its wait for the archive, its look at Airflow: none in this
    process, so an error), the copy task's copy (its time and bytes) and the store task's store (one backup
    completed, its bytes and duration)."""
    copy, store = backup_dag()
    destination = tmp_root / "backups" / "one"
    trigger = hold_trigger("metered/manual__metrics/backup")
    attempt = trigger.kwargs["request"]["attempt"]

    async def backup() -> tuple[dict, dict, tuple]:
        holder = asyncio.create_task(trigger.result())
        opened = await gate(PostgresBackupHook(CONN_ID), attempt)
        copied = await asyncio.to_thread(copy.copy, archiving.datadir, str(destination))
        done = await finish(PostgresBackupHook(CONN_ID), attempt, opened["backup"]["start_lsn"])
        return await asyncio.wait_for(holder, 60), done, copied

    held, done, (summary, records) = asyncio.run(backup())
    assert held["status"] == done["status"] == COMPLETE, (held, done)
    store.store(str(destination), done["backup"], records, {"dag_id": "metered"})

    archive_wait = statsd.one("wal_archive.wait")
    assert archive_wait.kind == "ms" and archive_wait.tags == {"mode": "full"}
    assert 0 <= archive_wait.value < 60_000
    looked = statsd.one("holder_check.errors")  # no Task SDK here: the holder counts it and holds on
    assert (looked.kind, looked.value, looked.tags) == ("c", 1, {})
    copy_time = statsd.one("copy.duration")
    assert copy_time.kind == "ms" and copy_time.tags == {"format": "plain"} and copy_time.value > 0
    copy_bytes = statsd.one("copy.bytes")
    assert (copy_bytes.kind, copy_bytes.value) == ("c", summary["bytes"])
    assert copy_bytes.tags == {"format": "plain"}
    completed = statsd.one("backup.completed")
    assert (completed.kind, completed.value, completed.tags) == ("c", 1, {"mode": "full", "format": "plain"})
    stored = statsd.one("backup.bytes")
    assert stored.value == sum(r.size for r in CopyRecords.from_xcom([records.to_xcom()]).files.values())
    took = statsd.one("backup.duration")
    assert took.kind == "ms" and took.tags == {"mode": "full", "format": "plain"}
    assert 0 <= took.value < 120_000
    assert statsd.named("backup.failed") == []
    ours = {d.name.removeprefix(f"{PREFIX}.") for d in statsd.received if metrics.PREFIX in d.name}
    assert ours <= {metrics.PREFIX + name for name in metrics.METRICS}, ours  # Airflow's own are sent too


def test_a_refused_backup_counts_as_failed_by_the_hold(cluster, statsd):
    """The fixture's cluster archives no WAL: wait_for_archive=True refuses the backup before backup mode."""
    held = asyncio.run(hold_trigger("metered/manual__refused/backup").result())
    assert held["status"] == FAILED and "wait_for_archive=True" in held["message"], held
    failed = statsd.one("backup.failed")
    assert (failed.kind, failed.value, failed.tags) == ("c", 1, {"mode": "full", "stage": "hold"})
    assert statsd.named("wal_archive.wait") == []


def test_a_tag_outside_its_few_values_is_dropped_and_logged_never_sent(statsd, caplog):
    with caplog.at_level("DEBUG", logger=metrics.__name__):
        metrics.incr("backup.started", mode="cluster-7f3a")  # a cluster id would be a series of its own
        metrics.incr("backup.started", mode="incremental")
    assert statsd.one("backup.started").tags == {"mode": "incremental"}  # the other one: never sent
    assert "takes no tag mode='cluster-7f3a'" in caplog.text


class BrokenClient(StatsClient):
    """A StatsD client whose network is gone: every send raises."""

    def _send(self, data: str) -> None:
        raise OSError("Network is unreachable")


def test_metrics_that_cannot_be_sent_fail_nothing(statsd, monkeypatch, tmp_root, caplog):
    """Airflow's own client, configured to one whose every send raises (``statsd_custom_client_path``): the
    copy task's copy goes on and returns, and the failure is a debug line."""
    monkeypatch.setenv("AIRFLOW__METRICS__STATSD_CUSTOM_CLIENT_PATH", f"{__name__}.BrokenClient")
    reset_stats()
    source = tmp_root / "data"
    LocalCluster(source).init(password=PASSWORD)
    copy, _ = backup_dag()
    with caplog.at_level("DEBUG", logger=metrics.__name__):
        summary, _ = copy.copy(source, str(tmp_root / "copy"))
    assert summary["files"] > 0
    assert "metric pg_safe_backup.copy.duration not sent: Network is unreachable" in caplog.text
    assert statsd.named("copy.duration") == []


def test_the_readme_lists_every_metric():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("### Metrics", 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
    for name, (kind, tags) in metrics.METRICS.items():
        row = next((line for line in section.splitlines() if f"`{metrics.PREFIX}{name}`" in line), None)
        assert row is not None, name
        assert kind in row and all(f"`{tag}`" in row for tag in tags), row
