"""Figure 11: a fleet of clusters in one mapped group, on the production stack.

A real Airflow (demo/stack.py: api-server, scheduler, dag-processor, two triggerers, CeleryExecutor with a
Redis broker and one worker, metadata in PostgreSQL; Airflow's defaults otherwise, the holders' check
period included) runs ``bench/dags/pg_fleet_bench.py``:

1. ``pg_fleet_bench``: N real small clusters (each with a WAL archive and a table naming it) backed up
   by one mapped ``PostgresOnlineBackup`` group whose holds share a backup-mode pool of K slots (deferred
   tasks counted), each copied by the copy operator. A thread samples every cluster's backup table all
   along (how many are in backup mode at once). Reported: backups per hour, task instances per second,
   the most clusters in backup mode at once, the triggerers' CPU and execution-API calls. Every backup is
   then verified (restored, recovered, its table checked) by the CLI, outside the timed window.
2. ``pg_fleet_holders``: H hold tasks (no copies) on one cluster, held by ONE triggerer process (the
   second is stopped first), their Airflow checks on. Once all H are in backup mode: that triggerer's CPU
   (its supervisor and trigger runner) and its execution-API calls over an idle window. Then the run is
   failed through the REST API and the time until every backup has ended is measured (the holders'
   safety net: they see their run end within one check period).

The execution-API calls are counted in the triggerers' supervisor processes by bench/apicount (a
sitecustomize that counts the requests sent to the in-process execution API; the product code is
untouched).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import psycopg

from bench.common import PASSWORD, ROOT, archive_settings, make_archive, python, say
from demo.stack import AirflowStack
from pg_safe_backup.local_cluster import LocalCluster, give_to_server_user

FLEET_DAG, HOLDERS_DAG = "pg_fleet_bench", "pg_fleet_holders"
POOL = "backup_mode"
HOLDERS_CONN = "fleet_holders"
#: The holders' check period the stack runs with: Airflow's default ([pg_safe_backup] holder_check_period).
CHECK_PERIOD_S = 30
IN_BACKUP_MODE = "SELECT count(*) FROM backup WHERE state IN ('running', 'done')"


class Sampler(threading.Thread):
    """How many of ``clusters`` are in backup mode (their backup row running or done), sampled every
    ``every`` seconds over one open connection each, until stopped."""

    def __init__(self, clusters: list[LocalCluster], every: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.clusters, self.every, self.stopped = clusters, every, threading.Event()
        self.samples: list[int] = []

    def run(self) -> None:
        conns = [psycopg.connect(**c.conninfo(), autocommit=True) for c in self.clusters]
        try:
            while not self.stopped.wait(self.every):
                n = 0
                for conn in conns:
                    try:
                        n += conn.execute(IN_BACKUP_MODE).fetchone()[0] > 0
                    except psycopg.errors.UndefinedTable:
                        pass
                self.samples.append(n)
        finally:
            for conn in conns:
                conn.close()

    def stop(self) -> list[int]:
        self.stopped.set()
        self.join(60)
        return self.samples


def triggerer_cpu_s(stack: AirflowStack, names: list[str]) -> float:
    """CPU seconds (user + system) so far of the named triggerers' processes and their live children."""
    total = 0.0
    for name in names:
        try:
            proc = psutil.Process(stack.pids()[name])
            for p in [proc, *proc.children(recursive=True)]:
                t = p.cpu_times()
                total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def api_calls(folder: Path) -> dict[str, int]:
    """The triggerers' execution-API calls so far, by route (bench/apicount's files)."""
    total: dict[str, int] = {}
    for path in folder.glob("*.json"):
        for route, n in json.loads(path.read_text())["calls"].items():
            total[route] = total.get(route, 0) + n
    return total


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


def wait_run_over(stack: AirflowStack, dag_id: str, run_id: str, timeout: float) -> str:
    """Wait (one metadata query a second) until the run ended; its state."""
    deadline = time.monotonic() + timeout
    while True:
        rows = stack.metadata_sql(
            "SELECT state FROM dag_run WHERE dag_id = %s AND run_id = %s", [dag_id, run_id]
        )
        if rows and rows[0][0] in ("success", "failed"):
            return rows[0][0]
        if time.monotonic() > deadline:
            raise TimeoutError(f"{dag_id} {run_id} not over after {timeout:.0f} s: {rows}")
        time.sleep(1)


def ti_counts(stack: AirflowStack, dag_id: str, run_id: str) -> dict[str, int]:
    rows = stack.metadata_sql(
        "SELECT coalesce(state, 'none'), count(*) FROM task_instance WHERE dag_id = %s AND run_id = %s"
        " GROUP BY 1",
        [dag_id, run_id],
    )
    return dict(rows)


def run_window(stack: AirflowStack, dag_id: str, run_id: str) -> tuple[float, float]:
    """The run's start and end (Airflow's clock), as epoch seconds."""
    rows = stack.metadata_sql(
        "SELECT extract(epoch FROM start_date), extract(epoch FROM end_date) FROM dag_run"
        " WHERE dag_id = %s AND run_id = %s",
        [dag_id, run_id],
    )
    return float(rows[0][0]), float(rows[0][1])


def make_fleet(work: Path, n: int) -> list[tuple[LocalCluster, Path]]:
    """N small running clusters, each with its WAL archive and a table ``who`` naming it."""
    fleet = []
    for i in range(n):
        archive = make_archive(work / f"fleet_{i:03d}" / "wal_archive")
        cluster = LocalCluster(work / f"fleet_{i:03d}" / "data").init(
            password=PASSWORD,
            settings={
                **archive_settings(archive),
                "max_connections": 20,
                "shared_buffers": "'16MB'",
                "max_wal_size": "'64MB'",
                "min_wal_size": "'32MB'",
            },
        )
        cluster.start()
        cluster.sql(
            f"CREATE TABLE who AS SELECT 'fleet_{i:03d}'::text AS cluster FROM generate_series(1, 1000)"
        )
        fleet.append((cluster, archive))
    return fleet


def verify(backup_dir: Path, archive: Path, name: str, work: Path) -> dict[str, Any]:
    """The CLI's verify of one backup: restored, recovered, its ``who`` table checked."""
    invariant = f"SELECT count(*) = 1000 AND bool_and(cluster = '{name}'), count(*)::text FROM who"
    proc = subprocess.run(
        [python(), "-m", "pg_safe_backup", "verify", str(backup_dir), str(archive)]
        + ["--invariant-sql", invariant, "--work-dir", str(work)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT / "provider")},
    )
    return {"ok": proc.returncode == 0, "out": (proc.stdout + proc.stderr)[-600:]}


def fleet_run(
    stack: AirflowStack, fleet: list[tuple[LocalCluster, Path]], slots: int, work: Path
) -> dict[str, Any]:
    names = [n for n in stack.pids() if n.startswith("triggerer")]
    calls_dir = Path(stack.extra_env["BENCH_API_CALLS_DIR"])
    sampler = Sampler([c for c, _ in fleet])
    sampler.start()
    cpu0, calls0 = triggerer_cpu_s(stack, names), api_calls(calls_dir)
    run_id = "fleet"
    t0 = time.monotonic()
    stack.trigger(FLEET_DAG, run_id=run_id)
    try:
        state = wait_run_over(stack, FLEET_DAG, run_id, timeout=3600)
    finally:
        samples = sampler.stop()
    wall = time.monotonic() - t0
    cpu, calls = triggerer_cpu_s(stack, names) - cpu0, delta(api_calls(calls_dir), calls0)
    start, end = run_window(stack, FLEET_DAG, run_id)
    tis = ti_counts(stack, FLEET_DAG, run_id)
    if state != "success":
        raise RuntimeError(f"{FLEET_DAG} ended {state}: {tis}\n{stack.dump_logs()}")
    n = len(fleet)
    say(f"  {n} backups in {end - start:.0f} s; at most {max(samples)} in backup mode (pool {slots})")
    (work / "verify").mkdir(exist_ok=True)
    give_to_server_user(work / "verify")
    checks = {}
    for i, (_, archive) in enumerate(fleet):
        checks[i] = verify(
            work / "fleet_backups" / run_id / str(i), archive, f"fleet_{i:03d}", work / "verify"
        )
    bad = {i: c["out"] for i, c in checks.items() if not c["ok"]}
    if bad:
        raise RuntimeError(f"{len(bad)} of {n} fleet backups failed their verify: {bad}")
    seconds = end - start
    return {
        "fleet_clusters": n,
        "fleet_copy_concurrency": slots,
        "fleet_max_in_backup_mode": max(samples),
        "fleet_backups_per_hour": round(n / seconds * 3600),
        "detail": {
            "run_s": round(seconds, 1),
            "wall_from_trigger_s": round(wall, 1),
            "task_instances": sum(tis.values()),
            "task_instances_per_s": round(sum(tis.values()) / seconds, 2),
            "backups_per_hour_per_copy_slot": round(n / seconds * 3600 / slots),
            "samples": len(samples),
            "in_backup_mode_histogram": {str(k): samples.count(k) for k in sorted(set(samples))},
            "triggerer_cpu_s": round(cpu, 2),
            "api_calls": calls,
            "api_calls_per_s": round(sum(calls.values()) / seconds, 2),
            "verified": f"{n} of {n} restored and checked",
        },
    }


async def _make_tables(count: int) -> None:
    from pg_safe_backup.hooks.backup import PostgresBackupHook

    first = PostgresBackupHook(HOLDERS_CONN, table="holder_0000")
    async with first.connect("bench setup") as conn:
        for i in range(count):
            await PostgresBackupHook(HOLDERS_CONN, table=f"holder_{i:04d}").ensure_table(conn)


def held(cluster: LocalCluster, count: int) -> int:
    """How many of the holders' tables say their backup is running with a start LSN."""
    union = " UNION ALL ".join(
        f"SELECT count(*) FROM holder_{i:04d} WHERE state = 'running' AND start_lsn IS NOT NULL"
        for i in range(count)
    )
    return int(cluster.sql(f"SELECT sum(count) FROM ({union}) t")[0][0] or 0)


def holder_sessions(cluster: LocalCluster) -> int:
    """The holders' sessions still open: a backup is in backup mode exactly as long as its session is."""
    return int(
        cluster.sql("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pg_safe_backup holder'")[
            0
        ][0]
    )


def rows_failed(cluster: LocalCluster, count: int) -> int:
    union = " UNION ALL ".join(
        f"SELECT count(*) FROM holder_{i:04d} WHERE state = 'failed'" for i in range(count)
    )
    return int(cluster.sql(f"SELECT sum(count) FROM ({union}) t")[0][0] or 0)


def holders_run(stack: AirflowStack, cluster: LocalCluster, count: int, idle: float) -> dict[str, Any]:
    calls_dir = Path(stack.extra_env["BENCH_API_CALLS_DIR"])
    stack.kill_component("triggerer-2")  # every holder in one triggerer process
    run_id = "holders"
    t0 = time.monotonic()
    stack.trigger(HOLDERS_DAG, run_id=run_id)
    deadline = t0 + max(1800, count * 3)
    while (n := held(cluster, count)) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"only {n} of {count} holders in backup mode: {ti_counts(stack, HOLDERS_DAG, run_id)}"
            )
        time.sleep(5)
    all_held_s = time.monotonic() - t0
    say(f"  {count} backups held by one triggerer process after {all_held_s:.0f} s; idle window {idle:.0f} s")
    cpu0, calls0, w0 = triggerer_cpu_s(stack, ["triggerer"]), api_calls(calls_dir), time.monotonic()
    time.sleep(idle)  # the measured window itself, not a wait for a condition
    cpu, calls = triggerer_cpu_s(stack, ["triggerer"]) - cpu0, delta(api_calls(calls_dir), calls0)
    window = time.monotonic() - w0
    still = held(cluster, count)
    # The run marked failed by hand: Airflow cancels the deferred holds' triggers, and any holder that
    # runs on sees its run end at its next look; either way its session, and so its backup mode, ends.
    ended_at = time.monotonic()
    stack._api("PATCH", f"/api/v2/dags/{HOLDERS_DAG}/dagRuns/{run_id}", {"state": "failed"})
    while (left := holder_sessions(cluster)) > 0:
        if time.monotonic() - ended_at > 10 * CHECK_PERIOD_S:
            raise TimeoutError(
                f"{left} of {count} still in backup mode {10 * CHECK_PERIOD_S} s after their run failed"
            )
        time.sleep(1)
    all_ended_s = time.monotonic() - ended_at
    return {
        "triggerer_cpu_ms_per_held_backup_s": round(cpu * 1000 / (count * window), 4),
        "fleet_api_calls_per_s": round(sum(calls.values()) / window, 3),
        "detail": {
            "holders_in_one_triggerer_process": count,
            "held_throughout_window": still,
            "all_in_backup_mode_after_s": round(all_held_s, 1),
            "idle_window_s": round(window, 1),
            "triggerer_cpu_s_in_window": round(cpu, 2),
            "triggerer_cpu_percent_of_a_core": round(cpu / window * 100, 1),
            "api_calls_in_window": calls,
            "holder_check_period_s": CHECK_PERIOD_S,
            "all_ended_after_run_failed_s": round(all_ended_s, 1),
            "rows_marked_failed": rows_failed(cluster, count),
        },
    }


def run(work: Path, clusters: int, slots: int, holders: int, idle: float) -> dict[str, Any]:
    say(
        f"a fleet: {clusters} clusters in a mapped group, backup-mode pool of {slots}; then {holders} holders"
    )
    fleet: list[tuple[LocalCluster, Path]] = []
    holder_cluster = stack = None
    calls_dir = work / "api_calls"
    try:
        fleet = make_fleet(work, clusters)
        holder_cluster = LocalCluster(work / "holders" / "data").init(
            password=PASSWORD,
            # A holder cancelled by its triggerer records the failure in a session of its own: room for a
            # thousand of those at once beside the thousand holding.
            settings={
                "max_connections": 2 * holders + 60,
                "shared_buffers": "'64MB'",
                "wal_level": "replica",
            },
        )
        holder_cluster.start()
        os.environ[f"AIRFLOW_CONN_{HOLDERS_CONN.upper()}"] = holder_cluster.airflow_conn_uri(
            password=PASSWORD
        )
        asyncio.run(_make_tables(holders))
        calls_dir.mkdir()
        conns = {
            f"AIRFLOW_CONN_FLEET_{i:03d}": c.airflow_conn_uri(password=PASSWORD)
            for i, (c, _) in enumerate(fleet)
        }
        stack = AirflowStack(
            work / "airflow",
            ROOT / "bench" / "dags",
            extra_env={
                **conns,
                f"AIRFLOW_CONN_{HOLDERS_CONN.upper()}": holder_cluster.airflow_conn_uri(password=PASSWORD),
                "FLEET_CLUSTERS": json.dumps(
                    [
                        {"conn_id": f"fleet_{i:03d}", "pgdata": str(c.datadir)}
                        for i, (c, _) in enumerate(fleet)
                    ]
                ),
                "FLEET_POOL": POOL,
                "FLEET_BACKUP_ROOT": str(work / "fleet_backups"),
                "FLEET_HOLDERS": str(holders),
                # Airflow's defaults, not the test stacks' smaller ones.
                "AIRFLOW__CORE__PARALLELISM": "32",
                "AIRFLOW__PG_SAFE_BACKUP__HOLDER_CHECK_PERIOD": str(CHECK_PERIOD_S),
                "BENCH_API_CALLS_DIR": str(calls_dir),
                "PYTHONPATH": os.pathsep.join(
                    p for p in (str(ROOT / "bench" / "apicount"), os.environ.get("PYTHONPATH")) if p
                ),
            },
            executor="CeleryExecutor",
            triggerers=2,
        )
        stack.start(timeout=300, expect_dag_ids=[FLEET_DAG, HOLDERS_DAG])
        stack.add_pool(POOL, slots, include_deferred=True)
        out = fleet_run(stack, fleet, slots, work)
        hold = holders_run(stack, holder_cluster, holders, idle)
        detail = {"fleet": out.pop("detail"), "holders": hold.pop("detail")}
        return {**out, **hold, "detail": detail}
    finally:
        if stack:
            stack.stop()
        for c, _ in fleet:
            c.stop("immediate")
        if holder_cluster:
            holder_cluster.stop("immediate")
        shutil.rmtree(work / "fleet_backups", ignore_errors=True)


if __name__ == "__main__":  # a figure on its own: python -m bench.fleetbench WORK N K H IDLE
    w = Path(sys.argv[1])
    w.mkdir(parents=True, exist_ok=True)
    print(json.dumps(run(w, *(int(x) for x in sys.argv[2:5]), float(sys.argv[5])), indent=1))
