"""Client-side timestamps of the hook's calls, taken from outside the product code.

``TimedHook`` is a subclass of ``PostgresBackupHook`` that records when some of its methods are
called and return (and the backend pid they ran on). The product code is untouched: the holder
and waiters are simply given this hook. Only used for the break-down of our overhead; the
headline figures come from the wall clock around hold_backup/wait_for_start/finish_backup and the server log.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from pg_safe_backup.hooks.backup import PostgresBackupHook

#: Methods whose first argument is a connection; (name, called at, returned at, backend pid) is recorded.
TIMED = ("start_backup", "stop_backup", "request_done", "mark_complete", "listen", "claim", "ensure_table")


class TimedHook(PostgresBackupHook):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[str, float, float, int | None]] = []

    def first(self, name: str) -> tuple[float, float, int | None] | None:
        for n, t0, t1, pid in self.calls:
            if n == name:
                return t0, t1, pid
        return None

    @asynccontextmanager
    async def connect(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        t0 = time.perf_counter()
        async with super().connect(*args, **kwargs) as conn:
            self.calls.append(("connect", t0, time.perf_counter(), conn.info.backend_pid))
            yield conn


def _wrap(name: str) -> None:
    original = getattr(PostgresBackupHook, name, None)
    if original is None:  # the product renamed it: the break-down just lacks this step
        return

    async def timed(self: TimedHook, *args: Any, **kwargs: Any) -> Any:
        conn = args[0] if args else None
        pid = getattr(getattr(conn, "info", None), "backend_pid", None)
        t0 = time.perf_counter()
        try:
            return await original(self, *args, **kwargs)
        finally:
            self.calls.append((name, t0, time.perf_counter(), pid))

    timed.__name__ = name
    setattr(TimedHook, name, timed)


for _name in TIMED:
    _wrap(_name)
