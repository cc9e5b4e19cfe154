"""The store task's safety check against real copies: wrong cluster, copy older than the backup."""

from __future__ import annotations

import asyncio
import shutil

import pytest

from pg_safe_backup.copy_check import CopyMismatch, check_copy, parse_lsn, read_pg_control
from pg_safe_backup.local_cluster import LocalCluster
from pg_safe_backup.session import COMPLETE, STARTED, HoldRequest, finish_backup, hold_backup, wait_for_start

OWNER = "d/r/backup"
SKIP = shutil.ignore_patterns("postmaster.pid", "postmaster.opts", "pg_wal", "*.log")


def backup_with_copies(hook, cluster, before, during) -> dict:
    """Copy the data dir to ``before``, then take a backup copying it to ``during``."""
    shutil.copytree(cluster.datadir, before, ignore=SKIP)
    async def go():
        holder = asyncio.create_task(hold_backup(hook, HoldRequest(OWNER, "attempt-1", "copycheck", fast_checkpoint=True,
                                                                  wait_for_archive=False)))
        gate = await wait_for_start(hook, "attempt-1", poll_interval=0.5)
        assert gate["status"] == STARTED
        await asyncio.to_thread(shutil.copytree, cluster.datadir, during, ignore=SKIP)
        done = await finish_backup(hook, "attempt-1", gate["backup"]["start_lsn"], poll_interval=0.5)
        await holder
        return done
    done = asyncio.run(go())
    assert done["status"] == COMPLETE
    return done["backup"]


def test_pg_control_read_matches_the_server(cluster):
    cluster.sql("CHECKPOINT")
    sysid, checkpoint = read_pg_control(cluster.datadir)
    (server_id, server_cp), = cluster.sql(
        "SELECT s.system_identifier, c.checkpoint_lsn::text FROM pg_control_system() s, pg_control_checkpoint() c")
    assert sysid == server_id % (1 << 64) and checkpoint == parse_lsn(server_cp)


def test_copy_during_backup_accepted_older_copy_and_other_cluster_refused(hook, cluster, tmp_root):
    backup = backup_with_copies(hook, cluster, tmp_root / "before", tmp_root / "during")
    check_copy(tmp_root / "during", backup["system_identifier"], backup["backup_label"])

    with pytest.raises(CopyMismatch, match="taken before this backup started"):
        check_copy(tmp_root / "before", backup["system_identifier"], backup["backup_label"])

    other = LocalCluster(tmp_root / "other").init()
    with pytest.raises(CopyMismatch, match="of another cluster"):
        check_copy(other.datadir, backup["system_identifier"], backup["backup_label"])
