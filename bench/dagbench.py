"""Figure 4: the whole backup DAG on a multi-GB data directory against a raw `cp -a` of it.

A cluster is filled with ``pgbench -i -s SCALE`` (WAL level minimal while loading, so the load
writes no WAL to archive; then WAL archiving is switched on). A real Airflow on the production stack
(demo/stack.py: api-server, scheduler, dag-processor, two triggerers, CeleryExecutor with a Redis
broker and one worker, metadata in PostgreSQL) runs
``bench/dags/pg_backup_bench.py`` (the example DAG with ``cp -a`` as the copy). Timed alternately in
the same run: ``cp -a DATA COPY`` on its own, and the DAG from trigger to success, which copies the
same directory to the same disk with the same command. Each copy is deleted (the disk synced, then
SETTLE_S seconds of rest) before the next. All of it twice, on two stacks one after the other: with
``[scheduler] scheduler_idle_sleep_time = 0.2`` (the headline figures), then with Airflow's defaults (the
same keys ending ``_airflow_defaults``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil

from bench.common import PASSWORD, ROOT, archive_settings, make_archive, quantile, say
from demo.stack import AirflowStack
from pg_safe_backup.local_cluster import LocalCluster

DAG_ID = "pg_backup_bench"
MB_PER_SCALE = 15.5  # pgbench -i: ~15 MB of tables and indexes per scale unit (~2.3 GB at 150)


class DiskSpaceError(RuntimeError):
    pass


def du_bytes(path: Path) -> int:
    out = subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


def check_disk(work: Path, data_bytes: float, what: str) -> None:
    free = shutil.disk_usage(work).free
    if free < 3 * data_bytes:
        raise DiskSpaceError(
            f"not enough free disk in {work}: {free / 2**30:.1f} GB free, but {what} needs 3 x"
            f" {data_bytes / 2**30:.1f} GB (the data directory, one copy at a time, WAL and headroom)."
            " Free some space, use a smaller BENCH_SCALE, or point BENCH_WORKDIR elsewhere."
        )


def load_pgbench(datadir: Path, scale: int) -> LocalCluster:
    """A running cluster in ``datadir`` filled by ``pgbench -i -s scale``; WAL level minimal, so the load
    writes (almost) no WAL.

    :param datadir: where to initdb (its parent must be reachable by the postgres OS user).
    :param scale: pgbench's scale (~15.5 MB each).
    """
    datadir.parent.mkdir(parents=True, exist_ok=True)
    check_disk(
        datadir.parent,
        scale * MB_PER_SCALE * 2**20,
        f"pgbench scale {scale} (~{scale * MB_PER_SCALE / 1024:.1f} GB)",
    )
    cluster = LocalCluster(datadir).init(
        password=PASSWORD,
        settings={
            "wal_level": "minimal",
            "max_wal_senders": 0,
            "archive_mode": "off",
            "max_wal_size": "'2GB'",
            "shared_buffers": "'256MB'",
            "log_checkpoints": "on",
        },
    )
    cluster.start()
    say(f"  pgbench -i -s {scale} (this takes a while)")
    t0 = time.monotonic()
    pgbench_init(cluster, scale)
    say(f"  loaded in {time.monotonic() - t0:.0f} s")
    return cluster


def pgbench_init(cluster: LocalCluster, scale: int) -> None:
    """``pgbench -i -s scale`` into the running ``cluster`` (over its socket, as postgres)."""
    cluster.run(
        "pgbench",
        "-i",
        "-q",
        "-s",
        str(scale),
        "-h",
        str(cluster.socket_dir),
        "-p",
        str(cluster.port),
        "-U",
        "postgres",
        "postgres",
        timeout=7200,
    )


def make_big_cluster(work: Path, scale: int) -> tuple[LocalCluster, Path]:
    """:func:`load_pgbench` in WORK/big, then restarted with WAL archiving (WORK/big_wal_archive)."""
    archive = make_archive(work / "big_wal_archive")
    cluster = load_pgbench(work / "big" / "data", scale)
    cluster.stop()
    cluster.configure({"wal_level": "replica", "max_wal_senders": 4, **archive_settings(archive)})
    cluster.start()
    cluster.sql("CHECKPOINT")
    return cluster, archive


#: Prefix of the copy command, here and in the DAG: bash's `time` prints cp's elapsed and CPU time.
TIMED = "TIMEFORMAT='cp -a: %R s elapsed, %S s system, %U s user'; time "
_TIME_LINE = re.compile(r"cp -a: ([0-9.]+) s elapsed, ([0-9.]+) s system, ([0-9.]+) s user")


def parse_time_line(text: str) -> dict[str, float] | None:
    m = _TIME_LINE.search(text)
    return {"elapsed": float(m[1]), "system": float(m[2]), "user": float(m[3])} if m else None


def timed_cp(src: Path, dst: Path) -> tuple[float, dict[str, float] | None]:
    """The DAG's copy command run on its own: (wall seconds, bash's time report)."""
    t0 = time.monotonic()
    proc = subprocess.run(
        ["bash", "-c", f"{TIMED}cp -a {src} {dst}"], check=True, capture_output=True, text=True
    )
    return time.monotonic() - t0, parse_time_line(proc.stderr)


#: Seconds of rest after deleting a copy, before the next timed copy. The kernel hands the freed
#: memory back to the hypervisor after ~2 s on VMs with free page reporting (virtio-balloon, e.g.
#: Firecracker): a copy started at once reuses memory still backed by the host and runs about
#: twice as fast as one started later (0.6 s against 1.4 s for 2 GB here). Both the raw copy and
#: the DAG's start from the same state this way.
SETTLE_S = 10


def remove_copy(dst: Path) -> None:
    shutil.rmtree(dst, ignore_errors=True)
    subprocess.run(["sync"], check=False)  # the next timing does not pay for this one's write-back
    time.sleep(SETTLE_S)


def _ts(value: str | None) -> float | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() if value else None


def task_timeline(stack: AirflowStack, run_id: str) -> dict[str, Any]:
    """Per task: seconds from the run's start to the task's start and end (Airflow's own clocks)."""
    q = stack._q
    run = stack._api("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{q(run_id)}")
    tis = stack._get_all(f"/api/v2/dags/{DAG_ID}/dagRuns/{q(run_id)}/taskInstances", "task_instances")
    t0 = _ts(run.get("start_date"))
    out: dict[str, Any] = {
        "run_s": round(_ts(run["end_date"]) - t0, 1) if run.get("end_date") and t0 else None
    }
    for ti in sorted(tis, key=lambda t: t.get("start_date") or ""):
        s, e = _ts(ti.get("start_date")), _ts(ti.get("end_date"))
        out[ti["task_id"]] = {
            "start": round(s - t0, 1) if s and t0 else None,
            "end": round(e - t0, 1) if e and t0 else None,
        }
    if t0:
        out["log_events"] = task_events(stack, run_id, t0)
    return out


def task_events(stack: AirflowStack, run_id: str, t0: float) -> dict[str, list[list[Any]]]:
    """Per task of the backup: its log lines (worker's and triggerer's) as [seconds from the run's start,
    the line's first 90 characters], where the time of each backup goes."""
    out: dict[str, list[list[Any]]] = {}
    for task_id in ("backup.hold_backup_session", "backup.wait_for_backup_mode", "backup.finish_backup"):
        lines = []
        for line in stack.task_log(DAG_ID, run_id, task_id, raw=True).splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if (ts := _ts(rec.get("timestamp"))) is not None:
                lines.append([round(ts - t0, 2), str(rec.get("event", ""))[:90]])
        out[task_id] = sorted(lines)
    return out


def holder_event_delay(stack: AirflowStack, run_id: str) -> float | None:
    """Seconds between the holder storing the label ('backup complete: ...' in its trigger log) and
    its trigger firing the event that lets the holder task (and so the DAG run) finish."""
    stored = fired = None
    for line in stack.task_log(DAG_ID, run_id, "backup.hold_backup_session", raw=True).splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        event = str(rec.get("event", ""))
        if event.startswith("backup complete:") and stored is None:
            stored = _ts(rec["timestamp"])
        elif event.startswith("Trigger fired event"):
            fired = _ts(rec["timestamp"])
    return round(fired - stored, 2) if stored and fired else None


def copy_command_times(stack: AirflowStack, run_id: str) -> dict[str, float] | None:
    """bash's time report of `cp -a` inside the copy task (from its log)."""
    return parse_time_line(stack.task_log(DAG_ID, run_id, "backup.copy_data_directory"))


_MANIFEST_LINE = re.compile(
    r"backup_manifest: .* SHA256 checksums \(([0-9.]+) MB read here.*\), in ([0-9.]+) s"
)


def manifest_pass_s(stack: AirflowStack, run_id: str) -> float | None:
    """Seconds the store spent hashing the copy for its manifest (SHA-256 of every file ``cp -a`` wrote,
    which the copy operator would have hashed as it copied): work that grows with the data, like the copy
    itself, so it is not part of the fixed cost (from the store's log)."""
    m = _MANIFEST_LINE.search(stack.task_log(DAG_ID, run_id, "store_backup_label"))
    return float(m[2]) if m else None


#: The scheduler setting figure 4 measures beside Airflow's defaults: the scheduler looks again after 0.2 s
#: instead of 1 s when a loop found nothing to do, so each hop from a task's end to the next task's start
#: takes a fraction of a second (README, "Sizing a fleet").
TUNED = {"AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "0.2"}


def run(work: Path, scale: int, runs: int, profile: bool = False) -> dict[str, Any]:
    """Figure 4 on one data directory, on the production stack twice: with ``[scheduler]
    scheduler_idle_sleep_time = 0.2`` (:data:`TUNED`, the headline keys, profiled), then with Airflow's
    defaults (the same keys with ``_airflow_defaults``)."""
    say(f"whole DAG against raw cp -a: pgbench scale {scale}, {runs} run(s) of each")
    cluster = None
    copies = work / "copies"
    try:
        cluster, _ = make_big_cluster(work, scale)
        data_bytes = du_bytes(cluster.datadir)
        check_disk(work, data_bytes, f"the {data_bytes / 2**30:.1f} GB data directory")
        copies.mkdir()
        say(f"  data directory: {data_bytes / 2**30:.2f} GB")
        tuned = measure(work / "airflow_tuned", cluster, copies, runs, profile, TUNED)
        defaults = measure(work / "airflow_defaults", cluster, copies, runs, False, {})
        detail = {
            "scale": scale,
            "data_gb": round(data_bytes / 2**30, 2),
            "runs": runs,
            "airflow_config": TUNED,
            **tuned.pop("detail"),
            "airflow_defaults": defaults.pop("detail"),
        }
        return {
            **tuned,
            **{f"{key}_airflow_defaults": value for key, value in defaults.items()},
            "detail": detail,
        }
    finally:
        if cluster:
            cluster.stop()
        shutil.rmtree(copies, ignore_errors=True)


def measure(
    home: Path, cluster: LocalCluster, copies: Path, runs: int, profile: bool, config: dict[str, str]
) -> dict[str, Any]:
    """Figure 4's runs on one production stack started in ``home`` with ``config`` (Airflow settings)."""
    say(f"  starting Airflow ({', '.join(f'{k}={v}' for k, v in config.items()) or 'Airflow defaults'})")
    stack = None
    work = home.parent
    try:
        stack = AirflowStack(
            home,
            ROOT / "bench" / "dags",
            extra_env={
                "AIRFLOW_CONN_BENCH_PG": cluster.airflow_conn_uri(password=PASSWORD),
                "BENCH_PGDATA": str(cluster.datadir),
                "BENCH_BACKUP_ROOT": str(copies),
                **config,
            },
            # The production stack: CeleryExecutor (Redis), two triggerers, metadata in PostgreSQL.
            executor="CeleryExecutor",
            triggerers=2,
        )
        stack.start(timeout=300, expect_dag_ids=[DAG_ID])
        scheduler = psutil.Process(stack.pids()["scheduler"])

        def dag_run(run_id: str) -> float:
            """Trigger -> success in seconds: from just before the trigger request to the run's end_date
            (Airflow's clock, this machine's), so that waiting here polls the API server only once a
            second."""
            t0 = time.time()
            stack.trigger(DAG_ID, run_id=run_id)
            state = stack.wait_for_run(DAG_ID, run_id, timeout=3600, poll_interval=1.0)
            run = stack._api("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{stack._q(run_id)}")
            wall = _ts(run["end_date"]) - t0
            label = copies / run_id / "backup_label"
            if state != "success" or not label.is_file():
                tasks = stack.task_states(DAG_ID, run_id)
                logs = "\n".join(stack.task_log(DAG_ID, run_id, t)[-2000:] for t in tasks)
                raise RuntimeError(
                    f"DAG run {run_id} ended {state} (label stored: {label.is_file()}): {tasks}\n{logs}"
                )
            timelines[run_id] = task_timeline(stack, run_id)
            timelines[run_id]["cp_in_task"] = copy_command_times(stack, run_id)
            timelines[run_id]["manifest_pass_s"] = manifest_pass_s(stack, run_id)
            timelines[run_id]["holder_event_delay_s"] = holder_event_delay(stack, run_id)
            remove_copy(copies / run_id)
            return wall

        raw, dag, timelines, raw_reports = [], [], {}, []
        load_at_start = [round(x, 2) for x in os.getloadavg()]
        cpu0, t0 = sum(scheduler.cpu_times()[:2]), time.monotonic()
        # The first run after Airflow starts pays the workers' first imports (seconds here); a
        # deployment's scheduler is long running, so it is reported apart and not in the median.
        cold = dag_run("bench_cold")
        say(f"  DAG run after Airflow start (not counted): {cold:.1f} s")
        for k in range(1, runs + 1):
            dst = copies / f"raw_{k}"
            wall_cp, report = timed_cp(cluster.datadir, dst)
            raw.append(wall_cp)
            raw_reports.append(report)
            remove_copy(dst)
            say(f"  raw cp -a #{k}: {raw[-1]:.1f} s")
            dag.append(dag_run(f"bench_{k}"))
            say(f"  DAG run #{k}: {dag[-1]:.1f} s from trigger to success")
        scheduler_cpu = (sum(scheduler.cpu_times()[:2]) - cpu0) / (time.monotonic() - t0)
        profile_summary = None
        if profile:
            from bench.profile import record_during

            say(
                "  profiling one more DAG run (py-spy on the scheduler, the Celery worker and its task "
                "processes, and both triggerers)"
            )
            pids = stack.pids()
            profile_summary = record_during(
                {
                    "scheduler": pids["scheduler"],
                    "worker+tasks": pids["worker-default"],
                    "triggerer": pids["triggerer"],
                    "triggerer-2": pids["triggerer-2"],
                },
                max(dag) * 1.5 + 10,
                lambda: dag_run("bench_profiled"),
                work,
            )
        cp_in_dag = [timelines[f"bench_{k}"]["cp_in_task"] for k in range(1, runs + 1)]
        raw_m, dag_m = quantile(raw, 0.5), quantile(dag, 0.5)
        cp_m = quantile([c["elapsed"] for c in cp_in_dag if c], 0.5)
        hashing = [timelines[f"bench_{k}"]["manifest_pass_s"] or 0.0 for k in range(1, runs + 1)]
        return {
            "dag_wall_s": round(dag_m, 1),
            "raw_copy_s": round(raw_m, 1),
            "dag_target_s": round(raw_m * 1.05 + 10, 1),
            "cp_inside_dag_s": None if cp_m is None else round(cp_m, 1),
            # The fixed cost: the DAG's time less what grows with the data (its cp -a, and the store's
            # SHA-256 pass over what cp -a wrote).
            "dag_minus_its_own_cp_s": None
            if cp_m is None
            else round(
                quantile(
                    [d - c["elapsed"] - h for d, c, h in zip(dag, cp_in_dag, hashing, strict=True) if c], 0.5
                ),
                1,
            ),
            "manifest_pass_in_dag_s": round(quantile(hashing, 0.5), 1),
            "detail": {
                "raw_copy_s_each": [round(x, 1) for x in raw],
                "dag_wall_s_each": [round(x, 1) for x in dag],
                "dag_cold_wall_s": round(cold, 1),
                "cp_inside_dag_each": cp_in_dag,
                "raw_cp_each": raw_reports,
                "load_avg_at_start": load_at_start,
                "load_avg_at_end": [round(x, 2) for x in os.getloadavg()],
                "scheduler_cpu_percent_of_a_core": round(scheduler_cpu * 100, 1),
                "task_timelines_s": timelines,
                "profile": profile_summary,
            },
        }
    finally:
        if stack:
            stack.stop()
