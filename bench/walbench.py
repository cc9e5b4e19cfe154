"""Figure 9: WAL archiving in segments per second through ``pg-safe-backup wal-push``, beside ``cp`` +
``sync`` and ``pgbackrest archive-push``, on one cluster under one pgbench load.

One cluster (WAL level replica, ``archive_mode = on``; fsync off as every bench cluster: only the archive
commands' own fsyncs count) in the work folder (on disk: those fsyncs are real), a pgbench load inserting
random rows (``wal_load``, about 60 kB of WAL a transaction). ROUNDS rounds, each round every archive_command
in turn, each into a fresh archive folder of its own; each figure is the median of its rounds:

1. fill: with ``archive_command = ''`` (archiving paused: PostgreSQL keeps the segments, ``.ready``) the
   load runs unthrottled until SEGMENTS segments wait (its rate is ``fill_segments_s``);
2. drain: the load goes on at a fixed rate (``load_tps`` transactions/s, over one segment a second; per
   command as measured: ``load_segments_s``), the archive_command is set (ALTER SYSTEM,
   pg_reload_conf()) and the clock runs until ``pg_stat_archiver.last_archived_wal`` reaches the last
   segment that waited, or for TIME_BOX seconds at most (a slower command: its rate over fewer segments,
   ``time_boxed``). The archiver takes the oldest first, so the figure is pg_stat_archiver's archived count
   over that time;
3. the segments the load added meanwhile are marked archived (``archive_command = 'true'``): the next
   command starts from the same backlog.

The commands (``compression`` the same for each tool that compresses, ``none`` by default):

* ``cp %p DIR/%f && sync DIR/%f DIR``: the copy and its folder fsynced, the honest ``cp`` baseline
  (``cp_sync_segments_s``);
* ``pgbackrest --stanza=bench archive-push %p`` (Debian's pgBackRest; its repository in the work folder,
  ``compress-type`` to match, one stanza-create before the clock): ``pgbackrest_push_segments_s``; and with
  ``archive-async=y process-max=PARALLEL``, which pushes the other ``.ready`` segments ahead
  (``pgbackrest_async_segments_s``);
* ``pg-safe-backup wal-push --archive DIR --compress C %p`` (this checkout's code): ``wal_push_segments_s``;
  and with ``--parallel PARALLEL`` (``wal_push_parallel_segments_s``).

pgBackRest's lines are left out when it is not installed, with the reason under ``skipped``; a failure of
an archive_command (pg_stat_archiver's failed count) stops the run.

``python -m bench.walbench WORKDIR [SEGMENTS [ROUNDS [COMPRESSION]]]`` runs it alone and prints its JSON.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from psycopg import Connection, sql

from bench.common import argv_workdir, tool_version
from pg_safe_backup.local_cluster import LocalCluster, as_server_user, command_for_server, give_to_server_user

SEGMENT_BYTES = 16 * 2**20
STANZA = "bench"
#: One transaction of the load: 100 rows of 512 random hex digits, about 60 kB of WAL (as compressible
#: as hex: half). Rows of 512 bytes fill segments twice as fast as 64 for the same CPU.
_HEX = "encode(sha512(random()::text::bytea), 'hex')"
LOAD_SCRIPT = (
    f"INSERT INTO wal_load (payload) SELECT {' || '.join([_HEX] * 4)} FROM generate_series(1, 100);\n"
)
#: The drain's load: about 1.5 segments a second of the script above (checked: ``load_segments_s``).
LOAD_TPS = 400
CLIENTS = 2
PARALLEL = 2
#: pgbackrest's name for each compression (ours: none, gzip, lz4, zstd).
PGBACKREST_COMPRESS = {"none": "none", "gzip": "gz", "lz4": "lz4", "zstd": "zst"}


@dataclass(frozen=True)
class Line:
    """One archive_command measured: ``command(archive)`` is its text; ``prepare(archive)`` sets up its
    archive (before the clock); ``skip`` says why it cannot run here, or is None."""

    key: str
    label: str
    command: Callable[[Path], str]
    prepare: Callable[[Path], None] = lambda archive: None
    skip: str | None = None


def _q(path: Path | str) -> str:
    return shlex.quote(str(path))


def _pgbackrest_lines(cluster: LocalCluster, compression: str) -> list[Line]:
    """pgBackRest's archive-push, synchronous and asynchronous, into a repository per archive folder."""
    exe = shutil.which("pgbackrest")
    why = None if exe else "pgbackrest is not installed (Debian package pgbackrest: `make prereqs`)"

    def conf(archive: Path) -> Path:
        return archive / "pgbackrest.conf"

    def prepare(archive: Path) -> None:
        conf(archive).write_text(
            "[global]\n"
            f"repo1-path={archive / 'repo'}\n"
            f"spool-path={archive / 'spool'}\n"
            f"lock-path={archive / 'lock'}\n"
            f"log-path={archive / 'log'}\n"
            "log-level-console=warn\nlog-level-file=off\n"
            f"compress-type={PGBACKREST_COMPRESS[compression]}\n"
            f"[{STANZA}]\n"
            f"pg1-path={cluster.datadir}\npg1-port={cluster.port}\n"
            f"pg1-socket-path={cluster.socket_dir}\npg1-user=postgres\n"
        )
        give_to_server_user(archive)
        done = subprocess.run(
            as_server_user([str(exe), f"--config={conf(archive)}", f"--stanza={STANZA}", "stanza-create"]),
            capture_output=True,
            text=True,
        )
        if done.returncode:
            raise RuntimeError(f"pgbackrest stanza-create failed ({done.returncode}): {done.stderr.strip()}")

    def push(extra: str) -> Callable[[Path], str]:
        return lambda archive: (
            f"{_q(exe)} --config={_q(conf(archive))} --stanza={STANZA}{extra} archive-push %p"
        )

    return [
        Line("pgbackrest_push_segments_s", "pgbackrest archive-push", push(""), prepare, why),
        Line(
            "pgbackrest_async_segments_s",
            f"pgbackrest archive-push, archive-async=y process-max={PARALLEL}",
            push(f" --archive-async --process-max={PARALLEL}"),
            prepare,
            why,
        ),
    ]


def _wal_push_lines(compression: str) -> list[Line]:
    """``pg-safe-backup wal-push`` of this checkout (its package folder first on PYTHONPATH), one process
    per segment, then with --parallel."""
    spec = importlib.util.find_spec("pg_safe_backup")
    assert spec and spec.origin
    package = Path(spec.origin).parent
    # Byte-compiled as `pip install` leaves it: the server's OS user cannot write __pycache__ in a checkout
    # and would compile the modules it imports on every push.
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(package)], check=True)
    env = f"PYTHONPATH={_q(package.parent)}"

    def push(*extra: str) -> Callable[[Path], str]:
        words = ("wal-push", "--compress", compression, *extra, "--archive")
        return lambda archive: f"{env} {command_for_server(*words, str(archive))} %p"

    return [
        Line("wal_push_segments_s", "pg-safe-backup wal-push", push()),
        Line(
            "wal_push_parallel_segments_s",
            f"pg-safe-backup wal-push --parallel {PARALLEL}",
            push("--parallel", str(PARALLEL)),
        ),
    ]


def lines(cluster: LocalCluster, compression: str) -> list[Line]:
    """Every archive_command measured, the cp baseline first.

    :param cluster: the cluster archiving (pgBackRest's stanza names it).
    :param compression: none, gzip, lz4 or zstd, for each tool that compresses.
    """
    cp_sync = Line(
        "cp_sync_segments_s",
        "cp %p DIR/%f && sync DIR/%f DIR",
        lambda archive: f"cp %p {_q(archive)}/%f && sync {_q(archive)}/%f {_q(archive)}",
    )
    return [cp_sync, *_pgbackrest_lines(cluster, compression), *_wal_push_lines(compression)]


def _set_archive_command(conn: Connection, command: str) -> None:
    """``archive_command = command`` from the next reload on; the archiver wakes on the reload's SIGHUP."""
    conn.execute(sql.SQL("ALTER SYSTEM SET archive_command = {}").format(sql.Literal(command)))
    conn.execute("SELECT pg_reload_conf()")


def _ready(conn: Connection) -> list[str]:
    """The segments waiting for the archiver, oldest first."""
    rows = conn.execute(
        "SELECT name FROM pg_ls_archive_statusdir() WHERE name LIKE '%.ready' ORDER BY name"
    ).fetchall()
    return [name.removesuffix(".ready") for (name,) in rows]


def _lsn(conn: Connection) -> int:
    return int(conn.execute("SELECT pg_current_wal_lsn() - '0/0'").fetchone()[0])


def _du(path: Path) -> int:
    return int(subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True).stdout.split()[0])


class Load:
    """pgbench running :data:`LOAD_SCRIPT` against ``cluster`` in the background (``tps`` None: flat out)."""

    def __init__(self, cluster: LocalCluster, script: Path, tps: int | None) -> None:
        rate = ["-R", str(tps)] if tps else []
        self.proc = subprocess.Popen(
            [
                str(cluster.bindir / "pgbench"),
                *("-h", str(cluster.socket_dir), "-p", str(cluster.port), "-U", "postgres"),
                *("-n", "-c", str(CLIENTS), "-j", str(CLIENTS), "-T", "900", "-f", str(script), *rate),
                "postgres",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait(timeout=60)

    def check(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(
                f"the pgbench load ended early ({self.proc.returncode}): {self.proc.stderr.read()}"
            )


def _fill(conn: Connection, cluster: LocalCluster, script: Path, segments: int) -> dict[str, Any]:
    """Run the load flat out, archiving paused, until ``segments`` segments are ready."""
    began, lsn0 = time.monotonic(), _lsn(conn)
    load = Load(cluster, script, None)
    try:
        deadline = began + 300
        while len(_ready(conn)) < segments:
            load.check()
            if time.monotonic() > deadline:
                raise RuntimeError(f"the load did not fill {segments} WAL segments in 300 s")
            time.sleep(0.05)
    finally:
        load.stop()
    seconds = time.monotonic() - began
    return {
        "fill_s": round(seconds, 2),
        "fill_segments_s": round((_lsn(conn) - lsn0) / SEGMENT_BYTES / seconds, 2),
    }


def _wait_load_started(conn: Connection, load: Load, wal_bytes: int = 2**20) -> None:
    """Until the load has written ``wal_bytes`` of WAL: under way before the clock starts."""
    lsn0, deadline = _lsn(conn), time.monotonic() + 60
    while _lsn(conn) - lsn0 < wal_bytes:
        load.check()
        if time.monotonic() > deadline:
            raise RuntimeError("the pgbench load wrote no WAL in 60 s")
        time.sleep(0.01)


def _drain(
    conn: Connection, cluster: LocalCluster, script: Path, command: str, time_box: float
) -> dict[str, Any]:
    """Under the drain's load, set ``command`` and time until every segment ready before it is archived, or
    for ``time_box`` seconds at most (the backlog still there: the rate holds, over fewer segments)."""
    load = Load(cluster, script, LOAD_TPS)
    try:
        _wait_load_started(conn, load)
        target = _ready(conn)[-1]
        count0, failed0 = conn.execute("SELECT archived_count, failed_count FROM pg_stat_archiver").fetchone()
        lsn0 = _lsn(conn)
        began = time.monotonic()
        _set_archive_command(conn, command)
        while True:
            count, last, failed, last_failed = conn.execute(
                "SELECT archived_count, last_archived_wal, failed_count, last_failed_wal"
                " FROM pg_stat_archiver"
            ).fetchone()
            seconds = time.monotonic() - began
            if failed > failed0:
                raise RuntimeError(
                    f"archive_command failed on {last_failed}: {command}\n"
                    + "\n".join(cluster.log_text().splitlines()[-10:])
                )
            # Names of one timeline sort by position; a .history or .backup name is not a segment's.
            if last and len(last) == 24 and last >= target:
                break
            if seconds > time_box:
                break
            load.check()
            time.sleep(0.01)
        wal_bytes = _lsn(conn) - lsn0
    finally:
        _set_archive_command(conn, "")
        load.stop()
    archived = count - count0
    return {
        "segments": archived,
        "seconds": round(seconds, 2),
        "segments_s": round(archived / seconds, 2),
        "load_segments_s": round(wal_bytes / SEGMENT_BYTES / seconds, 2),
        "last_segment": target,
        "time_boxed": seconds > time_box,
    }


def _discard_backlog(conn: Connection) -> None:
    """Mark the segments the last drain's load left waiting archived (``archive_command = 'true'``: this
    throwaway cluster's WAL after the measured segments), so each command starts from the same backlog."""
    _set_archive_command(conn, "true")
    try:
        deadline = time.monotonic() + 120
        while _ready(conn):
            if time.monotonic() > deadline:
                raise RuntimeError("the archiver did not take the leftover WAL segments in 120 s")
            time.sleep(0.05)
    finally:
        _set_archive_command(conn, "")


def run(
    work: Path, segments: int = 32, rounds: int = 3, compression: str = "none", time_box: float = 30
) -> dict[str, Any]:
    """Segments/s of each archive_command, same cluster, same load: the median over ``rounds`` rounds, each
    round every command in turn (so a burst of other work on the machine hits them alike); the results
    file's keys and a ``detail``.

    :param work: the work folder (cluster, archives).
    :param segments: segments each command archives against the clock, each round.
    :param rounds: rounds of the commands.
    :param compression: none, gzip, lz4 or zstd: ours and pgBackRest's alike.
    :param time_box: the longest one command is timed (seconds): a slow one's rate over fewer segments.
    """
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    root = work / "wal"
    cluster = LocalCluster(root / "data").init(
        settings={
            "archive_mode": "on",
            "archive_command": "''",
            "max_wal_size": "'4GB'",
            "shared_buffers": "'128MB'",
        }
    )
    cluster.start()
    script = root / "load.sql"
    script.write_text(LOAD_SCRIPT)
    per_line: dict[str, list[dict[str, Any]]] = {}
    skipped: dict[str, str] = {}
    try:
        with cluster.connect() as conn:
            conn.execute("CREATE TABLE wal_load (payload text)")
            measured = lines(cluster, compression)
            skipped = {line.key: line.skip for line in measured if line.skip}
            for round_ in range(rounds):
                for i, line in enumerate(line for line in measured if not line.skip):
                    archive = root / f"archive{round_}_{i}"
                    archive.mkdir()
                    give_to_server_user(archive)
                    line.prepare(archive)
                    filled = _fill(conn, cluster, script, segments)
                    command = line.command(archive)
                    drained = _drain(conn, cluster, script, command, time_box)
                    _discard_backlog(conn)
                    per_line.setdefault(line.key, []).append(
                        {
                            "archive_command": command,
                            **drained,
                            **filled,
                            "stored_mb": round(_du(archive) / 2**20, 1),
                            "load_avg_1min": round(os.getloadavg()[0], 2),
                        }
                    )
                    # Next command: a table and pg_wal of the same size (archived segments removed).
                    conn.execute("TRUNCATE wal_load")
                    conn.execute("CHECKPOINT")
                    shutil.rmtree(archive, ignore_errors=True)
    finally:
        cluster.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)
    figures = {
        key: round(statistics.median(r["segments_s"] for r in runs), 2) for key, runs in per_line.items()
    }
    return {
        **figures,
        **{key: None for key in skipped},
        "detail": {
            "segments": segments,
            "rounds": rounds,
            "time_box_s": time_box,
            "compression": compression,
            "load": f"pgbench -c {CLIENTS} -j {CLIENTS}: {LOAD_SCRIPT.strip()}",
            "load_tps": LOAD_TPS,
            "parallel": PARALLEL,
            "pgbackrest": tool_version(["pgbackrest", "version"]),
            # The slowest load any command drained under (the issue asks for over one segment a second).
            "load_segments_s_min": min(
                (r["load_segments_s"] for runs in per_line.values() for r in runs), default=None
            ),
            "all_segments_s": {key: [r["segments_s"] for r in runs] for key, runs in per_line.items()},
            "lines": per_line,
            "skipped": skipped,
            # Other work on the machine (it is shared) shows up here.
            "load_avg_at_start": load_at_start,
            "load_avg_at_end": [round(x, 2) for x in os.getloadavg()],
        },
    }


if __name__ == "__main__":
    work = argv_workdir()
    segments = int(sys.argv[2]) if len(sys.argv) > 2 else 32
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    compression = sys.argv[4] if len(sys.argv) > 4 else "none"
    print(json.dumps(run(work, segments, rounds, compression), indent=1))
