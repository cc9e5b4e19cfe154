"""Figure 10: a full backup and its restore, ours beside pgBackRest's, on one cluster with the same data.

One cluster filled by ``pgbench -i -s SCALE`` (~1 GB of table data at 65), restarted with WAL archiving
into pgBackRest's repository and into a plain archive folder alike (``archive_command = pgbackrest
archive-push %p && cp %p ARCHIVE/%f``: both tools' backups wait for the same command at their stop). Its
repository is in the work folder, on the same disk as everything else: ``process-max`` the CPU count,
``start-fast``, ``repo1-retention-full=1`` with ``expire-auto=n`` (``pgbackrest expire`` runs after each
restore, outside the clock: ours removes nothing either). The cluster is idle throughout. ROUNDS rounds,
each round these in turn, the next round starting one step later (each figure the median of its rounds):

1. ``pgbackrest backup --type=full --compress-type=none``, then ``pgbackrest restore`` of it
   (``--type=immediate --target-action=promote --archive-mode=off``, ``process-max`` the CPU count) into an
   empty folder: ``pgbackrest_backup_mb_s``, ``pgbackrest_restore_mb_s``;
2. the same with ``--compress-type=lz4`` (``detail``'s ``pgbackrest``);
3. ours, plain: pg_backup_start (fast checkpoint) in one session, the copy operator's engine
   (:func:`~pg_safe_backup.files.copier.copy_data_directory`: the CPU count's workers, SHA-256 of every
   file, every file and folder fsynced), pg_backup_stop (which waits for the archiver, as pgBackRest waits
   for the stop segment in its repository), the label stored and the ``backup_manifest`` written from the
   copy's checksums, synced: ``backup_mb_s``; then ``pg-safe-backup restore BACKUP TARGET --wal-archive
   ARCHIVE --target-immediate --target-action promote`` as a process (its copy engine, the CPU count's
   workers, every file synced): ``restore_mb_s``;
4. ours as tar + zstd (level 3, the CPU count's threads, synced; its manifest from the records) and its
   restore by the same command (one thread extracts the archive) (``detail``'s ``ours_tar_zstd``);
5. in the first S3_ROUNDS rounds (3 at most), both of ours into a local S3 server (moto, over HTTP on
   127.0.0.1, on the same cores; the copy operator's way: Airflow's ObjectStoragePath of an attached s3fs):
   plain by :func:`~pg_safe_backup.files.objects.upload_tree` (``copy_s3_mb_s``: the upload alone) and
   tar + zstd; each restored by ``pg-safe-backup restore s3://BUCKET/PREFIX TARGET --storage-option
   endpoint_url=... --storage-option key=... --storage-option secret=...`` (``restore_s3_mb_s``: plain).
   The store keeps what it holds in its memory, and pgBackRest's S3 repository needs TLS: no peer here.

Each side is timed from its first step to its last: pgBackRest's process (its checkpoint, copy, stop, wait
for the archived WAL, manifest, fsyncs), and ours in this process from pg_backup_start to the synced
manifest. Before each timed backup and restore the page cache is written back and dropped (as root,
``page_cache_dropped_before_each``): each reads from disk. Outside the clock, every restore is started
as a server, recovers to the backup's end, is promoted, and answers ``SELECT count(*),
sum(hashtext(a::text))`` of pgbench_accounts and the row counts of the other pgbench tables as the source
does; a difference stops the run. MB/s is of the data directory as a backup holds it (``du -sb`` of the
data directory minus its ``pg_wal/``), the same for every tool; MB are 2**20 bytes.

``python -m bench.peerbench WORKDIR SCALE [ROUNDS [S3_ROUNDS]]`` runs it alone and prints its JSON.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from bench.common import argv_workdir, say, tool_version
from demo.s3 import KEY as S3_KEY
from demo.s3 import SECRET as S3_SECRET
from demo.s3 import LocalS3
from pg_safe_backup.local_cluster import LocalCluster, as_server_user, give_to_server_user

MB = 2**20
STANZA = "bench"
#: The Airflow connection id our S3 backups are written through (the copy operator's ObjectStoragePath).
S3_CONN_ID = "bench_peer_s3"
#: pgBackRest's compressions measured; the first is the results file's figure (like for like: our plain
#: copy compresses nothing either).
PGBACKREST_COMPRESSIONS = ("none", "lz4")
#: The data a restore must give back, as the source answers it.
FINGERPRINT = (
    "SELECT (SELECT count(*) FROM pgbench_accounts), (SELECT sum(hashtext(a::text)) FROM pgbench_accounts a),"
    " (SELECT count(*) FROM pgbench_branches), (SELECT count(*) FROM pgbench_tellers),"
    " (SELECT count(*) FROM pgbench_history)"
)
_quiet = logging.getLogger("bench.peerbench.quiet")  # store_label's notes on a tar copy, not wanted here
_quiet.setLevel(logging.ERROR)


def _du(path: Path) -> int:
    return int(subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True).stdout.split()[0])


def _env() -> dict[str, str]:
    """This interpreter's path for a child (this checkout's package first)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}


def _cold() -> bool:
    from bench.restorebench import _cold

    return _cold()


def _fresh(folder: Path) -> Path:
    """``folder`` made empty, its parent the server's OS user's (a restore's target, its socket beside)."""
    shutil.rmtree(folder.parent, ignore_errors=True)
    folder.parent.mkdir(parents=True)
    give_to_server_user(folder.parent)
    return folder


def _fingerprint(cluster: LocalCluster) -> list[Any]:
    return [str(v) for v in cluster.sql(FINGERPRINT)[0]]


def _check_restored(datadir: Path, expected: list[Any]) -> float:
    """Start the restored ``datadir`` (its socket beside it), wait until it is promoted, compare its data
    with ``expected``; stop it. The seconds from the start to promoted.

    :raises RuntimeError: it did not recover, or its data differs.
    """
    from bench.restorebench import _wait_promoted

    server = LocalCluster(datadir)
    server.configure({"unix_socket_directories": f"'{datadir.parent}'"})
    began = time.monotonic()
    server.start(timeout=600)
    try:
        _wait_promoted(server)
        seconds = time.monotonic() - began
        got = _fingerprint(server)
    finally:
        server.stop("immediate")
    if got != expected:
        raise RuntimeError(f"the restore in {datadir} holds other data: {got}, the source {expected}")
    return seconds


class PgBackRest:
    """Debian's pgBackRest with a repository in ``root``, for the stanza of ``cluster``."""

    def __init__(self, root: Path, cluster: LocalCluster, processes: int) -> None:
        self.exe = shutil.which("pgbackrest")
        if not self.exe:
            raise RuntimeError("pgbackrest is not installed (Debian package pgbackrest: `make prereqs`)")
        self.root, self.repo, self.conf = root, root / "repo", root / "pgbackrest.conf"
        root.mkdir(parents=True)
        self.conf.write_text(
            "[global]\n"
            f"repo1-path={self.repo}\n"
            "repo1-retention-full=1\n"
            # Each backup's expiry (here: removing the backup before it, a GB) is run after the round,
            # outside the clock: ours removes nothing either.
            "expire-auto=n\n"
            f"lock-path={root / 'lock'}\n"
            f"log-path={root / 'log'}\n"
            f"spool-path={root / 'spool'}\n"
            "log-level-console=warn\nlog-level-file=off\n"
            f"process-max={processes}\n"
            "start-fast=y\n"
            "compress-type=none\n"
            f"[{STANZA}]\n"
            f"pg1-path={cluster.datadir}\npg1-port={cluster.port}\n"
            f"pg1-socket-path={cluster.socket_dir}\npg1-user=postgres\n"
        )
        give_to_server_user(root)

    def command(self, *words: str) -> list[str]:
        return [str(self.exe), f"--config={self.conf}", f"--stanza={STANZA}", *words]

    def archive_command(self) -> str:
        return " ".join(shlex.quote(w) for w in self.command()) + " archive-push %p"

    def run(self, *words: str) -> tuple[float, str]:
        """Run ``pgbackrest WORDS`` as the server's OS user; its seconds and output."""
        began = time.monotonic()
        done = subprocess.run(as_server_user(self.command(*words)), capture_output=True, text=True)
        seconds = time.monotonic() - began
        if done.returncode:
            raise RuntimeError(
                f"pgbackrest {' '.join(words)} failed ({done.returncode}): {done.stderr.strip()[-2000:]}"
            )
        return seconds, done.stdout

    def newest(self) -> dict[str, Any]:
        """The newest backup in the repository, as ``pgbackrest info --output=json`` lists it."""
        _, out = self.run("--output=json", "info")
        return json.loads(out)[0]["backup"][-1]


def pgbackrest_round(
    rest: PgBackRest, compression: str, cores: int, work: Path, expected: list[Any], round_: int = 0
) -> dict[str, Any]:
    """One full backup by pgBackRest with ``compression``, then its restore into an empty folder, checked."""
    cold = _cold()
    backup_s, _ = rest.run("--type=full", f"--compress-type={compression}", "backup")
    newest = rest.newest()
    stored = _du(rest.repo / "backup" / STANZA / newest["label"])
    target = _fresh(work / "peer_restore" / "data")
    target.mkdir(mode=0o700)
    give_to_server_user(target)
    cold = _cold() and cold
    restore_s, _ = rest.run(
        f"--pg1-path={target}",
        f"--process-max={cores}",
        "--type=immediate",
        "--target-action=promote",
        "--archive-mode=off",
        "restore",
    )
    recovery_s = _check_restored(target, expected)
    shutil.rmtree(target.parent, ignore_errors=True)
    rest.run("expire")  # the backup before this one (repo1-retention-full=1)
    return {
        "backup_s": round(backup_s, 2),
        "restore_s": round(restore_s, 2),
        "recovery_s": round(recovery_s, 2),
        "stored_mb": round(stored / MB, 1),
        "label": newest["label"],
        "page_cache_dropped": cold,
    }


@dataclass(frozen=True)
class Place:
    """Where one of our backups goes: a local folder, or a prefix of the local S3 server (``s3``)."""

    name: str
    tar: bool
    s3: LocalS3 | None = None

    def target(self, work: Path, round_: int) -> Any:
        """The backup's folder: a ``Path``, or the prefix as the copy operator writes it (Airflow's
        ObjectStoragePath of an attached filesystem)."""
        if self.s3 is None:
            return work / f"peer_{self.name}"
        return self.s3.attach(S3_CONN_ID) / f"{self.name}{round_}"

    def restore_args(self, target: Any) -> list[str]:
        """``pg-safe-backup restore``'s BACKUP argument for ``target`` (a URL and its --storage-option)."""
        if self.s3 is None:
            return [str(target)]
        options = {"endpoint_url": self.s3.endpoint_url, "key": S3_KEY, "secret": S3_SECRET}
        url = f"s3://{self.s3.bucket}/{target.name}"
        return [url, *(w for k, v in options.items() for w in ("--storage-option", f"{k}={v}"))]

    def remove(self, target: Any) -> None:
        if self.s3 is None:
            shutil.rmtree(target, ignore_errors=True)
        else:
            fs = self.s3.filesystem()
            if fs.exists(f"{self.s3.bucket}/{target.name}"):
                fs.rm(f"{self.s3.bucket}/{target.name}", recursive=True)


def _ours_backup(cluster: LocalCluster, place: Place, backup: Any, system_identifier: str) -> dict[str, Any]:
    """Our backup of ``cluster`` into ``backup`` (``place``'s), timed from pg_backup_start to the stored
    manifest: plain (the copy engine, or upload_tree into S3) or tar + zstd."""
    from pg_safe_backup.files.copier import copy_data_directory
    from pg_safe_backup.files.label import store_label
    from pg_safe_backup.files.manifest import (
        FileRecord,
        backup_manifest_of_records,
        write_backup_manifest,
        write_manifest_file,
    )
    from pg_safe_backup.files.objects import upload_tree
    from pg_safe_backup.files.tarball import write_tar_backup

    place.remove(backup)
    local = place.s3 is None
    major = int((cluster.datadir / "PG_VERSION").read_text())
    cold = _cold()
    began = time.monotonic()
    with cluster.connect() as conn:  # the backup's one session, held through the copy
        conn.execute("SELECT pg_backup_start(%s, true)", ["bench peer"])
        started = time.monotonic()
        if place.tar:
            copied = write_tar_backup(cluster.datadir, backup, compression="zstd", log=_quiet)
        elif local:
            copied = copy_data_directory(cluster.datadir, backup, fsync=True)
        else:
            copied = upload_tree(cluster.datadir, backup, log=_quiet)
        copy_s = time.monotonic() - started
        lsn, label, spcmap = conn.execute(
            "SELECT lsn::text, labelfile, spcmapfile FROM pg_backup_stop(true)"
        ).fetchone()
    stopped = time.monotonic()
    plain_local = local and not place.tar
    store_label(
        backup,
        {"backup_label": label, "tablespace_map": spcmap},
        local_copy=backup if plain_local else None,
        system_identifier=system_identifier,
        stop_lsn=lsn,
        log=_quiet,
    )
    if plain_local:  # from the copy, its checksums spare a second read (the store task's way)
        write_backup_manifest(
            backup,
            backup_label=label,
            stop_lsn=lsn,
            system_identifier=system_identifier,
            checksums=copied.checksums,
        )
    else:  # from the copier's records
        records = {
            path: FileRecord(copied.sizes[path], copied.mtimes_ns[path], sha)
            for path, sha in copied.checksums.items()
        }
        content = backup_manifest_of_records(
            records,
            label_files={"backup_label": label, "tablespace_map": spcmap},
            stop_lsn=lsn,
            system_identifier=system_identifier,
            major=major,
        )
        if local:
            write_manifest_file(backup, content)
        else:
            (backup / "backup_manifest").write_bytes(content)
    seconds = time.monotonic() - began
    stored = sum(copied.archives.values()) if place.tar else copied.bytes
    return {
        "backup_s": round(seconds, 2),
        "copy_s": round(copy_s, 2),
        "start_s": round(started - began, 2),
        "stop_s": round(stopped - started - copy_s, 2),
        "label_and_manifest_s": round(seconds - (stopped - began), 2),
        "copied_mb": round(copied.bytes / MB, 1),
        "stored_mb": round((_du(backup) if local else stored) / MB, 1),
        "page_cache_dropped": cold,
    }


def _ours_restore(backup: list[str], target: Path, archive: Path) -> dict[str, Any]:
    """``pg-safe-backup restore BACKUP...`` into the empty ``target``, as a process: its seconds, and its
    own (the interpreter's start and imports left out) from its summary line."""
    cold = _cold()
    cmd = [sys.executable, "-m", "pg_safe_backup", "restore", *backup, str(target)]
    cmd += ["--wal-archive", str(archive), "--target-immediate", "--target-action", "promote"]
    began = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, env=_env())
    seconds = time.monotonic() - began
    if done.returncode:
        raise RuntimeError(f"pg-safe-backup restore failed ({done.returncode}): {done.stderr[-2000:]}")
    own = re.search(r"MB in ([0-9.]+) s", done.stdout)
    return {
        "restore_s": round(seconds, 2),
        "restore_in_process_s": float(own[1]) if own else None,
        "page_cache_dropped": cold,
    }


def ours_round(
    cluster: LocalCluster,
    place: Place,
    archive: Path,
    work: Path,
    expected: list[Any],
    sysid: str,
    round_: int,
) -> dict[str, Any]:
    """Our backup into ``place``, then its restore into an empty folder, checked."""
    backup = place.target(work, round_)
    out = _ours_backup(cluster, place, backup, sysid)
    target = _fresh(work / "peer_restore" / "data")
    restored = _ours_restore(place.restore_args(backup), target, archive)
    out["page_cache_dropped"] = out["page_cache_dropped"] and restored.pop("page_cache_dropped")
    out.update(restored)
    out["recovery_s"] = round(_check_restored(target, expected), 2)
    shutil.rmtree(target.parent, ignore_errors=True)
    place.remove(backup)
    return out


def run(work: Path, scale: int, rounds: int = 3, s3_rounds: int | None = None) -> dict[str, Any]:
    """Figure 10 on a pgbench cluster of ``scale`` in ``work``: the results file's keys and a ``detail``.

    :param work: the work folder (cluster, repository, backups, restores).
    :param scale: pgbench's scale (65: ~1 GB).
    :param rounds: rounds of the local backups and restores.
    :param s3_rounds: of those, the first rounds that also back up into the local S3 server and restore
        from it (default: up to 3; 0: none).
    """
    from bench.common import make_archive
    from bench.dagbench import load_pgbench
    from demo.s3 import local_s3

    s3_rounds = min(rounds, 3) if s3_rounds is None else min(s3_rounds, rounds)
    cores = os.cpu_count() or 1
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    archive = make_archive(work / "peer_wal_archive")
    datadir = work / f"peer_s{scale}" / "data"
    cluster = load_pgbench(datadir, scale)
    rest = None
    try:
        cluster.stop()
        rest = PgBackRest(work / "peer_pgbackrest", cluster, cores)
        command = f"{rest.archive_command()} && cp %p {shlex.quote(str(archive))}/%f"
        cluster.configure(
            {
                "wal_level": "replica",
                "max_wal_senders": 4,
                "unix_socket_directories": f"'{cluster.socket_dir}'",
                "archive_mode": "on",
                "archive_command": "'" + command.replace("'", "''") + "'",
                "archive_timeout": 0,
            }
        )
        cluster.start()
        rest.run("stanza-create")
        cluster.sql("CHECKPOINT")
        expected = _fingerprint(cluster)
        sysid = str(cluster.sql("SELECT system_identifier FROM pg_control_system()")[0][0])
        data_bytes = _du(datadir) - _du(datadir / "pg_wal")
        with ExitStack() as stack:
            s3 = stack.enter_context(local_s3("bench-peer")) if s3_rounds else None
            places = [Place("ours", False), Place("ours_tar_zstd", True)]
            if s3 is not None:
                places += [Place("ours_s3", False, s3), Place("ours_tar_zstd_s3", True, s3)]
            steps: dict[str, Callable[[int], dict[str, Any]]] = {
                **{
                    f"pgbackrest_{c}": partial(pgbackrest_round, rest, c, cores, work, expected)
                    for c in PGBACKREST_COMPRESSIONS
                },
                **{p.name: partial(ours_round, cluster, p, archive, work, expected, sysid) for p in places},
            }
            per: dict[str, list[dict[str, Any]]] = {kind: [] for kind in steps}
            for round_ in range(rounds):
                order = [k for k in steps if round_ < s3_rounds or not k.endswith("_s3")]
                # Each round starts one step later: none goes first, or last, every round.
                shift = round_ % len(order)
                for kind in order[shift:] + order[:shift]:
                    say(f"  round {round_ + 1} of {rounds}: {kind}")
                    per[kind].append({**steps[kind](round_), "round": round_})
    finally:
        cluster.stop()
        shutil.rmtree(datadir.parent, ignore_errors=True)
        shutil.rmtree(archive, ignore_errors=True)
        shutil.rmtree(work / "peer_restore", ignore_errors=True)
        if rest is not None:
            shutil.rmtree(rest.root, ignore_errors=True)
    data_mb = data_bytes / MB
    per = {kind: runs for kind, runs in per.items() if runs}

    def mb_s(kind: str, step: str) -> float | None:
        runs = [data_mb / r[f"{step}_s"] for r in per[kind] if r.get(f"{step}_s")]
        return round(statistics.median(runs), 1) if runs else None

    def figures(kind: str) -> dict[str, Any]:
        runs = per[kind]
        out = {
            "backup_mb_s": mb_s(kind, "backup"),
            "restore_mb_s": mb_s(kind, "restore"),
            "stored_mb": statistics.median(r["stored_mb"] for r in runs),
            "all_backup_mb_s": [round(data_mb / r["backup_s"], 1) for r in runs],
            "all_restore_mb_s": [round(data_mb / r["restore_s"], 1) for r in runs],
        }
        if kind.startswith("ours"):
            out["copy_alone_mb_s"] = mb_s(kind, "copy")
            out["restore_in_process_mb_s"] = mb_s(kind, "restore_in_process")
        return {**out, "rounds": runs}

    detail = {kind: figures(kind) for kind in per}
    ours, theirs = detail["ours"], detail[f"pgbackrest_{PGBACKREST_COMPRESSIONS[0]}"]
    s3_plain = detail.get("ours_s3", {})
    return {
        "pgbackrest_backup_mb_s": theirs["backup_mb_s"],
        "pgbackrest_restore_mb_s": theirs["restore_mb_s"],
        "backup_mb_s": ours["backup_mb_s"],
        "restore_mb_s": ours["restore_mb_s"],
        "copy_s3_mb_s": s3_plain.get("copy_alone_mb_s"),
        "restore_s3_mb_s": s3_plain.get("restore_mb_s"),
        "detail": {
            "scale": scale,
            "rounds": rounds,
            "s3_rounds": s3_rounds,
            "cores": cores,
            "process_max": cores,
            "data_mb": round(data_mb, 1),
            "pgbackrest_keys_compression": PGBACKREST_COMPRESSIONS[0],
            "pgbackrest": tool_version(["pgbackrest", "version"]),
            "page_cache_dropped_before_each": all(r["page_cache_dropped"] for v in per.values() for r in v),
            "source_fingerprint": expected,
            "load_avg_at_start": load_at_start,
            "load_avg_at_end": [round(x, 2) for x in os.getloadavg()],
            **detail,
        },
    }


if __name__ == "__main__":
    work = argv_workdir()
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    s3_rounds = int(sys.argv[4]) if len(sys.argv) > 4 else None
    print(json.dumps(run(work, int(sys.argv[2]), rounds, s3_rounds), indent=1))
