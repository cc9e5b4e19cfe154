"""Figure 7: the copy operator's engine against ``cp -a``, ``rsync -a`` and ``pg_basebackup``, side by side.

On a cluster filled by ``pgbench -i -s SCALE`` (WAL level replica, for pg_basebackup), each round copies
its data directory into the work folder with each tool in turn (the copy deleted and the disk synced
before the next):

* ours, plain, local, SHA-256 of every file and fsync (its defaults: ``copy_mb_s``); ours without fsync;
* ``cp -a``; ``cp -a`` then ``sync`` (the durable equivalent); ``cp -a`` then the manifest's checksums
  read from the copy (the read ours saves); ``rsync -a``;
* ``pg_basebackup -Fp -X none --manifest-checksums=SHA256`` (a fast checkpoint first);
* ours as tar + zstd (the CPU count's threads) into a local S3 server (moto, over HTTP on 127.0.0.1:
  ``copy_tar_zstd_s3_mb_s``), beside ``tar -c | zstd -T0 -3`` into a file (``tar_zstd_mb_s``).

Ours runs in a child process, whose maximum RSS is reported (``copy_rss_mb``, the largest), also for a
plain copy of a cluster SMALL_SCALE large: RSS at two data sizes. Its MB/s is from the child's wall time
(the interpreter's start included) and the bytes it copied; the others' from ``du -sb`` of the data
directory (pg_wal's WAL, which ours leaves out, included: it flatters them by a few percent). MB are
2**20 bytes; each figure is the median over the rounds.

``python -m bench.copybench WORKDIR SCALE [ROUNDS [SMALL_SCALE]]`` runs it alone and prints its JSON.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

#: A child's maximum RSS: VmHWM, the high-water mark of its own memory since exec. Not getrusage()'s
#: ru_maxrss, which keeps the parent's RSS at the fork (the benchmark's, Airflow imported) across exec.
_HWM = """
import json, sys
def max_rss_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
"""

#: Ours in a child process: its figures on stdout as JSON. argv: source, destination, fsync (1/0).
_OURS = (
    _HWM
    + """
from pg_safe_backup.files.copier import copy_data_directory
r = copy_data_directory(sys.argv[1], sys.argv[2], fsync=sys.argv[3] == "1")
print(json.dumps({"bytes": r.bytes, "seconds": r.seconds, "rss_mb": max_rss_mb()}))
"""
)

#: Ours as tar + zstd into the S3 server. argv: source, endpoint URL, bucket, prefix.
_OURS_TAR_S3 = (
    _HWM
    + """
from demo.s3 import LocalS3
from pg_safe_backup.files.tarball import write_tar_backup
target = LocalS3(sys.argv[2], sys.argv[3]).attach("bench_s3") / sys.argv[4]
r = write_tar_backup(sys.argv[1], target, compression="zstd")
print(json.dumps({"bytes": r.bytes, "seconds": r.seconds, "stored": sum(r.archives.values()),
                  "rss_mb": max_rss_mb()}))
"""
)

#: ``cp -a``, then the checksums ours computes while copying: write_manifest() reading the copy (its
#: default threads), as a user of cp gets a manifest.
_CP_THEN_MANIFEST = """
import subprocess, sys
from pathlib import Path
from typing import Any
from pg_safe_backup.files.manifest import WalRange, write_manifest
subprocess.run(["cp", "-a", sys.argv[1], sys.argv[2]], check=True)
write_manifest(Path(sys.argv[2]), major=15, system_identifier=None, wal_ranges=[WalRange(1, "0/1", "0/2")])
"""


def _du(path: Path) -> int:
    return int(
        subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=True).stdout.split()[0]
    )


def _remove(copy: Path) -> None:
    """Delete the last tool's copy: a folder, or tar | zstd's file."""
    if copy.is_file():
        copy.unlink()
    shutil.rmtree(copy, ignore_errors=True)


def _timed(cmd: list[str]) -> tuple[float, str]:
    began = time.monotonic()
    done = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    )
    # rsync exits 24 when files vanished: normal on a live cluster.
    if done.returncode not in (0, 24):
        raise RuntimeError(f"{cmd[0]} failed ({done.returncode}): {done.stderr[-2000:]}")
    return time.monotonic() - began, done.stdout


def run(datadir: Path, work: Path, rounds: int = 3, basebackup: list[str] | None = None) -> dict:
    """Median MB/s of each tool over ``rounds`` rounds, and our copy's maximum RSS.

    :param datadir: the data directory to copy.
    :param work: a folder on the disk to copy to.
    :param rounds: rounds of the copies.
    :param basebackup: the pg_basebackup command (without ``-D``), or None to leave it out.
    """
    from demo.s3 import local_s3

    copy = work / "copy"
    size_mb = _du(datadir) / 2**20
    tools = {
        "copy_mb_s": [sys.executable, "-c", _OURS, str(datadir), str(copy), "1"],
        "copy_nofsync_mb_s": [sys.executable, "-c", _OURS, str(datadir), str(copy), "0"],
        "cp_a_mb_s": ["cp", "-a", str(datadir), str(copy)],
        # cp -a returns with the copy in the page cache; ours syncs it: this is the durable equivalent.
        "cp_a_sync_mb_s": ["sh", "-c", 'cp -a "$0" "$1" && sync', str(datadir), str(copy)],
        "cp_a_then_manifest_mb_s": [sys.executable, "-c", _CP_THEN_MANIFEST, str(datadir), str(copy)],
        "rsync_mb_s": ["rsync", "-a", f"{datadir}/", f"{copy}/"],
        "tar_zstd_mb_s": [
            "sh",
            "-c",
            'tar -cf - -C "$0" . | zstd -q -T0 -3 -o "$1"',
            str(datadir),
            str(copy),
        ],
    }
    if basebackup:
        tools["pg_basebackup_mb_s"] = [*basebackup, "-D", str(copy)]
    speeds: dict[str, list[float]] = {name: [] for name in [*tools, "copy_tar_zstd_s3_mb_s"]}
    rss: dict[str, float] = {}
    stored_mb: list[float] = []
    inner: dict[str, list[float]] = {}
    with local_s3("bench-backups") as s3:
        tools["copy_tar_zstd_s3_mb_s"] = [
            sys.executable,
            "-c",
            _OURS_TAR_S3,
            str(datadir),
            s3.endpoint_url,
            s3.bucket,
        ]
        for round_ in range(rounds):
            for name, cmd in tools.items():
                _remove(copy)
                os.sync()
                time.sleep(1)
                if name == "copy_tar_zstd_s3_mb_s":
                    cmd = [*cmd, f"round{round_}"]  # a prefix of its own: the store refuses a used one
                seconds, out = _timed(cmd)
                if name.startswith("copy"):
                    figures = json.loads(out.strip().splitlines()[-1])  # after any log line
                    kind = "tar_zstd_s3" if "stored" in figures else "plain"
                    rss[kind] = max(rss.get(kind, 0.0), round(figures["rss_mb"], 1))
                    speeds[name].append(figures["bytes"] / 2**20 / seconds)
                    # The copy alone, without the child's start (Python; Airflow for the S3 one).
                    inner.setdefault(name, []).append(figures["bytes"] / 2**20 / figures["seconds"])
                    if "stored" in figures:
                        stored_mb.append(figures["stored"] / 2**20)
                else:
                    speeds[name].append(size_mb / seconds)
    _remove(copy)
    return {
        **{name: round(statistics.median(v), 1) for name, v in speeds.items() if v},
        "all_mb_s": {name: [round(x, 1) for x in v] for name, v in speeds.items()},
        "copy_alone_mb_s": {name: round(statistics.median(v), 1) for name, v in inner.items()},
        "copy_rss_mb": max(rss.values()),
        "rss_mb": rss,
        "data_mb": round(size_mb, 1),
        "tar_zstd_stored_mb": round(statistics.median(stored_mb), 1),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
    }


def _cluster(work: Path, scale: int) -> Any:
    """A running pgbench cluster of ``scale`` in ``work``, WAL level replica (for pg_basebackup)."""
    from bench.dagbench import load_pgbench
    from pg_safe_backup.local_cluster import LocalCluster

    datadir = work / f"copy_s{scale}" / "data"
    cluster = LocalCluster(datadir) if datadir.exists() else load_pgbench(datadir, scale)
    if cluster.is_running():
        cluster.stop()
    cluster.configure(
        {"wal_level": "replica", "max_wal_senders": 4, "unix_socket_directories": f"'{cluster.socket_dir}'"}
    )
    cluster.start()
    cluster.sql("CHECKPOINT")
    return cluster


def main(work: Path, scale: int, rounds: int, small_scale: int | None = None) -> dict:
    """The figures of :func:`run` on a pgbench cluster of ``scale`` in ``work``, and our copy's RSS on one of
    ``small_scale`` too (when given); ``detail`` holds everything but the results file's keys.

    :param work: the work folder (clusters and copies).
    :param scale: the pgbench scale of the measured cluster.
    :param rounds: rounds of the copies.
    :param small_scale: a smaller cluster's scale, for RSS at a second data size.
    """
    from pg_safe_backup.local_cluster import find_bindir

    small_figures = None
    if small_scale:
        small = _cluster(work, small_scale)
        try:
            small_figures = run(small.datadir, work, 1)  # for the RSS: one round, no pg_basebackup
        finally:
            small.stop()
            shutil.rmtree(small.datadir.parent, ignore_errors=True)
    cluster = _cluster(work, scale)
    try:
        datadir = cluster.datadir
        client = find_bindir(int((datadir / "PG_VERSION").read_text()))
        basebackup = [
            str(client / "pg_basebackup"),
            *("-h", str(cluster.socket_dir), "-p", str(cluster.port), "-U", "postgres"),
            *("-Fp", "-X", "none", "--manifest-checksums=SHA256", "-c", "fast"),
        ]
        found = (client / "pg_basebackup").exists()
        figures = run(datadir, work, rounds, basebackup if found else None)
    finally:
        cluster.stop()
        shutil.rmtree(cluster.datadir.parent, ignore_errors=True)
    keys = (
        "copy_mb_s",
        "cp_a_mb_s",
        "rsync_mb_s",
        "pg_basebackup_mb_s",
        "copy_tar_zstd_s3_mb_s",
        "tar_zstd_mb_s",
        "copy_rss_mb",
    )
    detail = {"scale": scale, "rounds": rounds, **{k: v for k, v in figures.items() if k not in keys}}
    # Our copy's maximum RSS per kind (plain, tar_zstd_s3) at each data size (MB).
    by_size = [figures, small_figures] if small_figures else [figures]
    detail["rss_by_data_mb"] = {str(round(fig["data_mb"])): fig["rss_mb"] for fig in by_size}
    detail["small_scale"] = small_scale
    rss = max(fig["copy_rss_mb"] for fig in by_size)
    return {**{k: figures.get(k) for k in keys}, "copy_rss_mb": rss, "detail": detail}


if __name__ == "__main__":
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    small_scale = int(sys.argv[4]) if len(sys.argv) > 4 else None
    print(json.dumps(main(Path(sys.argv[1]), int(sys.argv[2]), rounds, small_scale), indent=1))
