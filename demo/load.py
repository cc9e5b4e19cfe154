"""A write load for the demo, the tests and the benchmarks, and a wait for the WAL archive."""

from __future__ import annotations

import threading
import time

from pg_safe_backup.local_cluster import LocalCluster


class Writer(threading.Thread):
    """Inserts increasing ids into ``tables`` (one transaction per id; each table has columns
    ``id bigint PRIMARY KEY, v text``) and counts the commits that returned: every one of them
    must be in a restored backup taken later."""

    def __init__(
        self, cluster: LocalCluster, tables: tuple[str, ...] = ("ledger",), pause: float = 0.002
    ) -> None:
        super().__init__(daemon=True)
        self.cluster, self.tables, self.pause = cluster, tables, pause
        self.committed, self.halt, self.error = 0, threading.Event(), None

    def run(self) -> None:
        try:
            with self.cluster.connect() as conn:
                while not self.halt.is_set():
                    n = self.committed + 1
                    with conn.transaction():
                        for table in self.tables:
                            conn.execute(f"INSERT INTO {table} (id, v) VALUES (%s, md5(%s::text))", [n, n])
                    self.committed = n
                    time.sleep(self.pause)
        except Exception as err:  # noqa: BLE001 - reported by stop()
            self.error = err

    def stop(self) -> int:
        """Stop writing; the number of committed ids (raises what the writer hit, if anything)."""
        self.halt.set()
        self.join(10)
        if self.error is not None:
            raise self.error
        return self.committed


def invariant_sql(tables: tuple[str, ...], committed: int) -> str:
    """Rows (ok, detail) for the restore check: each table holds ids 1..n without a gap, n >= committed."""
    return "\nUNION ALL\n".join(
        f"SELECT count(*) = max(id) AND max(id) >= {int(committed)},"
        f" format('{table}: %s rows, max id %s; committed before the backup ended: {int(committed)}',"
        f" count(*), max(id)) FROM {table}"
        for table in tables
    )


def wait_archived(cluster: LocalCluster, timeout: float = 60) -> None:
    """Switch to a new WAL segment and wait until the previous one is in the archive."""
    # A record first: with no WAL since the last switch, pg_switch_wal() switches nothing and this would
    # wait for a segment that is still being written.
    cluster.sql("SELECT pg_logical_emit_message(false, 'pg_safe_backup', 'wait_archived')")
    segment = cluster.sql("SELECT pg_walfile_name(pg_switch_wal())")[0][0]
    deadline = time.monotonic() + timeout
    while (cluster.sql("SELECT last_archived_wal FROM pg_stat_archiver")[0][0] or "") < segment:
        if time.monotonic() > deadline:
            raise TimeoutError(f"WAL segment {segment} was not archived within {timeout:g}s")
        time.sleep(0.2)
