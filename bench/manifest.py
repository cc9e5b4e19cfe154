"""Figure 6: writing the backup_manifest of a copy (``write_manifest``, SHA-256) in seconds per GB,
against ``sha256sum`` over the same files and against ``pg_basebackup`` with and without its manifest.

A cluster is filled with ``pgbench -i -s SCALE`` and stopped cleanly; its data directory is copied
(``cp -a``) and given a backup_label starting and ending at the shutdown checkpoint: the files of a
real backup copy. Then the cluster is started again, with WAL senders, for pg_basebackup.

Timed side by side, in turn, RUNS times each after one untimed run of each (warm page cache: the
copy and the data directory stay in memory, as right after a copy):

* ``write_manifest`` of the copy: SHA-256, default threads (up to 4, by CPU count), and with one;
* ``sha256sum`` over the very files the manifest lists (``xargs -0 sha256sum > /dev/null``, one
  process at a time, as a user would run it), and ``openssl dgst -sha256`` the same way;
* ``pg_basebackup -Fp -X none -c fast --manifest-checksums=SHA256`` into a new folder, and the same
  with ``--no-manifest``: the difference is what the server's own manifest costs it.

Medians are reported, in seconds per GB (10^9 bytes) of the files the manifest lists.
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import quantile, say
from bench.dagbench import load_pgbench
from pg_safe_backup.files.manifest import list_files, wal_ranges_for, write_manifest
from pg_safe_backup.files.pgcontrol import read_pg_control
from pg_safe_backup.local_cluster import LocalCluster, as_server_user
from pg_safe_backup.state import format_lsn


def timed(step: Callable[[], object]) -> tuple[float, float]:
    """Wall seconds and CPU seconds (this process's threads plus the children it waited for) of ``step``.

    :param step: what to time.
    """
    before = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    step()
    wall = time.monotonic() - t0
    after = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = sum(a.ru_utime + a.ru_stime - b.ru_utime - b.ru_stime for a, b in zip(after, before, strict=True))
    return wall, cpu


def make_copy(datadir: Path, copy: Path) -> tuple[str, int]:
    """``cp -a`` of the stopped cluster's ``datadir`` with a backup_label at its shutdown checkpoint.

    :param datadir: the cleanly stopped cluster's data directory.
    :param copy: where the copy goes (must not exist).
    :returns: the checkpoint LSN (``X/Y``) and the system identifier.
    """
    subprocess.run(["cp", "-a", str(datadir), str(copy)], check=True)
    control = read_pg_control(copy)
    lsn = format_lsn(control.checkpoint)
    # The WAL file name of timeline 1 holding the checkpoint, as the server writes it in a label.
    high, low = divmod(control.checkpoint, 1 << 32)
    segment = f"{1:08X}{high:08X}{low // control.xlog_seg_size:08X}"
    (copy / "backup_label").write_text(
        f"START WAL LOCATION: {lsn} (file {segment})\nCHECKPOINT LOCATION: {lsn}\n"
        "BACKUP METHOD: streamed\nBACKUP FROM: primary\n"
        f"START TIME: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}\n"
        "LABEL: bench manifest\nSTART TIMELINE: 1\n"
    )
    return lsn, control.system_identifier


def basebackup(cluster: LocalCluster, target: Path, manifest: bool) -> None:
    """``pg_basebackup`` of ``cluster`` into ``target`` (a new folder), as the server's OS user.

    :param cluster: the running cluster (local replication is trusted by initdb's pg_hba.conf).
    :param target: the folder to create.
    :param manifest: with a SHA-256 manifest, else ``--no-manifest``.
    """
    cluster.run(
        "pg_basebackup",
        *("-h", str(cluster.socket_dir), "-p", str(cluster.port), "-U", "postgres", "-D", str(target)),
        *("-Fp", "-X", "none", "-c", "fast"),
        "--manifest-checksums=SHA256" if manifest else "--no-manifest",
        timeout=3600,
    )


def run(work: Path, scale: int, runs: int) -> dict[str, Any]:
    say(f"backup_manifest of a pgbench -s {scale} copy: 1 warm-up and {runs} timed run(s) of each")
    root = work / "manifest"
    cluster = load_pgbench(root / "data", scale)
    try:
        cluster.stop()
        copy = root / "copy"
        lsn, system_identifier = make_copy(cluster.datadir, copy)
        major = int((copy / "PG_VERSION").read_text())
        ranges = wal_ranges_for(lsn, 1, lsn, 1, None, major)
        files = list_files(copy)
        data_bytes = sum(os.stat(e.path).st_size for e in files)
        listing = root / "files.list"
        listing.write_bytes(b"".join(e.path + b"\0" for e in files))
        # load_pgbench loads at WAL level minimal, without WAL senders: pg_basebackup needs both.
        cluster.configure({"wal_level": "replica", "max_wal_senders": 4})
        cluster.start()
        target = root / "basebackup"

        def ours(threads: int | None) -> Callable[[], object]:
            return lambda: write_manifest(
                copy, major=major, system_identifier=system_identifier, wal_ranges=ranges, threads=threads
            )

        def hash_files(*tool: str) -> Callable[[], object]:
            def step() -> None:
                with open(os.devnull, "wb") as null:
                    subprocess.run(["xargs", "-0", "-a", str(listing), *tool], stdout=null, check=True)

            return step

        def pg_basebackup(manifest: bool) -> Callable[[], object]:
            return lambda: basebackup(cluster, target, manifest)

        steps: dict[str, Callable[[], object]] = {
            "manifest": ours(None),
            "manifest_1_thread": ours(1),
            "sha256sum": hash_files("sha256sum"),
            # coreutils' sha256sum has its own SHA-256 code; OpenSSL's (hashlib's) uses the CPU's SHA
            # instructions where there are some: the speed of the hash itself.
            "openssl_sha256": hash_files("openssl", "dgst", "-sha256"),
            "pg_basebackup_manifest": pg_basebackup(True),
            "pg_basebackup_nomanifest": pg_basebackup(False),
        }
        wall: dict[str, list[float]] = {name: [] for name in steps}
        cpu: dict[str, list[float]] = {name: [] for name in steps}
        for attempt in range(runs + 1):  # the first round only warms the page cache
            for name, step in steps.items():
                seconds, cpu_seconds = timed(step)
                if attempt:
                    wall[name].append(seconds)
                    cpu[name].append(cpu_seconds)
                if target.exists():
                    shutil.rmtree(target)
                    subprocess.run(["sync"], check=True)
        # What the timed runs wrote must be a manifest PostgreSQL's verifier accepts, checksums too.
        verified = subprocess.run(
            as_server_user([str(cluster.bindir / "pg_verifybackup"), "-n", str(copy)]),
            capture_output=True,
            text=True,
        )
        if verified.returncode:
            raise RuntimeError(f"pg_verifybackup rejects the bench's manifest: {verified.stderr.strip()}")
        gb = data_bytes / 1e9
        per_gb = {name: round(quantile(v, 0.5) / gb, 3) for name, v in wall.items()}
        out = {
            "manifest_s_per_gb": per_gb["manifest"],
            "sha256sum_s_per_gb": per_gb["sha256sum"],
            "pg_basebackup_manifest_s_per_gb": per_gb["pg_basebackup_manifest"],
            "pg_basebackup_nomanifest_s_per_gb": per_gb["pg_basebackup_nomanifest"],
            "manifest_vs_sha256sum": round(per_gb["manifest"] / per_gb["sha256sum"], 3),
            "detail": {
                "scale": scale,
                "data_gb": round(gb, 3),  # 10^9 bytes of the files the manifest lists
                "files": len(files),
                "runs": runs,
                "cache": "warm: one untimed run of each first; copy and data directory in the page cache",
                "threads": min(4, os.cpu_count() or 1),
                "manifest_1_thread_s_per_gb": per_gb["manifest_1_thread"],
                "openssl_sha256_s_per_gb": per_gb["openssl_sha256"],
                "pg_basebackup_manifest_cost_s_per_gb": round(
                    per_gb["pg_basebackup_manifest"] - per_gb["pg_basebackup_nomanifest"], 3
                ),
                "wall_s_each": {name: [round(x, 2) for x in v] for name, v in wall.items()},
                # This process and the children it waited for: pg_basebackup's server side is not in it.
                "cpu_s_median": {name: round(quantile(v, 0.5), 2) for name, v in cpu.items()},
                "pg_verifybackup": verified.stdout.strip(),
                "load_avg_at_end": [round(x, 2) for x in os.getloadavg()],
            },
        }
        say(
            f"  {gb:.2f} GB in {len(files)} files: manifest {out['manifest_s_per_gb']} s/GB,"
            f" sha256sum {out['sha256sum_s_per_gb']} s/GB (x{out['manifest_vs_sha256sum']});"
            f" pg_basebackup {out['pg_basebackup_manifest_s_per_gb']} s/GB,"
            f" {out['pg_basebackup_nomanifest_s_per_gb']} s/GB without a manifest"
        )
        return out
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
