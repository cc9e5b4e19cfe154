"""Figure 3: N backups held at once by ONE trigger runner process (``bench.holders``).

For each N: the tables ``bench_s_0001..`` exist beforehand (created once, as after a first run);
a fresh ``python -m bench.holders`` process imports everything and warms up (its idle RSS is
measured), then runs N BackupHolderTriggers in one event loop. Once every backup is in backup mode
(and the archiver has caught up with their WAL switches) we measure the process's RSS, then its
CPU time over an idle window (and the statements its sessions ran in that window, from the
server log), then finish a sample of the backups one at a time from this process while the rest
stay held (hand-off latency as in figure 1). The rest are marked failed, the process must end
with one event per trigger, and no holder session may be left.
"""

from __future__ import annotations

import asyncio
import json
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import psycopg

from bench.common import CONN_ID, STOP_FUNCS, ServerLog, prune_archive, say, summary, wait_archiver_idle
from bench.holders import table_name
from bench.instrument import TimedHook
from pg_safe_backup.hooks.backup import PostgresBackupHook
from pg_safe_backup.local_cluster import LocalCluster
from pg_safe_backup.session import COMPLETE, finish_backup

PREFIX = "bench_s_"
HOLDER_APPS = "application_name LIKE 'pg_safe_backup%'"


class SessionsError(RuntimeError):
    pass


def create_tables(count: int) -> None:
    """The state tables 1..count, created one after the other (the steady state of a deployment)."""

    async def go() -> None:
        async with PostgresBackupHook(CONN_ID, table=table_name(PREFIX, 1)).connect("bench setup") as conn:
            for i in range(1, count + 1):
                await PostgresBackupHook(CONN_ID, table=table_name(PREFIX, i)).ensure_table(conn)

    asyncio.run(go())


def started_count(cluster: LocalCluster, count: int) -> int:
    union = " UNION ALL ".join(
        f"SELECT start_lsn FROM {table_name(PREFIX, i)} WHERE state = 'running'" for i in range(1, count + 1)
    )
    return cluster.sql(f"SELECT count(start_lsn) FROM ({union}) s")[0][0]


def server_cpu_seconds(cluster: LocalCluster) -> float:
    """CPU time of the postmaster and all its children (backends, checkpointer, archiver...)."""
    pid = int((cluster.datadir / "postmaster.pid").read_text().split()[0])
    total = 0.0
    procs = [psutil.Process(pid)]
    procs += procs[0].children(recursive=True)
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


class Child:
    """The holders process and its JSON-line messages."""

    def __init__(self, count: int, owner_prefix: str, poll: float, log_path: Path, reference: bool) -> None:
        cmd = [
            sys.executable,
            "-m",
            "bench.holders",
            "--count",
            str(count),
            "--prefix",
            PREFIX,
            "--owner-prefix",
            owner_prefix,
            "--conn-id",
            CONN_ID,
            "--poll",
            str(poll),
        ]
        if reference:
            cmd.append("--psycopg-notifies")
        self.stderr = log_path.open("ab")
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            cwd=Path(__file__).resolve().parents[1],
            start_new_session=True,
        )
        self.ps = psutil.Process(self.proc.pid)
        self.messages: queue.Queue[dict[str, Any]] = queue.Queue()
        self.events: dict[int, dict[str, Any]] = {}
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if msg.get("kind") == "event":
                self.events[msg["i"]] = msg
            self.messages.put(msg)
        self.messages.put({"kind": "eof"})

    def wait_for(self, kind: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                msg = self.messages.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise SessionsError(f"the holders process did not say {kind!r} within {timeout:g}s") from None
            if msg["kind"] == kind:
                return msg
            if msg["kind"] == "eof":
                raise SessionsError(f"the holders process ended (rc {self.proc.wait()}) before {kind!r}")
            if msg["kind"] == "event" and msg["status"] != COMPLETE and kind != "finished":
                raise SessionsError(f"backup {msg['i']} ended early: {msg['message']}")

    def send(self, text: str) -> None:
        self.proc.stdin.write(text.encode() + b"\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]

    def rss_mb(self) -> float:
        return self.ps.memory_info().rss / 2**20

    def uss_mb(self) -> float:
        return self.ps.memory_full_info().uss / 2**20

    def cpu_s(self) -> float:
        t = self.ps.cpu_times()
        return t.user + t.system

    def ctx_switches(self) -> int:
        c = self.ps.num_ctx_switches()
        return c.voluntary + c.involuntary

    def stop(self) -> None:
        """End the process (by its pid) if it is still running."""
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)
        self.stderr.close()


async def finish_one(
    i: int, owner: str, poll: float
) -> tuple[float, dict[str, Any], float, float, int | None]:
    """Finish backup i as the finish task does; (ms, event, called, returned (time.time()), finisher pid)."""
    hook = TimedHook(CONN_ID, table=table_name(PREFIX, i))
    async with PostgresBackupHook(CONN_ID, table=table_name(PREFIX, i)).connect("bench read") as conn:
        start_lsn = (
            await PostgresBackupHook(CONN_ID, table=table_name(PREFIX, i)).read(conn)
        ).start_lsn  # the gate's XCom
    t0, wall0 = time.perf_counter(), time.time()
    ev = await asyncio.wait_for(finish_backup(hook, owner, start_lsn, poll_interval=poll), 120)
    t1, wall1 = time.perf_counter(), time.time()
    connect = hook.first("connect")
    return (t1 - t0) * 1000, ev, wall0, wall1, connect[2] if connect else None


async def fail_rest(indexes: list[int], owner_prefix: str) -> int:
    failed = 0
    async with PostgresBackupHook(CONN_ID, table=table_name(PREFIX, 1)).connect("bench clean-up") as conn:
        for i in indexes:
            hook = PostgresBackupHook(CONN_ID, table=table_name(PREFIX, i))
            failed += await hook.mark_failed(
                conn, f"{owner_prefix}/{i}", "benchmark clean-up"
            )  # attempt = owner
    return failed


def run_one(
    cluster: LocalCluster,
    archive: Path,
    work: Path,
    count: int,
    sample: int,
    poll: float,
    idle_s: float,
    reference: bool = False,
    profile: bool = False,
) -> dict[str, Any]:
    log = ServerLog(cluster.logfile)
    owner_prefix = f"bench_sessions/n{count}{'_psycopg_notifies' if reference else ''}/{int(time.time())}"
    child = Child(
        count, owner_prefix, poll, work / f"holders_{count}{'_ref' if reference else ''}.log", reference
    )
    result: dict[str, Any] = {"n": count, "poll_interval_s": poll}
    try:
        child.wait_for("ready", 120)
        time.sleep(2)
        cpu0, t0 = child.cpu_s(), time.monotonic()
        time.sleep(3)
        result["idle_process_cpu_percent_0_held"] = round(
            100 * (child.cpu_s() - cpu0) / (time.monotonic() - t0), 2
        )
        rss_idle = child.rss_mb()
        uss_idle = child.uss_mb()

        t_go = time.monotonic()
        child.send("go")
        child.wait_for("spawned", 60)
        while (n := started_count(cluster, count)) < count:
            if time.monotonic() - t_go > 600:
                raise SessionsError(f"only {n}/{count} backups started within 600 s")
            if child.events:
                bad = next(iter(child.events.values()))
                raise SessionsError(f"backup {bad['i']} ended early: {bad['message']}")
            time.sleep(0.5)
        result["all_started_s"] = round(time.monotonic() - t_go, 1)
        say(f"  N={count}: all in backup mode after {result['all_started_s']} s; waiting for the archiver")
        wait_archiver_idle(cluster, archive)
        time.sleep(2)
        rss_held, uss_held = child.rss_mb(), child.uss_mb()
        result.update(
            {
                "rss_idle_mb": round(rss_idle, 1),
                "rss_held_mb": round(rss_held, 1),
                "rss_mb_per_session": round((rss_held - rss_idle) / count, 3),
                "uss_mb_per_session": round((uss_held - uss_idle) / count, 3),
                "holder_sessions": cluster.sql(f"SELECT count(*) FROM pg_stat_activity WHERE {HOLDER_APPS}")[
                    0
                ][0],
            }
        )

        # Idle holding: CPU time of the process, its wake-ups, and what its sessions ran.
        pids = {r[0] for r in cluster.sql(f"SELECT pid FROM pg_stat_activity WHERE {HOLDER_APPS}")}
        offset = log.offset()
        cpu0, ctx0, srv0, t0 = (
            child.cpu_s(),
            child.ctx_switches(),
            server_cpu_seconds(cluster),
            time.monotonic(),
        )
        time.sleep(idle_s)
        wall = time.monotonic() - t0
        result.update(
            {
                "idle_window_s": round(wall, 1),
                "idle_cpu_percent": round(100 * (child.cpu_s() - cpu0) / wall, 2),
                "idle_context_switches_per_s": round((child.ctx_switches() - ctx0) / wall, 1),
                "idle_server_cpu_percent": round(100 * (server_cpu_seconds(cluster) - srv0) / wall, 2),
                "idle_statements_in_window": log.since(offset).statement_count(pids),
            }
        )
        say(f"  N={count}: RSS {rss_idle:.0f} -> {rss_held:.0f} MB, idle CPU {result['idle_cpu_percent']}%")
        if profile:
            from bench.profile import record

            suffix = "_psycopg_notifies" if reference else ""
            result["idle_profile"] = record(child.ps.pid, 10, work / f"py-spy_holders_{count}{suffix}.txt")

        # Hand-off latency while the others stay held.
        step = max(1, count // sample)
        picked = list(range(1, count + 1, step))[:sample]
        overheads, totals, stops = [], [], []
        steps: dict[str, list[float]] = {}
        for i in picked:
            offset = log.offset()
            total, ev, wall0, wall1, fin_pid = asyncio.run(finish_one(i, f"{owner_prefix}/{i}", poll))
            if ev["status"] != COMPLETE:
                raise SessionsError(f"backup {i} did not complete: {ev['message']}")
            pid = cluster.sql(f"SELECT pid FROM {table_name(PREFIX, i)}")[0][0]
            sl = log.since(offset, pid, STOP_FUNCS)
            stop = sl.server_ms(pid, STOP_FUNCS)
            for k, v in (sl.handoff_steps(fin_pid, pid, wall0, wall1) if fin_pid else {}).items():
                steps.setdefault(k, []).append(v)
            totals.append(total)
            if stop is not None:
                stops.append(stop)
                overheads.append(total - stop)
            prune_archive(archive)
        result.update(
            {
                "handoff_sample": len(picked),
                "handoff_ms_median": summary(overheads)["median"],
                "handoff_ms_p95": summary(overheads)["p95"],
                "handoff_total_ms_median": summary(totals)["median"],
                "stop_ms_median": summary(stops)["median"],
                "handoff_steps_server_clock_ms_median": {k: summary(v)["median"] for k, v in steps.items()},
            }
        )
        say(
            f"  N={count}: hand-off overhead median {result['handoff_ms_median']} ms over {len(picked)} "
            "backups"
        )
    finally:
        cleanup(cluster, archive, child, count, owner_prefix, result)
    return result


def cleanup(
    cluster: LocalCluster, archive: Path, child: Child, count: int, owner_prefix: str, result: dict[str, Any]
) -> None:
    """Fail every backup still live, let the holders end them, check that no session is left."""
    try:
        live = [i for i in range(1, count + 1) if child.events.get(i) is None]
        if live and child.proc.poll() is None:
            try:
                asyncio.run(fail_rest(live, owner_prefix))
                child.wait_for("finished", 300)
            except (SessionsError, psycopg.Error) as err:
                say(
                    f"  clean-up: {err}; killing the holders process (its sessions close, ending backup mode)"
                )
        elif child.proc.poll() is None:
            child.wait_for("finished", 60)
    except SessionsError as err:
        say(f"  clean-up: {err}")
    finally:
        child.stop()
    deadline = time.monotonic() + 30
    while (
        left := cluster.sql(f"SELECT count(*) FROM pg_stat_activity WHERE {HOLDER_APPS}")[0][0]
    ) and time.monotonic() < deadline:
        time.sleep(0.2)
    states = dict(
        cluster.sql(
            "SELECT state, count(*) FROM ("
            + " UNION ALL ".join(
                f"SELECT state::text FROM {table_name(PREFIX, i)}" for i in range(1, count + 1)
            )
            + ") s GROUP BY state"
        )
    )
    result["after_cleanup"] = {
        "holder_sessions_left": left,
        "states": states,
        "events": len(child.events),
        "exit_code": child.proc.returncode,
    }
    wait_archiver_idle(cluster, archive)


def run(
    cluster: LocalCluster,
    archive: Path,
    work: Path,
    counts: list[int],
    sample: int,
    poll: float,
    idle_s: float,
    reference: bool,
    profile: bool = False,
) -> dict[str, Any]:
    say(f"sessions held by one trigger runner process: N = {counts}, poll_interval={poll:g}s")
    say(f"  creating {max(counts)} state tables")
    create_tables(max(counts))
    per_n = {}
    for n in counts:
        per_n[str(n)] = run_one(
            cluster, archive, work, n, sample, poll, idle_s, profile=profile and n == max(counts)
        )
        if per_n[str(n)]["after_cleanup"]["holder_sessions_left"]:
            raise SessionsError(f"holder sessions left after N={n}: {per_n[str(n)]['after_cleanup']}")
    out: dict[str, Any] = {"per_n": per_n}
    if reference:
        n = max(counts)
        say(f"  reference: N={n} again, waiting with psycopg's notifies() (wakes every 0.1 s)")
        out["reference_psycopg_notifies"] = run_one(
            cluster, archive, work, n, sample, poll, idle_s, reference=True, profile=profile
        )
    return out
