"""The copy engine against ``cp -a``, ``rsync -a`` and ``pg_basebackup`` on one cluster, side by side.

``python -m bench.copybench WORKDIR SCALE [ROUNDS]``: a cluster filled by ``pgbench -i -s SCALE`` in
WORKDIR/sSCALE/data (kept, and reused by the next run), then each round copies it into WORKDIR/copy with
each tool in turn (the copy deleted and the disk synced before the next): ours with checksums and
fsync (its default), ours without fsync (as cp and rsync, which sync nothing), ``cp -a``, ``cp -a`` then
``sync``, ``cp -a`` then the manifest's checksums read from the copy (the read ours saves), ``rsync -a``,
and ``pg_basebackup -Fp -X none --manifest-checksums=SHA256`` (a fast checkpoint first). Ours
runs in a child process, whose maximum RSS is reported; its MB/s is from the child's wall time (the
interpreter's start included); the others' from ``du -sb`` of the data directory (pg_wal's WAL, which
ours leaves out, included: it flatters them by a few percent). Prints one JSON object: MB/s (MB = 2**20
bytes) per tool, the median over the rounds, and the machine.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

#: Ours in a child process: its figures on stdout as JSON.
_OURS = """
import json, resource, sys
from pg_safe_backup.files.copier import copy_data_directory
r = copy_data_directory(sys.argv[1], sys.argv[2], fsync=sys.argv[3] == "1")
print(json.dumps({"bytes": r.bytes, "seconds": r.seconds,
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

#: ``cp -a``, then the checksums ours computes while copying: write_manifest() reading the copy (its
#: default threads), as a user of cp gets a manifest.
_CP_THEN_MANIFEST = """
import subprocess, sys
from pathlib import Path
from pg_safe_backup.files.manifest import WalRange, write_manifest
subprocess.run(["cp", "-a", sys.argv[1], sys.argv[2]], check=True)
write_manifest(Path(sys.argv[2]), major=15, system_identifier=None, wal_ranges=[WalRange(1, "0/1", "0/2")])
"""


def _du(path: Path) -> int:
    return int(
        subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=True).stdout.split()[0]
    )


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
    }
    if basebackup:
        tools["pg_basebackup_mb_s"] = [*basebackup, "-D", str(copy)]
    speeds: dict[str, list[float]] = {name: [] for name in tools}
    rss: list[float] = []
    for _ in range(rounds):
        for name, cmd in tools.items():
            shutil.rmtree(copy, ignore_errors=True)
            os.sync()
            time.sleep(1)
            seconds, out = _timed(cmd)
            if name.startswith("copy"):
                figures = json.loads(out)
                rss.append(figures["rss_mb"])
                speeds[name].append(figures["bytes"] / 2**20 / seconds)
            else:
                speeds[name].append(size_mb / seconds)
    shutil.rmtree(copy, ignore_errors=True)
    return {
        **{name: round(statistics.median(v), 1) for name, v in speeds.items()},
        "all_mb_s": {name: [round(x, 1) for x in v] for name, v in speeds.items()},
        "copy_rss_mb": round(max(rss), 1),
        "data_mb": round(size_mb, 1),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "self_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main(work: Path, scale: int, rounds: int) -> dict:
    """The figures of :func:`run` on a pgbench cluster of ``scale`` in ``work``, WAL level replica (for
    pg_basebackup)."""
    from bench.dagbench import load_pgbench
    from pg_safe_backup.local_cluster import LocalCluster, find_bindir

    datadir = work / f"s{scale}" / "data"
    cluster = LocalCluster(datadir) if datadir.exists() else load_pgbench(datadir, scale)
    if cluster.is_running():
        cluster.stop()
    cluster.configure(
        {"wal_level": "replica", "max_wal_senders": 4, "unix_socket_directories": f"'{cluster.socket_dir}'"}
    )
    cluster.start()
    try:
        cluster.sql("CHECKPOINT")
        client = find_bindir(int((datadir / "PG_VERSION").read_text()))
        basebackup = [
            str(client / "pg_basebackup"),
            *("-h", str(cluster.socket_dir), "-p", str(cluster.port), "-U", "postgres"),
            *("-Fp", "-X", "none", "--manifest-checksums=SHA256", "-c", "fast"),
        ]
        found = (client / "pg_basebackup").exists()
        return {"scale": scale, **run(datadir, work, rounds, basebackup if found else None)}
    finally:
        cluster.stop()


if __name__ == "__main__":
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    print(json.dumps(main(Path(sys.argv[1]), int(sys.argv[2]), rounds), indent=1))
