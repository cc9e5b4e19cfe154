"""Figure 12: how long PostgreSQL stays in backup mode when the backup is taken as btrfs snapshots (issue 25),
against a copy taken inside backup mode, at two data sizes, under a pgbench write load.

For each pgbench scale (SMALL_SCALE, LARGE_SCALE: data sizes at least 4x apart) a btrfs file system is made
on a loop device over a sparse image on tmpfs (``/dev/shm``: the figure is about the time in backup mode, not
about a disk), sized 3 x the data + 2 GB; the cluster's data directory is ``<mnt>/pgdata/data`` in the btrfs
subvolume ``<mnt>/pgdata``, the snapshots go into the folder ``<mnt>/snapshots``. The cluster is filled by
``pgbench -i -s SCALE`` (WAL level minimal while loading), then restarted with WAL level replica, ``fsync``
on (the fast checkpoint writes back before pg_backup_start returns, as in production) and no archiving, and
the disk synced. ROUNDS rounds, each doing both of these in turn (the first of the two alternating from one
round to the next), each under its own ``pgbench -c 2 -j 1 -n`` (the TPC-B-like script, flat out) started
before it (and under way: 1 MB of WAL written) and stopped after it:

* snapshot: in one session ``pg_backup_start(label, true)`` (fast checkpoint); the snapshots (the API the
  snapshot operator uses: ``plan_volumes`` / ``planned`` / ``take_all``, one read-only ``btrfs subvolume
  snapshot``); ``pg_backup_stop(false)`` -> ``snapshot_mode_s``; then the copy-out of the snapshot by the copy
  engine (``copy_data_directory`` over ``walk`` of the snapshot's data directory, SHA-256 of every file,
  fsync) into a folder on tmpfs, outside btrfs; ``snapshot_total_s`` = mode + copy-out. The snapshots are
  then deleted (timed apart, not in the total).
* copy: ``pg_backup_start(label, true)``; ``copy_data_directory`` of the live data directory into the same
  tmpfs folder; ``pg_backup_stop(false)`` -> ``copy_mode_s`` = ``copy_total_s``.

Backup mode lasts from pg_backup_start's return to pg_backup_stop's return (the start's checkpoint is in
neither). Each destination is deleted between rounds (then ``sync`` and SETTLE_S seconds of rest); nothing is
dropped from the page cache. The copy in backup mode reads the live files, in the page cache; the copy-out
reads a fresh snapshot, whose files share no page cache with the live ones (btrfs caches per subvolume's
inode): it reads through btrfs and the loop device from the image (on tmpfs: memory, but not the page
cache), under the load's writes, which now copy-on-write the blocks the snapshot shares. No label, map or
manifest is written into the copies (the same for both). Each figure is the median of its rounds;
GB are 2**30 bytes (``du -sb`` of the data directory, pg_wal included).

``python -m bench.snapshotbench SMALL_SCALE LARGE_SCALE [ROUNDS]`` runs it alone and prints its JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import say
from bench.dagbench import MB_PER_SCALE, du_bytes, load_pgbench
from demo.btrfs import btrfs_volume, subvolume
from pg_safe_backup.local_cluster import SERVER_USER, LocalCluster

#: Where the btrfs image and the copies go: tmpfs.
SHM = Path(os.environ.get("BENCH_SNAPSHOT_SHM", "/dev/shm"))
#: Seconds of rest after deleting a copy (see bench/dagbench.py's SETTLE_S: freed memory on this VM).
SETTLE_S = 3
#: The load: pgbench's built-in TPC-B-like script, flat out.
LOAD_CLIENTS, LOAD_THREADS = 2, 1


class Load:
    """``pgbench -c 2 -j 1 -n`` (TPC-B-like, flat out) against ``cluster`` in the background."""

    def __init__(self, cluster: LocalCluster, conn: Any) -> None:
        self.conn = conn
        self.proc = subprocess.Popen(
            [
                str(cluster.bindir / "pgbench"),
                *("-h", str(cluster.socket_dir), "-p", str(cluster.port), "-U", "postgres"),
                *("-n", "-c", str(LOAD_CLIENTS), "-j", str(LOAD_THREADS), "-T", "3600"),
                "postgres",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        lsn0, deadline = self._lsn(), time.monotonic() + 60
        while self._lsn() - lsn0 < 2**20:  # under way before the clock starts
            self.check()
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the pgbench load wrote no WAL in 60 s")
            time.sleep(0.01)
        self.began, self.lsn0, self.xacts0 = time.monotonic(), self._lsn(), self._xacts()

    def _lsn(self) -> int:
        return int(self.conn.execute("SELECT pg_current_wal_lsn() - '0/0'").fetchone()[0])

    def _xacts(self) -> int:
        row = self.conn.execute(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
        ).fetchone()
        return int(row[0])

    def check(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(
                f"the pgbench load ended early ({self.proc.returncode}): {self.proc.stderr.read()}"
            )

    def finish(self) -> dict[str, float]:
        """Stop it; its WAL MB/s and (approximate: the server's statistics) transactions/s while it ran."""
        self.check()
        seconds = time.monotonic() - self.began
        wal = (self._lsn() - self.lsn0) / 2**20 / seconds
        self.stop()
        time.sleep(0.6)  # the ended backends' statistics flushed
        tps = (self._xacts() - self.xacts0) / seconds
        return {"load_wal_mb_s": round(wal, 1), "load_tps": round(tps)}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _start(conn: Any, label: str) -> float:
    """pg_backup_start with a fast checkpoint; its own seconds."""
    t0 = time.monotonic()
    conn.execute("SELECT pg_backup_start(%s, true)", (label,))
    return time.monotonic() - t0


def _stop(conn: Any) -> None:
    conn.execute("SELECT * FROM pg_backup_stop(false)").fetchall()


def _remove(dest: Path) -> None:
    shutil.rmtree(dest, ignore_errors=True)
    os.sync()
    time.sleep(SETTLE_S)


def snapshot_round(cluster: LocalCluster, conn: Any, snapshot_dir: Path, dest: Path, name: str) -> dict:
    """One snapshot backup: start, snapshots, stop; the copy-out from the snapshots; their delete."""
    from pg_safe_backup.files.copier import copy_data_directory
    from pg_safe_backup.files.layout import walk
    from pg_safe_backup.snapshots import (
        BtrfsDriver,
        delete_all,
        plan_volumes,
        planned,
        readable_tree,
        tablespace_links,
        take_all,
    )

    driver = BtrfsDriver()
    datadir = cluster.datadir
    snaps = planned(snapshot_dir, name, plan_volumes(driver, datadir, tablespace_links(datadir)), driver)
    taken: list = []
    try:
        load = Load(cluster, conn)
        try:
            with cluster.connect() as backup:
                start_s = _start(backup, f"bench snapshot {name}")
                t_started = time.monotonic()
                taken = take_all(driver, snaps)
                t_taken = time.monotonic()
                _stop(backup)
                t_stopped = time.monotonic()
            data, tablespaces = readable_tree(taken, datadir)
            copied = copy_data_directory(data, dest, entries=walk(data, tablespaces=tablespaces))
            t_copied = time.monotonic()
            figures = load.finish()
        finally:
            load.stop()
        t_delete = time.monotonic()
        problems, taken = delete_all(driver, taken), []
        if problems:
            raise RuntimeError(f"snapshots not deleted: {'; '.join(problems)}")
        delete_s = time.monotonic() - t_delete
    finally:
        if taken:
            delete_all(driver, taken)
    mode = t_stopped - t_started
    return {
        "mode_s": mode,
        "total_s": mode + (t_copied - t_stopped),
        "pg_backup_start_s": start_s,
        "take_s": t_taken - t_started,
        "pg_backup_stop_s": t_stopped - t_taken,
        "copy_out_s": t_copied - t_stopped,
        "delete_s": delete_s,
        "copied_bytes": copied.bytes,
        "copied_files": copied.files,
        **figures,
    }


def copy_round(cluster: LocalCluster, conn: Any, dest: Path, name: str) -> dict:
    """One copy inside backup mode: start, copy of the live data directory, stop."""
    from pg_safe_backup.files.copier import copy_data_directory

    load = Load(cluster, conn)
    try:
        with cluster.connect() as backup:
            start_s = _start(backup, f"bench copy {name}")
            t_started = time.monotonic()
            copied = copy_data_directory(cluster.datadir, dest)
            t_copied = time.monotonic()
            _stop(backup)
            t_stopped = time.monotonic()
        figures = load.finish()
    finally:
        load.stop()
    mode = t_stopped - t_started
    return {
        "mode_s": mode,
        "total_s": mode,
        "pg_backup_start_s": start_s,
        "copy_s": t_copied - t_started,
        "pg_backup_stop_s": t_stopped - t_copied,
        "copied_bytes": copied.bytes,
        "copied_files": copied.files,
        **figures,
    }


def _median(rounds: list[dict], key: str, digits: int = 3) -> float:
    return round(statistics.median(r[key] for r in rounds), digits)


def measure_size(scale: int, rounds: int, where: Path = SHM) -> dict[str, Any]:
    """Both modes, ``rounds`` rounds each, on a pgbench -s ``scale`` cluster on a fresh btrfs volume."""
    data_mb = scale * MB_PER_SCALE
    image_mb = int(3 * data_mb) + 2048
    free_mb = shutil.disk_usage(where).free / 2**20
    if free_mb < 2.5 * data_mb + 1024:  # the image as written (data, WAL), one copy, headroom
        raise RuntimeError(
            f"not enough free space in {where}: {free_mb / 1024:.1f} GB free, pgbench -s {scale} needs"
            f" {(2.5 * data_mb + 1024) / 1024:.1f} GB (its btrfs image and one copy)"
        )
    say(f"  pgbench -s {scale} on btrfs (a {image_mb / 1024:.1f} GB sparse image in {where})")
    with btrfs_volume(image_mb, "pgsb-bench-btrfs-", where) as mnt:
        subvolume(mnt / "pgdata", SERVER_USER)
        snapshot_dir = mnt / "snapshots"
        snapshot_dir.mkdir()
        dest = Path(tempfile.mkdtemp(prefix="pgsb-bench-snapcopy-", dir=where))
        cluster = load_pgbench(mnt / "pgdata" / "data", scale)
        try:
            cluster.stop()
            cluster.configure({"wal_level": "replica", "max_wal_senders": 4, "fsync": "on"})
            cluster.start()
            cluster.sql("CHECKPOINT")
            os.sync()
            data_bytes = du_bytes(cluster.datadir)
            wal_bytes = du_bytes(cluster.datadir / "pg_wal")
            each: dict[str, list[dict]] = {"snapshot": [], "copy": []}
            with cluster.connect() as conn:
                for round_ in range(rounds):
                    order = ["snapshot", "copy"] if round_ % 2 == 0 else ["copy", "snapshot"]
                    for mode in order:
                        out = dest / "copy"
                        _remove(out)
                        name = f"s{scale}-r{round_}"
                        if mode == "snapshot":
                            r = snapshot_round(cluster, conn, snapshot_dir, out, name)
                        else:
                            r = copy_round(cluster, conn, out, name)
                        each[mode].append(r)
                        say(
                            f"    round {round_ + 1} {mode}: backup mode {r['mode_s']:.3f} s, total"
                            f" {r['total_s']:.2f} s (load {r['load_tps']} tx/s)"
                        )
                    _remove(dest / "copy")
        finally:
            cluster.stop()
            shutil.rmtree(dest, ignore_errors=True)
    snap, copy = each["snapshot"], each["copy"]
    return {
        "scale": scale,
        "data_gb": round(data_bytes / 2**30, 2),
        "pg_wal_gb": round(wal_bytes / 2**30, 2),
        "copied_gb": round(statistics.median(r["copied_bytes"] for r in snap + copy) / 2**30, 2),
        "image_mb": image_mb,
        "snapshot_mode_s": _median(snap, "mode_s"),
        "snapshot_total_s": _median(snap, "total_s", 2),
        "copy_mode_s": _median(copy, "mode_s", 2),
        "copy_total_s": _median(copy, "total_s", 2),
        "snapshot_take_s": _median(snap, "take_s"),
        "snapshot_copy_out_s": _median(snap, "copy_out_s", 2),
        "snapshot_delete_s": _median(snap, "delete_s"),
        "pg_backup_start_s": _median(snap + copy, "pg_backup_start_s"),
        "pg_backup_stop_s": _median(snap + copy, "pg_backup_stop_s"),
        "load_tps": round(statistics.median(r["load_tps"] for r in snap + copy)),
        "load_wal_mb_s": round(statistics.median(r["load_wal_mb_s"] for r in snap + copy), 1),
        "rounds": {
            mode: [{k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()} for r in rs]
            for mode, rs in each.items()
        },
    }


def run(small_scale: int = 20, large_scale: int = 90, rounds: int = 3, where: Path = SHM) -> dict[str, Any]:
    """The figures at both sizes; ``detail`` holds everything but the results file's keys.

    :param small_scale: the small cluster's pgbench scale.
    :param large_scale: the large one's (at least 4 x the small one: the data sizes compared).
    :param rounds: rounds of each mode at each size.
    :param where: the tmpfs folder for the btrfs images and the copies.
    """
    say(
        f"backup mode of a btrfs snapshot backup against a copy in backup mode: pgbench -s {small_scale} and"
        f" -s {large_scale}, {rounds} round(s) each, under pgbench -c {LOAD_CLIENTS} -j {LOAD_THREADS}"
    )
    if large_scale < 4 * small_scale:
        say(f"  WARNING: the sizes are less than 4 x apart ({small_scale}, {large_scale})")
    sizes = {
        "small": measure_size(small_scale, rounds, where),
        "large": measure_size(large_scale, rounds, where),
    }
    out: dict[str, Any] = {}
    for size, fig in sizes.items():
        out[f"snapshot_mode_s_{size}"] = fig["snapshot_mode_s"]
        out[f"copy_mode_s_{size}"] = fig["copy_mode_s"]
        out[f"snapshot_total_s_{size}"] = fig["snapshot_total_s"]
        out[f"copy_total_s_{size}"] = fig["copy_total_s"]
        out[f"snapshot_{size}_gb"] = fig["data_gb"]
        say(
            f"  {fig['data_gb']:.2f} GB (pgbench -s {fig['scale']}): backup mode"
            f" {fig['snapshot_mode_s']:.3f} s with snapshots (take {fig['snapshot_take_s']:.3f} s),"
            f" {fig['snapshot_total_s']:.2f} s with the copy-out; a copy in backup mode:"
            f" {fig['copy_mode_s']:.2f} s"
            f" (load {fig['load_tps']} tx/s, {fig['load_wal_mb_s']} MB/s of WAL)"
        )
    out["detail"] = {
        "rounds": rounds,
        "where": str(where),
        "load": f"pgbench -c {LOAD_CLIENTS} -j {LOAD_THREADS} -n (TPC-B-like, flat out), one per backup",
        "server": "fsync on, wal_level replica, archive_mode off, shared_buffers 256MB, max_wal_size 2GB",
        "page_cache": "nothing dropped; the copy in backup mode reads the live files from the page cache, the"
        " copy-out a fresh snapshot's files, which share no page cache with them (read through btrfs and"
        " the loop device from the image on tmpfs)",
        "copy": "copy_data_directory: SHA-256 of every file, fsync, the CPU count's workers, into tmpfs",
        **sizes,
        "load_avg_at_end": [round(x, 2) for x in os.getloadavg()],
    }
    return out


if __name__ == "__main__":
    small = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    large = int(sys.argv[2]) if len(sys.argv) > 2 else 90
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    print(json.dumps(run(small, large, n), indent=1))
