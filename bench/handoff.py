"""Figures 1 and 2: hand-off latency (done -> label stored) and start latency (start -> gate open).

One backup at a time on the small cluster, fast checkpoint, wait_for_archive=True. Each cycle:

* t0: ``hold_backup`` is started, and at once the gate ``wait_for_start``;
  the gate returning is the end of the start latency.
* a short "copy" (sleep), then the finish ``finish_backup``;
  it returning with the label is the end of the hand-off latency.

PostgreSQL's own time is read from the server log (log_min_duration_statement = 0, lines tied
to the holder's backend pid): pg_backup_start (mostly its checkpoint) and pg_backup_stop (mostly
the wait for the archiver, which polls once a second). Our overhead = total - that time.

The reference is the old scripts' design on the same server: a holder session that reads the
state every 5 s, a finish that sets ``done`` and reads the state every 5 s until ``complete``
(and a gate that reads it every 5 s until ``running``).
"""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path
from typing import Any

import psycopg

from bench.common import CONN_ID, PASSWORD, START_FUNCS, STOP_FUNCS, ServerLog, prune_archive, say, summary
from bench.instrument import TimedHook
from pg_safe_backup.local_cluster import LocalCluster
from pg_safe_backup.session import COMPLETE, STARTED, HoldRequest, finish_backup, hold_backup, wait_for_start

TABLE = "bench_handoff"
REF_SCHEMA = "poll_ref"


class BenchError(RuntimeError):
    pass


def ms(a: float, b: float) -> float:
    return (b - a) * 1000


async def our_cycle(i: int, log: ServerLog, poll: float) -> dict[str, Any]:
    owner = f"bench/handoff_{i:04d}/backup"
    holder_hook, gate_hook, finish_hook = (TimedHook(CONN_ID, table=TABLE) for _ in range(3))
    req = HoldRequest(
        owner=owner,
        attempt=f"{owner}#try1",
        label=f"bench {owner}",
        fast_checkpoint=True,
        wait_for_archive=True,
        poll_interval=poll,
    )
    offset = log.offset()
    t0 = time.perf_counter()
    holder = asyncio.create_task(hold_backup(holder_hook, req))
    gate = await asyncio.wait_for(wait_for_start(gate_hook, req.attempt, poll_interval=poll), 120)
    t_gate = time.perf_counter()
    if gate["status"] != STARTED:
        holder.cancel()
        raise BenchError(f"cycle {i}: the gate did not open: {gate['message']}")
    await asyncio.sleep(random.uniform(0.05, 0.25))  # the copy
    t_fin0, wall0 = time.perf_counter(), time.time()
    done = await asyncio.wait_for(
        finish_backup(finish_hook, req.attempt, gate["backup"]["start_lsn"], poll_interval=poll), 120
    )
    t_fin1, wall1 = time.perf_counter(), time.time()
    held = await asyncio.wait_for(holder, 60)
    if done["status"] != COMPLETE or held["status"] != COMPLETE or not done["backup"]["backup_label"]:
        raise BenchError(
            f"cycle {i}: backup not complete: finish {done['message']!r}, holder {held['message']!r}"
        )
    start, stop = holder_hook.first("start_backup"), holder_hook.first("stop_backup")
    pid = start[2]
    sl = log.since(offset, pid, STOP_FUNCS)
    fin_connect = finish_hook.first("connect")
    steps = sl.handoff_steps(fin_connect[2], pid, wall0, wall1) if fin_connect else {}
    return {
        **{f"log_{k}_ms": v for k, v in steps.items()},
        "start_total_ms": ms(t0, t_gate),
        "start_server_ms": sl.server_ms(pid, START_FUNCS),
        "checkpoint_ms": sl.checkpoints_ms[0] if sl.checkpoints_ms else None,
        "handoff_total_ms": ms(t_fin0, t_fin1),
        "stop_server_ms": sl.server_ms(pid, STOP_FUNCS),
        "stop_client_ms": ms(stop[0], stop[1]),
        # break-down of the hand-off (client clocks): finish connects, sets done; holder wakes and
        # calls pg_backup_stop; after it returns: label stored, finish woken and returns.
        "finish_connect_ms": ms(*fin_connect[:2]) if fin_connect else None,
        "to_stop_call_ms": ms(t_fin0, stop[0]),
        "after_stop_ms": ms(stop[1], t_fin1),
        # break-down of the start: holder connects, claims; pg_backup_start; gate wakes.
        "to_start_call_ms": ms(t0, start[0]),
        "after_start_ms": ms(start[1], t_gate),
    }


# -- the reference: the old scripts' 5-second poll loops --------------------------------------------


def ref_conninfo(cluster: LocalCluster) -> dict[str, Any]:
    return {
        "host": "127.0.0.1",
        "port": cluster.port,
        "user": "postgres",
        "password": PASSWORD,
        "dbname": "postgres",
        "autocommit": True,
        "application_name": "bench poll reference",
    }


async def ref_setup(kw: dict[str, Any]) -> None:
    async with await psycopg.AsyncConnection.connect(**kw) as conn:
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {REF_SCHEMA}")
        await conn.execute(f"DROP TABLE IF EXISTS {REF_SCHEMA}.backup")
        await conn.execute(f"DROP TYPE IF EXISTS {REF_SCHEMA}.backup_state")
        await conn.execute(
            f"CREATE TYPE {REF_SCHEMA}.backup_state AS ENUM ('running', 'done', 'complete', 'failed')"
        )
        await conn.execute(
            f"CREATE TABLE {REF_SCHEMA}.backup (id integer PRIMARY KEY, state {REF_SCHEMA}.backup_state,"
            " pid integer, backup_label text, tablespace_map text)"
        )
        await conn.execute(f"INSERT INTO {REF_SCHEMA}.backup VALUES (1, 'complete', NULL, NULL, NULL)")


async def _state(conn: psycopg.AsyncConnection) -> str:
    return (await (await conn.execute(f"SELECT state::text FROM {REF_SCHEMA}.backup")).fetchone())[0]


async def ref_holder(kw: dict[str, Any], label: str, poll: float, marks: dict[str, Any]) -> None:
    """The old pre-backup script: start, say running, read the state every ``poll`` s, stop on done."""
    async with await psycopg.AsyncConnection.connect(**kw) as conn:
        marks["pid"] = conn.info.backend_pid
        await conn.execute("SELECT pg_backup_start(%s, true)", [label])
        await conn.execute(
            f"UPDATE {REF_SCHEMA}.backup SET state = 'running', pid = pg_backend_pid(), backup_label = NULL"
        )
        while await _state(conn) != "done":
            await asyncio.sleep(poll)
        marks["stop_call"] = time.perf_counter()
        cur = await conn.execute("SELECT lsn::text, labelfile, spcmapfile FROM pg_backup_stop(true)")
        _, labelfile, spcmap = await cur.fetchone()
        marks["stop_return"] = time.perf_counter()
        await conn.execute(
            f"UPDATE {REF_SCHEMA}.backup SET state = 'complete', backup_label = %s, tablespace_map = %s",
            [labelfile, spcmap or None],
        )


async def ref_wait(kw: dict[str, Any], want: str, poll: float, set_done: bool = False) -> str:
    """The old gate / post-backup script: (set done, then) read the state every ``poll`` s."""
    async with await psycopg.AsyncConnection.connect(**kw) as conn:
        if set_done:
            await conn.execute(f"UPDATE {REF_SCHEMA}.backup SET state = 'done'")
        while (state := await _state(conn)) != want:
            if state == "failed":
                raise BenchError("reference backup failed")
            await asyncio.sleep(poll)
        cur = await conn.execute(f"SELECT backup_label FROM {REF_SCHEMA}.backup")
        return (await cur.fetchone())[0]


async def ref_cycle(i: int, kw: dict[str, Any], log: ServerLog, poll: float) -> dict[str, Any]:
    marks: dict[str, Any] = {}
    offset = log.offset()
    t0 = time.perf_counter()
    holder = asyncio.create_task(ref_holder(kw, f"bench poll reference {i}", poll, marks))
    await asyncio.wait_for(ref_wait(kw, "running", poll), 120)
    t_gate = time.perf_counter()
    # The copy: a random length, so the finish lands at a random phase of the holder's poll loop.
    await asyncio.sleep(random.uniform(0, poll))
    t_fin0 = time.perf_counter()
    label = await asyncio.wait_for(ref_wait(kw, "complete", poll, set_done=True), 120)
    t_fin1 = time.perf_counter()
    await asyncio.wait_for(holder, 60)
    if not label:
        raise BenchError(f"reference cycle {i}: no label")
    sl = log.since(offset, marks["pid"], STOP_FUNCS)
    return {
        "start_total_ms": ms(t0, t_gate),
        "start_server_ms": sl.server_ms(marks["pid"], START_FUNCS),
        "handoff_total_ms": ms(t_fin0, t_fin1),
        "stop_server_ms": sl.server_ms(marks["pid"], STOP_FUNCS),
        "to_stop_call_ms": ms(t_fin0, marks["stop_call"]),
    }


# -- the phase ------------------------------------------------------------------------------------------


def overheads(cycles: list[dict[str, Any]]) -> tuple[list[float], list[float]]:
    hand = [c["handoff_total_ms"] - c["stop_server_ms"] for c in cycles if c["stop_server_ms"] is not None]
    start = [
        c["start_total_ms"] - c["start_server_ms"] for c in cycles if c.get("start_server_ms") is not None
    ]
    return hand, start


def col(cycles: list[dict[str, Any]], key: str) -> list[float]:
    return [c[key] for c in cycles if c.get(key) is not None]


def run(
    cluster: LocalCluster,
    archive: Path,
    cycles: int,
    ref_cycles: int,
    poll: float = 5.0,
    ref_poll: float = 5.0,
    warmup: int = 2,
) -> dict[str, Any]:
    log = ServerLog(cluster.logfile)

    async def ours() -> list[dict[str, Any]]:
        out = []
        for i in range(warmup + cycles):
            c = await our_cycle(i, log, poll)
            prune_archive(archive)
            if i >= warmup:
                out.append(c)
            if i >= warmup and (i + 1 - warmup) % 10 == 0:
                say(f"  {i + 1 - warmup}/{cycles} backups")
        return out

    async def reference() -> list[dict[str, Any]]:
        kw = ref_conninfo(cluster)
        await ref_setup(kw)
        out = []
        for i in range(ref_cycles):
            out.append(await ref_cycle(i, kw, log, ref_poll))
            prune_archive(archive)
            say(f"  reference {i + 1}/{ref_cycles}: hand-off {out[-1]['handoff_total_ms']:.0f} ms")
        return out

    say(
        f"hand-off and start latency: {cycles} backups (+{warmup} warm-up), fast checkpoint, "
        "wait_for_archive,"
        f" poll_interval={poll:g}s"
    )
    mine = asyncio.run(ours())
    say(f"reference: {ref_cycles} backups driven by {ref_poll:g}-second poll loops")
    ref = asyncio.run(reference())

    hand, start = overheads(mine)
    ref_hand, ref_start = overheads(ref)
    missing = cycles - len(hand)
    return {
        "handoff_ms_median": summary(hand)["median"],
        "handoff_ms_p95": summary(hand)["p95"],
        "poll5s_handoff_ms_median": summary(ref_hand)["median"],
        "start_overhead_ms_median": summary(start)["median"],
        "start_overhead_ms_p95": summary(start)["p95"],
        "stop_ms_median": summary(col(mine, "stop_server_ms"))["median"],
        "checkpoint_ms_median": summary(col(mine, "checkpoint_ms"))["median"],
        "pg_backup_start_ms_median": summary(col(mine, "start_server_ms"))["median"],
        "detail": {
            "backups": cycles,
            "reference_backups": ref_cycles,
            "poll_interval_s": poll,
            "reference_poll_s": ref_poll,
            "server_time_missing_in_log": missing,
            "handoff_overhead_ms": summary(hand),
            "handoff_total_ms": summary(col(mine, "handoff_total_ms")),
            "pg_backup_stop_server_ms": summary(col(mine, "stop_server_ms")),
            "pg_backup_stop_client_ms": summary(col(mine, "stop_client_ms")),
            "handoff_breakdown_ms": {
                "finish_connect": summary(col(mine, "finish_connect_ms")),
                "finish_called_to_stop_called": summary(col(mine, "to_stop_call_ms")),
                "stop_returned_to_finish_returned": summary(col(mine, "after_stop_ms")),
            },
            "handoff_steps_server_clock_ms": {
                k: summary(col(mine, f"log_{k}_ms"))
                for k in (
                    "finish_called_to_done_committed",
                    "done_committed_to_stop_begins",
                    "stop_ends_to_finish_returned",
                )
            },
            "start_overhead_ms": summary(start),
            "start_total_ms": summary(col(mine, "start_total_ms")),
            "pg_backup_start_server_ms": summary(col(mine, "start_server_ms")),
            "checkpoint_ms": summary(col(mine, "checkpoint_ms")),
            "start_breakdown_ms": {
                "holder_called_to_start_called": summary(col(mine, "to_start_call_ms")),
                "start_returned_to_gate_open": summary(col(mine, "after_start_ms")),
            },
            "poll5s_handoff_overhead_ms": summary(ref_hand),
            "poll5s_handoff_total_ms": summary(col(ref, "handoff_total_ms")),
            "poll5s_stop_server_ms": summary(col(ref, "stop_server_ms")),
            "poll5s_start_overhead_ms": summary(ref_start),
        },
    }
