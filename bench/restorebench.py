"""Figure 8: the time to restore a backup per GB beside the time to copy it per GB, on one backup.

On a pgbench cluster with WAL archiving, one backup: pg_backup_start (fast checkpoint), our copy engine
(plain, local, SHA-256, fsync: the copy operator's), pg_backup_stop, the label stored. Then its restore
as ``pg-safe-backup restore`` makes it (:func:`pg_safe_backup.restore.prepare_restore`: the copy, an
empty pg_wal/, recovery.signal, restore_command from the archive, ``recovery_target = 'immediate'`` and
promote) and a server started on it until it is promoted and answers: the time to a usable server from
the backup (the RTO of a restore to the backup's end). ``copy_s_per_gb`` and ``restore_s_per_gb`` divide
both by the data copied (GB of 2**30 bytes). Then the restored server updates 1 % of pgbench_accounts'
rows (its first blocks), stops, and ``restore --delta`` of the same backup rewrites it:
``delta_restore_s`` beside ``full_copy_restore_s`` (the first restore's copy alone); the delta's server is
started and counted too.

Before the copy, the restore and the delta, the page cache is written back and dropped (as root:
``detail``'s ``page_cache_dropped_before_each``): each reads from disk, as a restore of a stored backup
does (the copy's source, the live data directory, would be in memory; the backup, written with its
pages dropped behind it, would not).

``python -m bench.restorebench WORKDIR SCALE`` runs it alone and prints its JSON.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pg_safe_backup.local_cluster import LocalCluster, give_to_server_user

GB = 1 << 30


def _wait_promoted(cluster: LocalCluster, timeout: float = 600) -> None:
    """Until the restored server is out of recovery (promoted at the backup's consistent point)."""
    deadline = time.monotonic() + timeout
    while cluster.sql("SELECT pg_is_in_recovery()")[0][0]:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the restored server in {cluster.datadir} is still in recovery")
        time.sleep(0.05)


def _cold() -> bool:
    """Write back and drop the page cache (as root), so the timed copy reads from disk as a restore does:
    the copy's source (the live data directory) would be in memory, the restore's (the backup, written
    with its pages dropped behind it) would not. False when it cannot (not root)."""
    subprocess.run(["sync"], check=True)
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        return False
    return True


def backup_and_restore(cluster: LocalCluster, archive: Path, work: Path) -> dict[str, Any]:
    """One backup of the running ``cluster`` (WAL archived into ``archive``) into ``work``, then its restore.

    :param cluster: a running cluster archiving into ``archive``.
    :param archive: its WAL archive.
    :param work: a folder for the backup and the restored data directory.
    """
    from pg_safe_backup.files.copier import copy_data_directory
    from pg_safe_backup.files.label import store_label
    from pg_safe_backup.restore import RecoveryTarget, RestoreResult, prepare_restore

    backup, restored = work / "restore_backup", work / "restore_target" / "data"
    for folder in (backup, restored.parent):
        shutil.rmtree(folder, ignore_errors=True)
    restored.parent.mkdir(parents=True)
    give_to_server_user(restored.parent)
    new_api = cluster.server_version() >= 150000
    with cluster.connect() as conn:  # the backup's one session, held through the copy
        start = "pg_backup_start(%s, true)" if new_api else "pg_start_backup(%s, true, false)"
        conn.execute(f"SELECT {start}", ["bench restore"])
        cold = _cold()
        began = time.monotonic()
        copied = copy_data_directory(cluster.datadir, backup)
        copy_s = time.monotonic() - began
        stop = "pg_backup_stop(true)" if new_api else "pg_stop_backup(false, true)"
        lsn, label, spcmap = conn.execute(f"SELECT lsn::text, labelfile, spcmapfile FROM {stop}").fetchone()
    store_label(
        backup,
        {"backup_label": label, "tablespace_map": spcmap},
        local_copy=backup,
        system_identifier=None,
        stop_lsn=lsn,
    )

    def restore_it(delta: bool) -> RestoreResult:
        """The backup restored into ``restored`` (``delta``: rewriting what is there), to its end."""
        return prepare_restore(
            backup,
            restored,
            wal_archive=archive,
            recovery=RecoveryTarget(immediate=True, action="promote"),
            archive_mode="off",
            extra_settings={"unix_socket_directories": f"'{restored.parent}'"},
            delta=delta,
        )

    cold = _cold() and cold
    began = time.monotonic()
    prepared = restore_it(delta=False)
    prepared_s = time.monotonic() - began
    server = LocalCluster(restored).start(timeout=600)
    try:
        _wait_promoted(server)
        restore_s = time.monotonic() - began
        accounts = server.sql("SELECT count(*) FROM pgbench_accounts")[0][0]
        # The restored server goes its own way: 1 % of pgbench_accounts' rows (its first blocks) updated.
        server.sql(
            "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid <= (SELECT max(aid) / 100"
            " FROM pgbench_accounts)"
        )
        server.sql("CHECKPOINT")
        server.stop()
        cold = _cold() and cold
        began = time.monotonic()
        delta = restore_it(delta=True)
        delta_s = time.monotonic() - began
        server = LocalCluster(restored).start(timeout=600)
        _wait_promoted(server)
        accounts_after_delta = server.sql("SELECT count(*) FROM pgbench_accounts")[0][0]
    finally:
        server.stop("immediate")
        shutil.rmtree(backup, ignore_errors=True)
        shutil.rmtree(restored.parent, ignore_errors=True)
    data_gb = copied.bytes / GB
    return {
        "copy_s_per_gb": round(copy_s / data_gb, 2),
        "restore_s_per_gb": round(restore_s / data_gb, 2),
        "full_copy_restore_s": round(prepared_s, 2),
        "delta_restore_s": round(delta_s, 2),
        "detail": {
            "page_cache_dropped_before_each": cold,
            "delta_rewritten_mb": round(delta.bytes / 2**20, 1),
            "delta_kept_files": delta.kept,
            "delta_removed": delta.removed,
            "pgbench_accounts_after_delta": accounts_after_delta,
            "data_gb": round(data_gb, 2),
            "files": copied.files,
            "copy_s": round(copy_s, 2),
            "restore_s": round(restore_s, 2),
            "restore_prepare_s": round(prepared_s, 2),
            "restore_recovery_s": round(restore_s - prepared_s, 2),
            "stop_lsn": lsn,
            "pgbench_accounts_restored": accounts,
            "restore_files": getattr(prepared, "files", None),
        },
    }


def run(work: Path, scale: int) -> dict[str, Any]:
    """Figure 8 on a pgbench cluster of ``scale`` in ``work`` with WAL archiving.

    :param work: the work folder.
    :param scale: pgbench's scale.
    """
    from bench.common import archive_settings, make_archive
    from bench.dagbench import load_pgbench

    archive = make_archive(work / "restore_wal_archive")
    datadir = work / f"restore_s{scale}" / "data"
    cluster = load_pgbench(datadir, scale)
    try:
        cluster.stop()
        cluster.configure(
            {
                "wal_level": "replica",
                "max_wal_senders": 4,
                "unix_socket_directories": f"'{cluster.socket_dir}'",
                **archive_settings(archive),
            }
        )
        cluster.start()
        out = backup_and_restore(cluster, archive, work)
        out["detail"]["scale"] = scale
        return out
    finally:
        cluster.stop()
        shutil.rmtree(datadir.parent, ignore_errors=True)
        shutil.rmtree(archive, ignore_errors=True)


if __name__ == "__main__":
    print(json.dumps(run(Path(sys.argv[1]), int(sys.argv[2])), indent=1))
