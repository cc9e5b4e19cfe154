"""SQL against the live cluster that needs no Airflow: where it stands (system identifier, WAL position) for
checking stored backups against it, and what ``pg-safe-backup check`` reads (version, settings, privileges,
the archiver, the state table). The ``pg-safe-backup retention --dsn`` and ``check --dsn`` commands run it
on a machine with only this package.

:mod:`pg_safe_backup.hooks.backup` (the backup's own sessions, through Airflow connections) runs the
statements both need from here, so each query has one place: the backup and its pre-flight check read the
same settings the same way.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from pg_safe_backup.errors import TransientError
from pg_safe_backup.files.xlog import parse_lsn
from pg_safe_backup.state import ArchiveSettings

#: What every session of ours runs with: nothing on the search_path but the system catalog (an object
#: planted in a schema another role can write never resolves), and none of the server's timeouts.
SEARCH_PATH = "pg_catalog, pg_temp"

#: Marker stored as the state table's comment once its schema is in place (cheap re-check).
SCHEMA_VERSION = "pg_safe_backup schema 4"
# 2: attempt column, complete -> failed. 3: warnings column; trigger functions with a pinned search_path,
#    not executable by PUBLIC; the guard freezes complete rows and clears our columns when another client
#    takes the row (state.HOLDER_COLUMNS). 4: stop_timeline and timeline_history columns.

#: The state table's trigger functions (in its schema): the transition guard and the NOTIFY sender.
TRIGGER_FUNCTIONS = ("pg_safe_backup_guard", "pg_safe_backup_notify")

#: The cluster's identity and how far its WAL goes: a standby's replayed position, a primary's written one.
POSITION_SQL = (
    "SELECT (SELECT system_identifier FROM pg_control_system())::text,"
    " CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END::text"
)

#: How a server archives WAL (:class:`~pg_safe_backup.state.ArchiveSettings`: :func:`archive_settings_of`).
ARCHIVE_SETTINGS_SQL = (
    "SELECT pg_is_in_recovery(), current_setting('archive_mode'), current_setting('archive_command'),"
    " current_setting('archive_library', true), (SELECT system_identifier FROM pg_control_system()),"
    " has_function_privilege('pg_catalog.pg_switch_wal()', 'EXECUTE')"
)

#: pg_stat_archiver, with archive_mode (:class:`ArchiverState`).
ARCHIVER_SQL = (
    "SELECT current_setting('archive_mode'), failed_count, last_failed_wal, last_failed_time,"
    " last_archived_wal, last_archived_time FROM pg_stat_archiver"
)

#: The last WAL file the archiver reported archived.
LAST_ARCHIVED_SQL = "SELECT last_archived_wal FROM pg_stat_archiver"

#: A primary's (timeline, wal_segment_size): the timeline it writes and archives WAL on, as only
#: pg_walfile_name shows it (pg_control_checkpoint's lags behind a promotion until a checkpoint).
WAL_TIMELINE_SQL = (
    "SELECT pg_walfile_name(pg_current_wal_lsn()), pg_size_bytes(current_setting('wal_segment_size'))"
)

#: Write WAL as any role may: a transaction id taken, so its commit goes into WAL (no row, no lock).
WRITE_WAL_SQL = "SELECT pg_catalog.txid_current()"

#: Complete the current WAL segment so that it is archived (a no-op at a segment's start); returns the end
#: of the segment completed (its last byte is one before).
SWITCH_WAL_SQL = "SELECT pg_catalog.pg_switch_wal()::text"

#: Whether the state table (a quoted ``"schema"."table"``) carries :data:`SCHEMA_VERSION` as its comment.
TABLE_CURRENT_SQL = (
    "SELECT pg_catalog.obj_description(pg_catalog.to_regclass(%s), 'pg_class') IS NOT DISTINCT FROM %s"
)

#: A trigger function (``"schema"."name"()``) owned by another role than the table (``"schema"."table"``)
#: it serves: (its owner, the table's owner); no row when absent or owned alike.
FOREIGN_FUNCTION_SQL = (
    "SELECT pg_catalog.pg_get_userbyid(p.proowner), pg_catalog.pg_get_userbyid(c.relowner)"
    " FROM pg_catalog.pg_proc p, pg_catalog.pg_class c"
    " WHERE p.oid = pg_catalog.to_regprocedure(%s) AND c.oid = pg_catalog.to_regclass(%s)"
    " AND p.proowner <> c.relowner"
)

#: What the check reads of the server in one go (:class:`ServerFacts`).
FACTS_SQL = (
    "SELECT current_setting('server_version_num')::int, current_user, r.rolsuper, pg_is_in_recovery(),"
    " current_setting('wal_level'), current_setting('data_checksums'),"
    " current_setting('summarize_wal', true),"
    " (SELECT setting FROM pg_settings WHERE name = 'data_directory'),"
    " (SELECT system_identifier FROM pg_control_system()),"
    " (SELECT sum(pg_database_size(d.oid)) FROM pg_database d"
    " WHERE has_database_privilege(d.oid, 'CONNECT')),"
    " ARRAY(SELECT d.datname FROM pg_database d WHERE NOT has_database_privilege(d.oid, 'CONNECT')"
    " ORDER BY 1)"
    " FROM pg_roles r WHERE r.rolname = current_user"
)

#: What an incremental backup needs of the server (PostgreSQL 17+): its version, summarize_wal, whether the
#: role may replicate, the system identifier, each tablespace (oid, location) and whether the role may list
#: the WAL summaries (pg_available_wal_summaries is the superusers' unless granted).
INCREMENTAL_FACTS_SQL = (
    "SELECT current_setting('server_version_num')::int, current_setting('summarize_wal', true),"
    " r.rolreplication OR r.rolsuper, (SELECT system_identifier FROM pg_control_system())::text,"
    " ARRAY(SELECT ARRAY[t.oid::text, pg_tablespace_location(t.oid)] FROM pg_tablespace t"
    " WHERE pg_tablespace_location(t.oid) <> '' ORDER BY t.oid),"
    " to_regprocedure('pg_available_wal_summaries()') IS NOT NULL"
    " AND has_function_privilege('pg_available_wal_summaries()', 'EXECUTE')"
    " FROM pg_roles r WHERE r.rolname = current_user"
)
#: The WAL summaries on disk: (timeline, start LSN, end LSN), oldest first.
WAL_SUMMARIES_SQL = "SELECT tli, start_lsn::text, end_lsn::text FROM pg_available_wal_summaries() ORDER BY 2"

#: For each function signature: whether it exists, and whether the current role may execute it.
FUNCTION_PRIVILEGES_SQL = (
    "SELECT f, p IS NOT NULL, p IS NOT NULL AND has_function_privilege(p, 'EXECUTE')"
    " FROM unnest(%s::text[]) WITH ORDINALITY AS s(f, n), LATERAL (SELECT to_regprocedure(f) AS p) x"
    " ORDER BY n"
)

#: The state table and its schema, by name: what the backup role may do there, who owns it.
STATE_TABLE_SQL = (
    "SELECT n.oid IS NOT NULL, COALESCE(has_schema_privilege(n.oid, 'USAGE'), false),"
    " COALESCE(has_schema_privilege(n.oid, 'CREATE'), false), c.oid IS NOT NULL,"
    " pg_get_userbyid(c.relowner), o.rolsuper, pg_has_role(c.relowner, 'USAGE'),"
    " has_table_privilege(c.oid, 'SELECT'), has_table_privilege(c.oid, 'INSERT'),"
    " has_table_privilege(c.oid, 'UPDATE')"
    " FROM (SELECT 1) AS one"
    " LEFT JOIN pg_namespace n ON n.nspname = %s"
    " LEFT JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = %s AND c.relkind IN ('r', 'p')"
    " LEFT JOIN pg_roles o ON o.oid = c.relowner"
)


_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def validate_identifier(value: Any, param: str, max_len: int = 48) -> str:
    """Check a table/schema name: a plain identifier, so derived names (index, trigger) fit too."""
    if not isinstance(value, str) or not _IDENTIFIER.match(value) or len(value) > max_len:
        raise ValueError(
            f"{param} must be a plain SQL identifier (letters, digits, underscore; not starting with a"
            f" digit; at most {max_len} characters), got {value!r}"
        )
    return value


def backup_function_signatures(server_version: int) -> tuple[str, str]:
    """The functions that start and stop a non-exclusive backup (renamed in PostgreSQL 15), with their
    argument types, as GRANT EXECUTE and to_regprocedure name them."""
    if server_version >= 150000:
        return "pg_backup_start(text, boolean)", "pg_backup_stop(boolean)"
    return "pg_start_backup(text, boolean, boolean)", "pg_stop_backup(boolean, boolean)"


def backup_functions(server_version: int) -> str:
    """The backup functions' signatures, as one GRANT EXECUTE names them."""
    return ", ".join(backup_function_signatures(server_version))


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


def pinned_conninfo(dsn: str, application_name: str) -> dict[str, Any]:
    """``dsn`` as libpq keywords, with our search_path pinned from the first statement on (libpq's options;
    a later ``-c`` wins over the DSN's own) and ``application_name`` unless the DSN names one.

    :param dsn: a libpq connection string or URI.
    :param application_name: what pg_stat_activity shows for the session.
    :raises ServerUnreachable: the DSN cannot be read (the message does not repeat it: it may hold a
        password).
    """
    try:
        kwargs: dict[str, Any] = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as err:
        raise ServerUnreachable(f"the connection string cannot be read ({err.__class__.__name__})") from None
    pinned = f"-c search_path={SEARCH_PATH.replace(' ', '')}"
    kwargs["options"] = f"{kwargs.get('options') or ''} {pinned}".strip()
    kwargs.setdefault("application_name", application_name)
    return kwargs


@contextmanager
def connect(dsn: str, timeout: float = 30, purpose: str = "check") -> Iterator[psycopg.Connection]:
    """An autocommit session to the server at ``dsn``, its search_path pinned.

    :param dsn: a libpq connection string or URI.
    :param timeout: seconds to connect.
    :param purpose: names the session in pg_stat_activity.application_name.
    :raises ServerUnreachable: it cannot be reached.
    """
    kwargs = pinned_conninfo(dsn, f"pg_safe_backup {purpose}"[:63])
    try:
        conn = psycopg.connect(autocommit=True, **{"connect_timeout": max(1, int(timeout)), **kwargs})
    except psycopg.Error as err:
        raise ServerUnreachable(f"cannot connect to the server ({' '.join(str(err).split())})") from err
    with conn:
        yield conn


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


def archive_settings_of(
    row: Sequence[Any], conn_id: str, param: str, role: str, server_version: int
) -> ArchiveSettings:
    """:class:`ArchiveSettings` from a row of :data:`ARCHIVE_SETTINGS_SQL`.

    :param row: the row.
    :param conn_id: the connection (or server) it was read through, for messages.
    :param param: the parameter or flag naming that connection.
    :param role: the role connected.
    :param server_version: server_version_num.
    """
    in_recovery, mode, command, library, system_identifier, can_switch = row
    return ArchiveSettings(
        conn_id=conn_id,
        param=param,
        role=sql.Identifier(role).as_string(None),
        in_recovery=in_recovery,
        archive_mode=mode,
        archive_command=command,
        archive_library=library,
        server_version=server_version,
        system_identifier=system_identifier,
        can_switch_wal=can_switch,
    )


@dataclass(frozen=True)
class ArchiverState:
    """pg_stat_archiver's account, with archive_mode (a row of :data:`ARCHIVER_SQL`)."""

    archive_mode: str
    failed_count: int
    last_failed_wal: str | None
    last_failed_time: datetime | None
    last_archived_wal: str | None
    last_archived_time: datetime | None

    def describe(self) -> str:
        """One line for an error about WAL that was not archived."""
        return (
            f"archive_mode={self.archive_mode}; archiver: {self.failed_count} failed attempts,"
            f" last failed WAL {self.last_failed_wal} at {self.last_failed_time},"
            f" last archived WAL {self.last_archived_wal} at {self.last_archived_time}"
        )


@dataclass(frozen=True)
class ServerFacts:
    """What ``pg-safe-backup check`` reads of a server (a row of :data:`FACTS_SQL`).

    :param server_version: server_version_num.
    :param role: the role connected.
    :param superuser: that role is a superuser.
    :param in_recovery: a standby.
    :param wal_level: minimal, replica or logical.
    :param data_checksums: initdb --data-checksums (or pg_checksums --enable) was used.
    :param summarize_wal: on/off from PostgreSQL 17, else None.
    :param data_directory: as the server reports it (superusers and pg_read_all_settings), else None.
    :param system_identifier: pg_control's.
    :param databases_bytes: pg_database_size of every database the role may connect to.
    :param databases_unmeasured: the databases it may not connect to (their size is not counted).
    """

    server_version: int
    role: str
    superuser: bool
    in_recovery: bool
    wal_level: str
    data_checksums: bool
    summarize_wal: str | None
    data_directory: str | None
    system_identifier: int
    databases_bytes: int
    databases_unmeasured: tuple[str, ...]


def server_facts(conn: psycopg.Connection) -> ServerFacts:
    """Read :class:`ServerFacts` through ``conn``."""
    row = conn.execute(FACTS_SQL).fetchone()
    version, role, superuser, recovery, wal_level, checksums, summarize, datadir, sysid, size, unmeasured = (
        row
    )
    return ServerFacts(
        server_version=version,
        role=role,
        superuser=bool(superuser),
        in_recovery=recovery,
        wal_level=wal_level,
        data_checksums=checksums == "on",
        summarize_wal=summarize or None,
        data_directory=datadir or None,
        system_identifier=int(sysid),
        databases_bytes=int(size or 0),
        databases_unmeasured=tuple(unmeasured),
    )


def archive_settings(conn: psycopg.Connection, conn_id: str, param: str) -> ArchiveSettings:
    """How the server of ``conn`` archives WAL.

    :param conn_id: how messages name the server (a connection id, or host and port).
    :param param: the parameter or flag that names it.
    """
    row = conn.execute(ARCHIVE_SETTINGS_SQL).fetchone()
    return archive_settings_of(row, conn_id, param, conn.info.user or "", conn.info.server_version)


def archiver_state(conn: psycopg.Connection) -> ArchiverState:
    """pg_stat_archiver of the server of ``conn``."""
    return ArchiverState(*conn.execute(ARCHIVER_SQL).fetchone())


def wal_timeline_and_segment_size(conn: psycopg.Connection) -> tuple[int, int]:
    """(timeline, wal_segment_size) of a primary (see :data:`WAL_TIMELINE_SQL`)."""
    name, size = conn.execute(WAL_TIMELINE_SQL).fetchone()
    return int(name[:8], 16), size


def switch_wal(conn: psycopg.Connection) -> str:
    """Write a record into the primary's current WAL segment and complete it, so that a segment never
    archived before goes to the archive (pgBackRest's check writes a restore point, which only superusers
    may); the LSN just past it (see :data:`SWITCH_WAL_SQL`)."""
    conn.execute(WRITE_WAL_SQL)
    return conn.execute(SWITCH_WAL_SQL).fetchone()[0]


def function_privileges(conn: psycopg.Connection, signatures: Sequence[str]) -> list[tuple[str, bool, bool]]:
    """For each signature (``pg_catalog.f(type, ...)``): (signature, exists, the role may execute it)."""
    return [tuple(row) for row in conn.execute(FUNCTION_PRIVILEGES_SQL, [list(signatures)]).fetchall()]


@dataclass(frozen=True)
class StateTable:
    """The backup state table as a role sees it (a row of :data:`STATE_TABLE_SQL`, and more).

    :param schema_exists: its schema exists.
    :param schema_usage: the role may use the schema.
    :param schema_create: the role may create in the schema (the table is created on first use).
    :param exists: the table exists.
    :param owner: its owner.
    :param owner_superuser: its owner is a superuser.
    :param owned: the role is its owner or has the owner's rights (may migrate it).
    :param select: SELECT privilege, and ``insert``, ``update`` alike.
    :param current: its comment says :data:`SCHEMA_VERSION` (no migration pending).
    :param foreign_functions: (function, its owner) for each trigger function owned by another role.
    """

    schema_exists: bool
    schema_usage: bool
    schema_create: bool
    exists: bool
    owner: str | None
    owner_superuser: bool | None
    owned: bool | None
    select: bool | None
    insert: bool | None
    update: bool | None
    current: bool
    foreign_functions: tuple[tuple[str, str], ...]


def state_table(conn: psycopg.Connection, schema: str, table: str) -> StateTable:
    """How the role of ``conn`` stands to the state table ``schema``.``table``.

    :param schema: its schema's name.
    :param table: its name.
    """
    row = conn.execute(STATE_TABLE_SQL, [schema, table]).fetchone()
    qualified = sql.Identifier(schema, table).as_string(None)
    current = bool(conn.execute(TABLE_CURRENT_SQL, [qualified, SCHEMA_VERSION]).fetchone()[0])
    foreign = []
    for name in TRIGGER_FUNCTIONS:
        function = f"{sql.Identifier(schema, name).as_string(None)}()"
        found = conn.execute(FOREIGN_FUNCTION_SQL, [function, qualified]).fetchone()
        if found:
            foreign.append((function, found[0]))
    return StateTable(*row, current=current, foreign_functions=tuple(foreign))


__all__ = [
    "ArchiverState",
    "ServerFacts",
    "ServerPosition",
    "ServerUnreachable",
    "StateTable",
    "archive_settings",
    "archiver_state",
    "backup_function_signatures",
    "backup_functions",
    "connect",
    "function_privileges",
    "server_facts",
    "server_position",
    "state_table",
    "switch_wal",
    "validate_identifier",
    "wal_timeline_and_segment_size",
]


@dataclass(frozen=True)
class IncrementalFacts:
    """What an incremental backup needs of the server (a row of :data:`INCREMENTAL_FACTS_SQL`).

    :param server_version: server_version_num.
    :param summarize_wal: on/off (None before PostgreSQL 17).
    :param may_replicate: the role has REPLICATION (or is a superuser).
    :param system_identifier: pg_control's.
    :param tablespaces: oid -> location of each tablespace outside the data directory.
    :param summaries: (timeline, start LSN, end LSN) of each WAL summary, oldest first; None when the role
        may not list them.
    """

    server_version: int
    summarize_wal: str | None
    may_replicate: bool
    system_identifier: str
    tablespaces: dict[str, str]
    summaries: list[tuple[int, int, int]] | None


def incremental_facts(conn: psycopg.Connection) -> IncrementalFacts:
    """Read :class:`IncrementalFacts` through ``conn``."""
    version, summarize, replicate, sysid, spaces, listable = conn.execute(INCREMENTAL_FACTS_SQL).fetchone()
    summaries = None
    if listable and version >= 170000:
        rows = conn.execute(WAL_SUMMARIES_SQL).fetchall()
        summaries = [(int(tli), parse_lsn(start), parse_lsn(end)) for tli, start, end in rows]
    return IncrementalFacts(
        server_version=version,
        summarize_wal=summarize or None,
        may_replicate=bool(replicate),
        system_identifier=str(int(sysid) % (1 << 64)),
        tablespaces={oid: location for oid, location in spaces},
        summaries=summaries,
    )
