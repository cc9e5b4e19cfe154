"""Where the live cluster stands, for checking stored backups against it: its system identifier and its
current WAL position. The only SQL of pg-safe-backup outside :mod:`pg_safe_backup.hooks.backup`, kept
here in ``hooks/`` and free of Airflow: the ``pg-safe-backup retention --dsn`` command runs it on a
machine with only this package.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg

from pg_safe_backup.errors import TransientError
from pg_safe_backup.files.xlog import parse_lsn

#: The cluster's identity and how far its WAL goes: a standby's replayed position, a primary's written one.
POSITION_SQL = (
    "SELECT (SELECT system_identifier FROM pg_control_system())::text,"
    " CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END::text"
)


class ServerUnreachable(TransientError, RuntimeError):
    """The live cluster could not be asked (the message names the DSN's server and why)."""


@dataclass(frozen=True)
class ServerPosition:
    """What the live cluster says of itself."""

    system_identifier: str
    wal_lsn: str

    @property
    def wal_position(self) -> int:
        return parse_lsn(self.wal_lsn)


def server_position(dsn: str, timeout: float = 30) -> ServerPosition:
    """Ask the cluster at ``dsn`` for its system identifier and current WAL position.

    :param dsn: a libpq connection string or URI.
    :param timeout: seconds to connect.
    :raises ServerUnreachable: it cannot be reached or asked.
    """
    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=max(1, int(timeout))) as conn:
            row = conn.execute(POSITION_SQL).fetchone()
    except psycopg.Error as err:
        raise ServerUnreachable(f"cannot ask the server ({' '.join(str(err).split())})") from err
    if row is None or row[1] is None:
        raise ServerUnreachable("the server gave no WAL position")
    return ServerPosition(system_identifier=str(row[0]), wal_lsn=str(row[1]))


__all__ = ["ServerPosition", "ServerUnreachable", "server_position"]
