"""The trigger runner of figure 3: one process, one event loop, N BackupHolderTriggers.

    python -m bench.holders --count N --prefix bench_s_ --owner-prefix OWNER --poll 30

Started by ``bench.sessions`` (which measures this process from outside). It runs the triggers the
way Airflow's triggerer does (``async for event in trigger.run()``), backup i on table
``<prefix><i:04d>`` of the connection ``--conn-id``, and talks JSON lines: it prints ``ready``
once imported and warmed up (one connection opened and closed), waits for ``go`` on stdin, prints
``spawned``, then one ``event`` per trigger as it ends, then ``finished``.

``--psycopg-notifies`` (the reference) makes the holders wait for NOTIFY with psycopg's own
``notifies(timeout=...)``, as pg-safe-backup did before: it wakes up every 0.1 s.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import sys
from typing import Any


def emit(**payload: Any) -> None:
    sys.stdout.write(json.dumps(payload) + "\n")
    sys.stdout.flush()


def table_name(prefix: str, i: int) -> str:
    return f"{prefix}{i:04d}"


def use_psycopg_notifies() -> None:
    from pg_safe_backup.hooks.backup import PostgresBackupHook

    async def wait_for_change(conn: Any, timeout: float) -> None:
        async for _ in conn.notifies(timeout=max(timeout, 0.001), stop_after=1):
            pass

    PostgresBackupHook.wait_for_change = staticmethod(wait_for_change)  # type: ignore[method-assign]


async def main(args: argparse.Namespace) -> None:
    from pg_safe_backup.hooks.backup import PostgresBackupHook
    from pg_safe_backup.triggers.backup import PostgresHoldBackupTrigger

    if args.psycopg_notifies:
        use_psycopg_notifies()
    # Warm up: the code paths of a connection (imports, connection lookup) before the idle figure.
    hook = PostgresBackupHook(args.conn_id, table=table_name(args.prefix, 1))
    async with hook.connect("bench warm-up") as conn:
        await hook.ensure_table(conn)
        await hook.read(conn)
    gc.collect()
    emit(kind="ready", pid=os.getpid())

    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    if (await reader.readline()).strip() != b"go":
        return

    async def run_one(i: int) -> None:
        owner = f"{args.owner_prefix}/{i}"
        trigger = PostgresHoldBackupTrigger(
            {"postgres_conn_id": args.conn_id, "table": table_name(args.prefix, i)},
            request={
                "owner": owner,
                "attempt": owner,
                "label": f"bench {owner}",
                "fast_checkpoint": True,
                "wait_for_archive": True,
                "poll_interval": args.poll,
            },
        )
        try:
            async for ev in trigger.run():  # the trigger ends the task itself; the reason is in its log
                ok = getattr(ev, "task_instance_state", None) == "success"
                emit(
                    kind="event",
                    i=i,
                    status="complete" if ok else "failed",
                    message="complete" if ok else f"{ev.payload}: see the reason in holders_{args.count}.log",
                )
        except Exception as err:  # reported to the parent, which fails the phase
            emit(kind="event", i=i, status="error", message=f"{type(err).__name__}: {err}"[:500])

    tasks = [asyncio.create_task(run_one(i)) for i in range(1, args.count + 1)]
    emit(kind="spawned", count=len(tasks))
    await asyncio.gather(*tasks)
    emit(kind="finished")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--owner-prefix", required=True)
    parser.add_argument("--conn-id", required=True)
    parser.add_argument("--poll", type=float, default=30.0)
    parser.add_argument("--psycopg-notifies", action="store_true")
    asyncio.run(main(parser.parse_args()))
