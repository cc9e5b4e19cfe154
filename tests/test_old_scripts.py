"""The old pre-/post-scripts write the same ``backup`` table: their exact statements, replayed against ours.

pre-script (its background session, which stays open and holds backup mode):
    SELECT count(pg_terminate_backend(pid)) FROM backup WHERE state = 'running';
    INSERT INTO backup (...) VALUES ('running', pg_backend_pid(), NULL, NULL) ON CONFLICT ... DO UPDATE ...;
    SELECT pg_backup_start(...);
    ... waits for state 'done', then:
    UPDATE backup SET (state, backup_label, tablespace_map) = (SELECT 'complete', labelfile, spcmapfile
        FROM pg_backup_stop());
post-script:
    UPDATE backup SET state = 'done'; polls SELECT state FROM backup; then SELECT backup_label FROM backup.
"""

from __future__ import annotations

import asyncio
import time

import psycopg
import pytest

from pg_safe_backup.local_cluster import LocalCluster
from pg_safe_backup.session import COMPLETE, FAILED, hold_backup

from backup_helpers import backup_row, backup_starts, finish, req, started

PRE_TERMINATE = "SELECT count(pg_terminate_backend(pid)) FROM backup WHERE state = 'running'"
PRE_INSERT = (
    "INSERT INTO backup (state, pid, backup_label, tablespace_map) VALUES ('running', pg_backend_pid(), "
    "NULL, NULL)"
    " ON CONFLICT ON CONSTRAINT backup_pkey DO UPDATE SET state = 'running', pid = pg_backend_pid(),"
    " backup_label = NULL, tablespace_map = NULL"
)
POST_DONE = "UPDATE backup SET state = 'done'"


def start_sql(cluster: LocalCluster) -> str:
    if cluster.server_version() >= 150000:
        return "SELECT pg_backup_start('old script', true)"
    return "SELECT pg_start_backup('old script', true, false)"


def complete_sql(cluster: LocalCluster) -> str:
    stop = "pg_backup_stop()" if cluster.server_version() >= 150000 else "pg_stop_backup(false)"
    # As quoted from the script, 'complete' in the sub-SELECT is text and PostgreSQL refuses the statement
    # (column "state" is of type backup_state): the script works with the enum cast, replayed here.
    return (
        f"UPDATE backup SET (state, backup_label, tablespace_map) = (SELECT 'complete'::backup_state,"
        f" labelfile, spcmapfile FROM {stop})"
    )


def airflow_backup(hook) -> dict:
    """One whole backup through our holder, gate and finish; the finish's event."""

    async def go():
        holder, _ = await started(hook, req())
        done = await finish(hook)
        assert (await holder)["status"] == COMPLETE
        return done

    done = asyncio.run(go())
    assert done["status"] == COMPLETE, done
    return done


def post_script(cluster: LocalCluster, timeout: float = 30) -> str:
    """The old post-script: ask for the stop, poll the state, read the label."""
    cluster.sql(POST_DONE)
    deadline = time.monotonic() + timeout
    while cluster.sql("SELECT state FROM backup")[0][0] != "complete":
        assert time.monotonic() < deadline, cluster.sql("SELECT state, error FROM backup")
        time.sleep(0.2)  # the script sleeps 5 s
    return cluster.sql("SELECT backup_label FROM backup")[0][0]


def test_a_live_old_script_backup_is_left_alone_by_an_airflow_run(hook, cluster):
    """After an Airflow backup, the pre-script takes the row with its own pid: the row must no longer look
    like ours (our liveness test would call the old script's live backup stale and replace it)."""
    airflow_backup(hook)
    with cluster.connect() as old:
        old.execute(PRE_TERMINATE)
        old.execute(PRE_INSERT)
        old.execute(start_sql(cluster))
        old_pid = old.info.backend_pid
        r = backup_row(cluster)
        assert (r["state"], r["pid"], r["owner"], r["attempt"], r["start_lsn"]) == (
            "running",
            old_pid,
            None,
            None,
            None,
        )

        refused = asyncio.run(asyncio.wait_for(hold_backup(hook, req(owner="nightly/later/backup")), 30))
        assert refused["status"] == FAILED, refused
        assert "refused to start: a backup owned by another client" in refused["message"], refused["message"]
        assert f"holder pid {old_pid}" in refused["message"]
        r = backup_row(cluster)
        assert (r["state"], r["pid"], r["error"]) == ("running", old_pid, None), r

        # The old scripts finish their backup as always.
        cluster.sql(POST_DONE)
        old.execute(complete_sql(cluster))
        label = cluster.sql("SELECT backup_label FROM backup")[0][0]
        assert "LABEL: old script" in label
    assert backup_starts(cluster) == 2  # ours, then the old script's; the refused run started none


def test_an_old_script_completion_cannot_overwrite_a_complete_airflow_backup(hook, cluster):
    with cluster.connect() as old:
        old.execute(start_sql(cluster))  # an old script's background session, in backup mode meanwhile
        done = airflow_backup(hook)
        label = done["backup"]["backup_label"]
        assert backup_row(cluster)["backup_label"] == label
        with pytest.raises(psycopg.errors.CheckViolation, match="complete backup may not be changed"):
            old.execute(complete_sql(cluster))
    r = backup_row(cluster)
    assert r["state"] == "complete" and r["backup_label"] == label and r["error"] is None, r
    assert cluster.sql("SELECT backup_label FROM backup") == [(label,)]


def test_a_complete_row_changes_only_by_a_new_backup_or_a_withdrawal(hook, cluster):
    done = airflow_backup(hook)
    for stmt in (
        "UPDATE backup SET backup_label = 'forged'",
        "UPDATE backup SET stop_lsn = '0/1'",
        "UPDATE backup SET tablespace_map = 'x', state = 'complete'",
        "UPDATE backup SET pid = 1",
    ):
        with pytest.raises(psycopg.errors.CheckViolation):
            cluster.sql(stmt)
    assert backup_row(cluster)["backup_label"] == done["backup"]["backup_label"]
    # Withdrawing (the finish of the same attempt, its copy failed after all) keeps the label as it was.
    cluster.sql("UPDATE backup SET state = 'failed', error = 'copy failed after all'")
    r = backup_row(cluster)
    assert (r["state"], r["backup_label"]) == ("failed", done["backup"]["backup_label"])


def test_the_old_post_script_ends_an_airflow_backup_and_gets_its_label(hook, cluster):
    async def go():
        holder, _ = await started(hook, req(poll_interval=600))
        label = await asyncio.to_thread(post_script, cluster)
        return label, await asyncio.wait_for(holder, 30)

    label, held = asyncio.run(go())
    assert held["status"] == COMPLETE
    assert label == held["backup"]["backup_label"] and "START WAL LOCATION" in label
    assert backup_row(cluster)["owner"] == req().owner  # still ours: the post-script changed no pid


def test_a_seed_enum_without_every_state_is_refused_before_backup_mode(hook, cluster):
    cluster.sql("CREATE TYPE backup_state AS ENUM ('running', 'done', 'failed')")
    cluster.sql(
        "CREATE TABLE backup (id integer PRIMARY KEY, state backup_state, pid integer, backup_label text,"
        " tablespace_map text)"
    )
    result = asyncio.run(asyncio.wait_for(hold_backup(hook, req(backup_timeout=5)), 60))
    assert result["status"] == FAILED
    assert (
        'type "public".backup_state' in result["message"]
        and "lacks the state(s) complete" in result["message"]
    )
    assert "ALTER TYPE \"public\".backup_state ADD VALUE 'complete';" in result["message"]
    assert backup_starts(cluster) == 0
    assert cluster.sql("SELECT count(*) FROM backup") == [(0,)]
