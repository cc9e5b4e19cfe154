"""Figure 14: the Backups page (issue 27) of a root holding 10,000 catalogued backups, rendered in under a
second.

One real backup of a small cluster (pg_backup_start, the copy engine, pg_backup_stop, the store's own
:func:`~pg_safe_backup.store.store_backup`: label, manifest, catalog entry); then BACKUPS more under one
root (CLUSTERS folders of DAYS day folders), each the files a backup proves itself from (backup_label,
backup_manifest, global/pg_control, PG_VERSION: hard links) and a catalog entry written by the catalog's
own writer (:func:`~pg_safe_backup.catalog.write_info`) with its own stop time, size, DAG and, for one in
ten, a drill's record. Timed, in the process as the API server runs it (no HTTP):

* ``backups_page_10k_s``: the page as a user who may read every DAG gets it once the root is listed
  (:class:`~pg_safe_backup.backups_page.BackupsCache` finds nothing changed, then the rows filtered and the
  HTML and SVG rendered); median of ROUNDS. Target: under 1 s.
* ``detail.cold_s``: the first listing (every backup proven from its files; once per API server process).
* ``detail.after_a_store_s``: the page after one more backup's catalog entry appeared (the root listed
  again, only the changed folders proven again).

``python -m bench.pagebench WORKDIR`` runs it alone and prints its JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import time
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from pg_safe_backup.local_cluster import LocalCluster

BACKUPS = 10_000
CLUSTERS = 4
ROUNDS = 5
#: The files a plain local backup proves itself from (pg_safe_backup.proof).
PROOF_FILES = ("backup_label", "backup_manifest", "global/pg_control", "PG_VERSION")


def one_backup(work: Path) -> Path:
    """A real backup of a fresh small cluster, stored as the store task stores one: its folder."""
    from pg_safe_backup.files.copier import copy_data_directory
    from pg_safe_backup.store import store_backup

    folder = work / "page_one"
    cluster = LocalCluster(work / "page_cluster" / "data").init(password="page-bench").start()
    try:
        with cluster.connect() as conn:  # the backup's one session, held through the copy
            conn.execute("SELECT pg_backup_start(%s, true)", ["page bench"])
            copy_data_directory(cluster.datadir, folder, fsync=False)
            lsn, label, spcmap = conn.execute(
                "SELECT lsn::text, labelfile, spcmapfile FROM pg_backup_stop(true)"
            ).fetchone()
        sysid = cluster.sql("SELECT system_identifier::text FROM pg_control_system()")[0][0]
    finally:
        cluster.stop("immediate")
    backup = {"backup_label": label, "tablespace_map": spcmap, "system_identifier": sysid, "stop_lsn": lsn}
    store_backup(folder, backup, None, {"dag_id": "page_bench_0", "run_id": "bench"})
    return folder


def fleet(one: Path, root: Path, count: int) -> list[Path]:
    """``count`` backups under ``root`` made of ``one``'s files, each with its own catalog entry."""
    from pg_safe_backup.catalog import read_info, write_info

    info = read_info(one)
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    folders = []
    for n in range(count):
        cluster, day = n % CLUSTERS, n // (CLUSTERS * 24)
        folder = root / f"cluster{cluster}" / f"{start + timedelta(days=day):%Y-%m-%d}" / f"b{n:05d}"
        (folder / "global").mkdir(parents=True)
        for name in PROOF_FILES:
            os.link(one / name, folder / name)
        stopped = start + timedelta(days=day, hours=n % 24, minutes=cluster)
        drills = [{"ok": True, "by": "drill bench/r", "seconds": 60.0 + n % 90, "at": stopped.isoformat()}]
        write_info(
            folder,
            replace(
                info,
                stop_time=(stopped + timedelta(seconds=60 + n % 600)).isoformat(),
                bytes=(20 << 30) + n * (1 << 20),
                dag_id=f"page_bench_{cluster}",
                verifications=drills if n % 10 == 0 else [],
            ),
        )
        folders.append(folder)
    return folders


def render(cache: Any, root: Path) -> str:
    """The page of ``root`` for a user who may read every DAG, as the plugin renders it."""
    from pg_safe_backup.backups_page import render_page, visible

    rows = cache.rows(str(root), root)
    shown = visible(rows, set(), every_dag=True)
    now = datetime.now(timezone.utc)
    return render_page(root=str(root), roots=[str(root)], rows=shown, now=now, link=lambda r: r)


def run(work: Path, count: int = BACKUPS) -> dict[str, Any]:
    """Figure 14 in ``work``.

    :param work: the work folder (the postgres OS user can enter it).
    :param count: the backups under the root.
    """
    from pg_safe_backup.backups_page import BackupsCache
    from pg_safe_backup.catalog import entry_path, read_info, write_info

    root = work / "page_root"
    shutil.rmtree(root, ignore_errors=True)
    one = one_backup(work)
    try:
        began = time.monotonic()
        folders = fleet(one, root, count)
        made_s = time.monotonic() - began
        cache = BackupsCache()
        began = time.monotonic()
        page = render(cache, root)
        cold_s = time.monotonic() - began
        rounds = []
        for _ in range(ROUNDS):
            began = time.monotonic()
            page = render(cache, root)
            rounds.append(time.monotonic() - began)
        late = folders[-1].parent / "late"
        (late / "global").mkdir(parents=True)
        for name in PROOF_FILES:
            os.link(one / name, late / name)
        write_info(late, read_info(folders[-1]))
        began = time.monotonic()
        changed = render(cache, root)
        changed_s = time.monotonic() - began
        rows = changed.count("<tr id=")
        if rows != count + 1:
            raise RuntimeError(f"the page shows {rows} backups, not {count + 1}")
        return {
            "backups_page_10k_s": round(statistics.median(rounds), 3),
            "detail": {
                "backups": count,
                "cluster_folders": CLUSTERS,
                "rounds_s": [round(s, 3) for s in rounds],
                "cold_s": round(cold_s, 2),
                "after_a_store_s": round(changed_s, 3),
                "page_mb": round(len(page.encode()) / 2**20, 2),
                "chart_paths": page.count('<path d="'),
                "fleet_made_s": round(made_s, 1),
            },
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(one, ignore_errors=True)
        entry_path(one).unlink(missing_ok=True)
        shutil.rmtree(work / "page_cluster", ignore_errors=True)


if __name__ == "__main__":
    print(json.dumps(run(Path(sys.argv[1])), indent=1))
