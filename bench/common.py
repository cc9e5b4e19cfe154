"""What the benchmark phases share: the work folder, the small cluster, the server log, statistics."""

from __future__ import annotations

import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psutil

from pg_safe_backup.local_cluster import LocalCluster, give_to_server_user

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_WORKDIR = Path(os.environ.get("BENCH_WORKDIR", "/var/tmp/pg-safe-backup-bench"))
PASSWORD = "bench-Pa55word"
CONN_ID = "bench_pg"  # AIRFLOW_CONN_BENCH_PG
#: Server log lines carry the backend pid, so each statement is tied to the session that ran it.
LOG_PREFIX = "'%m [%p] '"


def say(text: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", flush=True)


# -- statistics -----------------------------------------------------------------------------------


def argv_workdir() -> Path:
    """The work folder of a bench module run on its own (its first argument): made, open to the server's
    OS user."""
    work = Path(sys.argv[1])
    work.mkdir(parents=True, exist_ok=True)
    os.chmod(work, 0o755)
    return work


def tool_version(cmd: list[str]) -> str | None:
    """What ``cmd`` (``["pgbackrest", "version"]``) prints, or None when it cannot run."""
    try:
        return subprocess.run(cmd, capture_output=True, text=True).stdout.strip() or None
    except OSError:
        return None


def quantile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return None
    s = sorted(values)
    pos = (len(s) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summary(values: list[float], digits: int = 1) -> dict[str, Any]:
    """n, median, p95, min, max of a sample (rounded)."""

    def r(v: float | None) -> float | None:
        return None if v is None else round(v, digits)

    return {
        "n": len(values),
        "median": r(quantile(values, 0.5)),
        "p95": r(quantile(values, 0.95)),
        "min": r(min(values) if values else None),
        "max": r(max(values) if values else None),
    }


# -- the server log -------------------------------------------------------------------------------

_DURATION = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+) UTC \[(\d+)\] LOG:  duration: ([0-9.]+) ms  "
    r"(?:statement|(?:parse|bind|execute) [^:]*): (.*)$"
)
_CHECKPOINT = re.compile(r"\[(\d+)\] LOG:  checkpoint complete: .*total=([0-9.]+) s")

STOP_FUNCS = ("pg_backup_stop(", "pg_stop_backup(")
START_FUNCS = ("pg_backup_start(", "pg_start_backup(")


@dataclass
class LogSlice:
    """Statement durations (log_min_duration_statement = 0) and checkpoints in a part of the log."""

    text: str
    #: pid -> [(statement, ms, logged at (epoch s))], parse/bind/execute of one statement listed separately.
    statements: dict[int, list[tuple[str, float, float]]] = field(default_factory=lambda: defaultdict(list))
    checkpoints_ms: list[float] = field(default_factory=list)

    @classmethod
    def parse(cls, text: str) -> LogSlice:
        sl = cls(text)
        for line in text.splitlines():
            if m := _DURATION.search(line):
                at = datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S.%f").replace(tzinfo=timezone.utc).timestamp()
                sl.statements[int(m[2])].append((m[4], float(m[3]), at))
            elif m := _CHECKPOINT.search(line):
                sl.checkpoints_ms.append(float(m[2]) * 1000)
        return sl

    def server_ms(self, pid: int, funcs: tuple[str, ...]) -> float | None:
        """Server-side time of the statement(s) of ``pid`` calling one of ``funcs`` (parse+bind+execute)."""
        found = [ms for stmt, ms, _ in self.statements.get(pid, []) if any(f in stmt for f in funcs)]
        return sum(found) if found else None

    def logged_at(self, pid: int, text: str) -> float | None:
        """When (epoch seconds, ms precision) ``pid``'s last statement (part) containing ``text`` ended."""
        found = [at for stmt, _, at in self.statements.get(pid, []) if text in stmt]
        return found[-1] if found else None

    def handoff_steps(
        self, finisher_pid: int, holder_pid: int, called: float, returned: float
    ) -> dict[str, float]:
        """The hand-off on the server's clock (ms): finish called -> 'done' committed -> (NOTIFY, holder
        wakes, re-reads) -> pg_backup_stop begins ... ends -> (label stored, finish woken) -> finish returns.
        ``called``/``returned`` are time.time() of this machine, the server's clock too."""
        done = self.logged_at(finisher_pid, "SET state = 'done'")
        stop_end = self.logged_at(holder_pid, "pg_backup_stop(")
        stop_ms = self.server_ms(holder_pid, STOP_FUNCS)
        if done is None or stop_end is None or stop_ms is None:
            return {}
        stop_begin = stop_end - stop_ms / 1000
        return {
            "finish_called_to_done_committed": (done - called) * 1000,
            "done_committed_to_stop_begins": (stop_begin - done) * 1000,
            "stop_ends_to_finish_returned": (returned - stop_end) * 1000,
        }

    def statement_count(self, pids: set[int] | None = None) -> int:
        return sum(len(v) for pid, v in self.statements.items() if pids is None or pid in pids)


class ServerLog:
    """The cluster's log file (pg_ctl -l), read by byte offsets."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def offset(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0

    def since(
        self, offset: int, pid: int | None = None, funcs: tuple[str, ...] = (), timeout: float = 5
    ) -> LogSlice:
        """The log from ``offset``; waits (briefly) until ``pid``'s ``funcs`` statement is in it."""
        deadline = time.monotonic() + timeout
        while True:
            with self.path.open("rb") as f:
                f.seek(offset)
                sl = LogSlice.parse(f.read().decode(errors="replace"))
            if pid is None or sl.server_ms(pid, funcs) is not None or time.monotonic() > deadline:
                return sl
            time.sleep(0.05)


# -- clusters -------------------------------------------------------------------------------------


def prepare_workdir(work: Path) -> None:
    """A fresh work folder the postgres OS user can enter (stopping servers a killed run left)."""
    if work.exists():
        for pid_file in work.rglob("postmaster.pid"):
            LocalCluster(pid_file.parent).stop("immediate")
        shutil.rmtree(work)
    work.mkdir(parents=True)
    os.chmod(work, 0o755)


def make_archive(path: Path) -> Path:
    path.mkdir(parents=True)
    give_to_server_user(path)
    return path


def archive_settings(archive: Path) -> dict[str, Any]:
    return {"archive_mode": "on", "archive_command": f"'cp %p {archive}/%f'", "archive_timeout": 0}


def make_small_cluster(work: Path, max_connections: int) -> tuple[LocalCluster, Path]:
    """A small cluster with WAL archiving and statement/checkpoint logging, reachable as CONN_ID."""
    archive = make_archive(work / "small_wal_archive")
    cluster = LocalCluster(work / "small" / "data").init(
        password=PASSWORD,
        settings={
            **archive_settings(archive),
            "max_connections": max_connections,
            "log_min_duration_statement": 0,
            "log_checkpoints": "on",
            "log_line_prefix": LOG_PREFIX,
            "log_timezone": "'UTC'",
            # The default 1GB lets the ~2 WAL switches of every backup pile up segments to recycle.
            "max_wal_size": "'256MB'",
            "min_wal_size": "'32MB'",
        },
    )
    cluster.start()
    os.environ[f"AIRFLOW_CONN_{CONN_ID.upper()}"] = cluster.airflow_conn_uri(password=PASSWORD)
    return cluster, archive


def prune_archive(archive: Path, keep: int = 4) -> int:
    """Delete all but the newest ``keep`` archived WAL files (each backup archives a 16 MB segment)."""
    files = sorted(p for p in archive.iterdir() if p.is_file())
    for p in files[:-keep] if keep else files:
        p.unlink(missing_ok=True)
    return max(0, len(files) - keep)


def archiver_backlog(cluster: LocalCluster) -> int:
    status = cluster.datadir / "pg_wal" / "archive_status"
    return sum(1 for p in status.iterdir() if p.name.endswith(".ready")) if status.exists() else 0


def wait_archiver_idle(cluster: LocalCluster, archive: Path, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while archiver_backlog(cluster):
        prune_archive(archive)
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"the archiver still has {archiver_backlog(cluster)} WAL files to copy after {timeout:g}s"
            )
        time.sleep(0.2)
    prune_archive(archive)


# -- the machine ----------------------------------------------------------------------------------


def machine_info(work: Path) -> dict[str, Any]:
    cpu_model = ""
    try:
        cpu_model = next(
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    from pg_safe_backup.local_cluster import find_bindir

    pg = subprocess.run(
        [str(find_bindir() / "postgres"), "--version"], capture_output=True, text=True
    ).stdout.strip()
    import psycopg

    import airflow

    return {
        "cores": os.cpu_count(),
        "cpu_model": cpu_model,
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "disk_free_gb": round(shutil.disk_usage(work).free / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "postgres": pg,
        "airflow": airflow.__version__,
        "psycopg": psycopg.__version__,
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def python() -> str:
    return sys.executable
