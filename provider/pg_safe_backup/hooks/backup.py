"""PostgresBackupHook: every SQL statement of pg-safe-backup lives in this module.

Everything else calls it by intent (``claim``, ``request_done``, ``mark_failed``, ...).  The
statements run on psycopg 3 async connections: the holder trigger needs one, and the operators
that do not defer run their trigger's wait with :func:`asyncio.run`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from airflow.providers.common.compat.sdk import AirflowNotFoundException  # airflow.sdk.exceptions: 3.2+
from airflow.providers.postgres.hooks.postgres import PostgresHook
from airflow.sdk import BaseHook

from pg_safe_backup.errors import PermanentError
from pg_safe_backup.files.extconfig import SERVER_SETTINGS, ServerConfig
from pg_safe_backup.hooks.server import (
    ARCHIVE_SETTINGS_SQL,
    ARCHIVER_SQL,
    FOREIGN_FUNCTION_SQL,
    LAST_ARCHIVED_SQL,
    SCHEMA_VERSION,
    SEARCH_PATH,
    SWITCH_WAL_SQL,
    TABLE_CURRENT_SQL,
    TRIGGER_FUNCTIONS,
    WAL_TIMELINE_SQL,
    ArchiverState,
    archive_settings_of,
    backup_functions,
    validate_identifier,
)
from pg_safe_backup.state import (
    HOLDER_COLUMNS,
    TRANSITIONS,
    WITHDRAW_COLUMNS,
    ArchiveSettings,
    BackupRow,
    BackupState,
    Claim,
    decide_claim,
)

# SCHEMA_VERSION (the table's comment once current), SEARCH_PATH, backup_functions and the statements the
# pre-flight check shares live in hooks/server.py (no Airflow); imported here, one place per query.

#: The seed scripts' columns (besides id).
SEED_COLUMNS: tuple[str, ...] = ("state", "pid", "backup_label", "tablespace_map")

#: Columns added to the seed scripts' table (id, state, pid, backup_label, tablespace_map).
EXTRA_COLUMNS: tuple[tuple[str, str], ...] = (
    ("label", "text"),
    ("owner", "text"),
    ("attempt", "text"),  # the hold task instance's try (its UUID): the backup belongs to it alone
    ("holder_try", "integer"),
    ("holder_started_at", "timestamptz"),
    ("start_lsn", "pg_lsn"),
    ("stop_lsn", "pg_lsn"),
    ("timeline", "integer"),
    ("started_at", "timestamptz"),
    ("finished_at", "timestamptz"),
    ("updated_at", "timestamptz"),
    ("error", "text"),
    ("system_identifier", "bigint"),  # of the cluster backed up, to check copies against
    (
        "warnings",
        "text",
    ),  # PostgreSQL's NOTICEs and WARNINGs about the backup (WAL archiving not enabled, ...)
    ("stop_timeline", "integer"),  # where the backup stopped: a standby may follow a promotion meanwhile
    ("timeline_history", "text"),  # the history file of stop_timeline, when it is not the start's
)

_ROW_COLUMNS = sql.SQL(
    "b.state::text, b.pid, b.owner, b.attempt, b.holder_try, b.label, b.start_lsn::text, b.stop_lsn::text,"
    " b.timeline, b.backup_label, b.tablespace_map, b.error, b.system_identifier, b.warnings,"
    " b.stop_timeline, b.timeline_history,"
    # The holder is alive while its backend is connected; backend_start guards against a
    # pid reused after a server restart (it reads NULL for other roles' sessions without
    # pg_read_all_stats, where the pid alone has to do).
    " EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid = b.pid AND (a.backend_start IS NULL"
    " OR b.holder_started_at IS NULL OR a.backend_start = b.holder_started_at))"
)


class BackupError(PermanentError):
    """A backup could not be started, held or finished; the message says why."""


def _through_pooler(conn_id: str, why: str) -> BackupError:
    """The error for a connection that does not reach PostgreSQL directly; ``why`` is the evidence."""
    return BackupError(
        f"connection {conn_id!r} does not reach PostgreSQL directly ({why}): connect to PostgreSQL directly,"
        " not through a pooler (pgbouncer or any other). Backup mode belongs to one server session and ends"
        " only with it; a pooler shares that session with other clients and keeps it open after ours is gone"
    )


def _cannot_connect(conn_id: str, err: psycopg.OperationalError) -> BackupError:
    """Why ``conn_id`` failed to connect; pgbouncer turning away a libpq startup parameter PostgreSQL
    accepts (``options``) says the connection goes through a pooler."""
    text = str(err)
    if (at := text.find("unsupported startup parameter")) >= 0:
        return _through_pooler(conn_id, f"it refused the login with {text[at:].strip()!r}")
    return BackupError(f"cannot connect to PostgreSQL through connection {conn_id!r}: {err}")


class _PostgresHookArguments(PostgresHook):
    """PostgresHook's own mapping of an Airflow connection to libpq arguments, IAM tokens included:
    :meth:`get_conn` returns the arguments instead of opening its (synchronous) connection."""

    def _create_connection(self, conn_args: dict[str, Any]) -> Any:
        return conn_args


async def _drain_notifies(conn: psycopg.AsyncConnection) -> bool:
    """Take the notifications already received or waiting on the socket; True if there were any."""
    got = False
    async for _ in conn.notifies(timeout=0):
        got = True
    return got


class PostgresBackupHook(BaseHook):
    """
    Talk to the cluster being backed up: the ``backup`` table and the backup functions.

    :param postgres_conn_id: Airflow connection of type postgres, read as PostgresHook reads it (host,
        port, login, password, schema = database, extra = libpq options such as sslmode, or ``iam``).
    :param database: database to connect to instead of the connection's schema.
    :param table: name of the backup state table (created on first use).
    :param schema: schema of the backup state table.
    :param state_conn_id: connection holding the state table when it differs from the server backed
        up: a hot standby is backed up through ``postgres_conn_id`` while its table, which a
        standby cannot write, lives on the primary.
    """

    conn_name_attr = "postgres_conn_id"
    default_conn_name = "postgres_default"
    conn_type = "postgres"
    hook_name = "PostgreSQL online backup"

    def __init__(
        self,
        postgres_conn_id: str = default_conn_name,
        database: str | None = None,
        table: str = "backup",
        schema: str = "public",
        state_conn_id: str | None = None,
    ) -> None:
        super().__init__()
        self.postgres_conn_id = postgres_conn_id
        self.state_conn_id = state_conn_id or postgres_conn_id
        #: Backup session and state table on different servers (backup of a standby).
        self.separate_state = self.state_conn_id != postgres_conn_id
        self.database = database
        self.table = validate_identifier(table, "table")
        self.schema = validate_identifier(schema, "schema")
        self.qualified = sql.Identifier(schema, table)
        #: LISTEN channel; the notify trigger sends to TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME.
        self.channel = f"{schema}.{table}"
        self._ready = False  # the table was seen created and current

    @property
    def table_description(self) -> str:
        """The state table as errors name it: table, schema and the connection it lives on."""
        return f'the state table "{self.schema}"."{self.table}" of connection {self.state_conn_id!r}'

    # -- connections -------------------------------------------------------------------------

    async def connection_kwargs(self, conn_id: str) -> dict[str, Any]:
        """libpq keyword arguments for ``conn_id``: PostgresHook's (host, port, login, password, schema,
        extras; an IAM token instead of the password when the extra ``iam`` is set), plus our session's
        defaults (application_name, keepalives, connect_timeout) and the pinned search_path."""
        param = "postgres_conn_id" if conn_id == self.postgres_conn_id else "state_conn_id"
        try:
            conn = await self.aget_connection(conn_id)  # async: safe in the triggerer's event loop
        except AirflowNotFoundException as err:
            raise BackupError(
                f"{param} {conn_id!r}: no such Airflow connection; create it (type postgres)"
            ) from err
        postgres = _PostgresHookArguments(postgres_conn_id=conn_id, connection=conn, database=self.database)
        try:
            # Synchronous: an IAM token is a call to AWS or Azure (and a look-up of their connection).
            kwargs: dict[str, Any] = await asyncio.to_thread(postgres.get_conn)
        except Exception as err:
            raise BackupError(
                f"{param} {conn_id!r}: PostgresHook cannot make its connection arguments: {err}"
            ) from err
        kwargs.pop("row_factory", None)  # the extra "cursor": our statements read plain tuples
        kwargs.pop("cursor_factory", None)
        kwargs.setdefault("application_name", "pg_safe_backup")
        kwargs.setdefault("connect_timeout", 10)
        # Pinned from the first statement on (libpq's options; a later -c wins over the connection's own).
        pinned = f"-c search_path={SEARCH_PATH.replace(' ', '')}"
        kwargs["options"] = f"{kwargs.get('options') or ''} {pinned}".strip()
        # A dropped network must end a held session within seconds, not at the next TCP timeout.
        for key, value in (
            ("keepalives", 1),
            ("keepalives_idle", 10),
            ("keepalives_interval", 5),
            ("keepalives_count", 3),
        ):
            kwargs.setdefault(key, value)
        return {k: v for k, v in kwargs.items() if v not in (None, "")}

    def conninfo(self, backup_server: bool = False) -> str:
        """The libpq connection string of the state table's server (or, ``backup_server``, the one backed up)
        as :meth:`connection_kwargs` makes it, for the Airflow-free code in :mod:`pg_safe_backup.hooks.server`
        (synchronous: an operator's ``execute()``, not the triggerer's event loop).

        :raises BackupError: no such connection, or its arguments cannot be made.
        """
        conn_id = self.postgres_conn_id if backup_server else self.state_conn_id
        kwargs = asyncio.run(self.connection_kwargs(conn_id))
        return make_conninfo(**{k: str(v) for k, v in kwargs.items()})

    @asynccontextmanager
    async def connect(
        self, purpose: str = "", backup_server: bool = False
    ) -> AsyncIterator[psycopg.AsyncConnection]:
        """An autocommit session to the state table's server (or, ``backup_server``, the one backed
        up); ``purpose`` names it in pg_stat_activity.application_name."""
        conn_id = self.postgres_conn_id if backup_server else self.state_conn_id
        kwargs = await self.connection_kwargs(conn_id)
        if purpose:
            kwargs["application_name"] = f"pg_safe_backup {purpose}"[:63]
        try:
            conn = await psycopg.AsyncConnection.connect(autocommit=True, **kwargs)
        except psycopg.OperationalError as err:
            raise _cannot_connect(conn_id, err) from err
        try:
            await self.ensure_direct(conn, conn_id)
            await self.prepare_session(conn)
            yield conn
        finally:
            await conn.close()

    @staticmethod
    async def backend_pid(conn: psycopg.AsyncConnection) -> int:
        """The pid of the server session that runs this connection's statements."""
        return (await (await conn.execute("SELECT pg_catalog.pg_backend_pid()")).fetchone())[0]

    async def ensure_direct(self, conn: psycopg.AsyncConnection, conn_id: str) -> None:
        """Refuse a session that is not a direct backend of the server.

        PostgreSQL announces its session's pid at login (BackendKeyData, ``conn.info.backend_pid``;
        the postmaster finds the session to cancel by that pid, see processCancelRequest); a pooler
        announces a key of its own instead, and runs our statements in whichever server session it
        chooses.

        :param conn_id: the Airflow connection ``conn`` was opened through, for the error.
        """
        try:
            server_pid = await self.backend_pid(conn)
        except psycopg.Error as err:
            raise BackupError(
                f"cannot use the session of connection {conn_id!r}: {self.explain(err, conn)}"
            ) from err
        if server_pid != conn.info.backend_pid:
            raise _through_pooler(
                conn_id,
                f"its statements run in server session {server_pid}, but the"
                f" session it logged in to announced pid {conn.info.backend_pid}",
            )

    @staticmethod
    async def prepare_session(conn: psycopg.AsyncConnection) -> None:
        """No session of a backup (holder, gate, finish) may be ended by the server's own timeouts,
        whatever the role's or database's settings say; over TCP, the server notices a vanished
        client within seconds (and ends its backup mode)."""
        settings = [
            "statement_timeout = 0",
            "idle_in_transaction_session_timeout = 0",
            "tcp_keepalives_idle = 10",
            "tcp_keepalives_interval = 5",
            "tcp_keepalives_count = 3",
        ]
        if conn.info.server_version >= 140000:
            settings.append("idle_session_timeout = 0")
        await conn.execute("; ".join(f"SET {s}" for s in settings))

    # -- schema --------------------------------------------------------------------------------

    async def ensure_table(self, conn: psycopg.AsyncConnection) -> None:
        """Create the table, or migrate the seed scripts' table in place, then mark it current."""
        t = self.qualified
        state_type = sql.Identifier(self.schema, "backup_state")
        async with conn.transaction():
            await self._lock(conn)
            if await self._table_ready(conn):
                return
            await self._ensure_state_type(conn, state_type)
            await conn.execute(
                sql.SQL(
                    "CREATE TABLE IF NOT EXISTS {} (id integer PRIMARY KEY DEFAULT 1 CHECK (id = 1),"
                    " state {} NOT NULL, pid integer, backup_label text, tablespace_map text)"
                ).format(t, state_type)
            )
            await conn.execute(
                sql.SQL("ALTER TABLE {} ").format(t)
                + sql.SQL(", ").join(
                    sql.SQL("ADD COLUMN IF NOT EXISTS {} {}").format(sql.Identifier(name), sql.SQL(kind))
                    for name, kind in EXTRA_COLUMNS
                )
            )
            await conn.execute(
                sql.SQL("CREATE UNIQUE INDEX IF NOT EXISTS {} ON {} ((1))").format(
                    sql.Identifier(f"{self.table}_one_row"), t
                )
            )
            await self._install_triggers(conn)
            await conn.execute(sql.SQL("COMMENT ON TABLE {} IS {}").format(t, sql.Literal(SCHEMA_VERSION)))

    async def _lock(self, conn: psycopg.AsyncConnection) -> None:
        """Serialise, until the end of this transaction, everyone that creates or claims this table."""
        await conn.execute(
            "SELECT pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtext(%s))",
            [f"pg_safe_backup:{self.channel}"],
        )

    async def _ensure_state_type(self, conn: psycopg.AsyncConnection, state_type: sql.Composable) -> None:
        """Create the ``backup_state`` enum, or check that the seed scripts' one has every state."""
        name = f'"{self.schema}".backup_state'
        cur = await conn.execute(
            "SELECT t.oid IS NOT NULL, ARRAY(SELECT v FROM pg_catalog.unnest(%s::text[]) v WHERE v NOT IN"
            " (SELECT e.enumlabel::text FROM pg_catalog.pg_enum e WHERE e.enumtypid = t.oid))"
            " FROM (SELECT pg_catalog.to_regtype(%s)::oid AS oid) t",
            [[s.value for s in BackupState], name],
        )
        exists, missing = await cur.fetchone()
        if not exists:
            states = sql.SQL(", ").join(sql.Literal(s.value) for s in BackupState)
            await conn.execute(sql.SQL("CREATE TYPE {} AS ENUM ({})").format(state_type, states))
        elif missing:
            adds = " ".join(f"ALTER TYPE {name} ADD VALUE '{v}';" for v in missing)
            raise BackupError(
                f"the type {name} of {self.table_description} lacks the state(s) {', '.join(missing)}: a "
                "backup could run its whole copy and then fail to be marked complete. Nothing was started. "
                f"As the type's owner, run: {adds}"
            )

    async def _table_ready(self, conn: psycopg.AsyncConnection) -> bool:
        if self._ready:
            return True
        cur = await conn.execute(TABLE_CURRENT_SQL, [f'"{self.schema}"."{self.table}"', SCHEMA_VERSION])
        self._ready = (await cur.fetchone())[0]  # once current, it stays so: later reads skip this
        return self._ready

    async def _install_triggers(self, conn: psycopg.AsyncConnection) -> None:
        """The guard enforces :data:`TRANSITIONS` and the rules beside it in ``state.py``; the notifier
        wakes LISTENers on every change.

        Both run with the rights of whoever writes the table (a superuser's old script too), so they
        pin their search_path, name pg_catalog's functions, are not executable by PUBLIC, and are
        (re)created only when absent or owned by the table's owner: a function another role created
        under their name first would stay that role's, to rewrite at will.
        """
        guard, notify = (sql.Identifier(self.schema, name) for name in TRIGGER_FUNCTIONS)
        for name in TRIGGER_FUNCTIONS:
            await self._refuse_foreign_function(conn, name)
        allowed = sql.SQL(", ").join(
            sql.SQL("({}, {})").format(sql.Literal(a.value), sql.Literal(b.value))
            for a, b in sorted(TRANSITIONS)
        )
        frozen = [c for c in SEED_COLUMNS + tuple(n for n, _ in EXTRA_COLUMNS) if c not in WITHDRAW_COLUMNS]

        def row_of(rec: str, columns: Iterable[str]) -> sql.Composable:
            return sql.SQL("ROW({})").format(sql.SQL(", ").join(sql.Identifier(rec, c) for c in columns))

        pinned = sql.SQL("SET search_path = {}").format(sql.SQL(SEARCH_PATH))
        await conn.execute(
            sql.SQL(
                "CREATE OR REPLACE FUNCTION {guard}() RETURNS trigger LANGUAGE plpgsql {pinned}"
                " AS $body$ BEGIN"
                " IF TG_OP = 'UPDATE' THEN"
                "  IF NEW.state::pg_catalog.text IS DISTINCT FROM OLD.state::pg_catalog.text"
                "   AND (OLD.state::pg_catalog.text, NEW.state::pg_catalog.text)"
                " NOT IN (VALUES {allowed}) THEN"
                "   RAISE EXCEPTION 'backup state may not change from % to %', OLD.state, NEW.state"
                "   USING ERRCODE = 'check_violation';"
                "  END IF;"
                "  IF OLD.state::pg_catalog.text = 'complete' AND NEW.state::pg_catalog.text <> 'running'"
                "   AND {new_frozen} IS DISTINCT FROM {old_frozen} THEN"
                "   RAISE EXCEPTION 'a complete backup may not be changed (only a new backup may start on it,"
                " or its own finish withdraw it)' USING ERRCODE = 'check_violation',"
                "   DETAIL = 'backup_label, tablespace_map and the LSNs of a complete backup stay as "
                "pg_backup_stop returned them';"
                "  END IF;"
                "  IF NEW.pid IS DISTINCT FROM OLD.pid AND NEW.owner IS NOT DISTINCT FROM OLD.owner"
                "   AND NEW.attempt IS NOT DISTINCT FROM OLD.attempt THEN"
                "   {clear} NEW.started_at := pg_catalog.clock_timestamp();"
                "  END IF;"
                " END IF;"
                " NEW.updated_at := pg_catalog.clock_timestamp();"
                " RETURN NEW; END $body$"
            ).format(
                guard=guard,
                pinned=pinned,
                allowed=allowed,
                new_frozen=row_of("new", frozen),
                old_frozen=row_of("old", frozen),
                clear=sql.SQL(" ").join(
                    sql.SQL("{} := NULL;").format(sql.Identifier("new", c)) for c in HOLDER_COLUMNS
                ),
            )
        )
        await conn.execute(
            sql.SQL(
                "CREATE OR REPLACE FUNCTION {}() RETURNS trigger LANGUAGE plpgsql {} AS $body$ BEGIN"
                " PERFORM pg_catalog.pg_notify(pg_catalog.concat_ws('.', TG_TABLE_SCHEMA, TG_TABLE_NAME),"
                " NEW.state::pg_catalog.text);"
                " RETURN NULL; END $body$"
            ).format(notify, pinned)
        )
        for suffix, when, func in (("guard", "BEFORE", guard), ("notify", "AFTER", notify)):
            await conn.execute(sql.SQL("REVOKE ALL ON FUNCTION {}() FROM PUBLIC").format(func))
            name = sql.Identifier(f"{self.table}_{suffix}")
            await conn.execute(sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(name, self.qualified))
            await conn.execute(
                sql.SQL(
                    "CREATE TRIGGER {} {} INSERT OR UPDATE ON {} FOR EACH ROW EXECUTE FUNCTION {}()"
                ).format(name, sql.SQL(when), self.qualified, func)
            )

    async def _refuse_foreign_function(self, conn: psycopg.AsyncConnection, name: str) -> None:
        """Raise unless the trigger function ``name`` is absent or owned by the table's owner."""
        function = f'"{self.schema}"."{name}"()'
        cur = await conn.execute(FOREIGN_FUNCTION_SQL, [function, f'"{self.schema}"."{self.table}"'])
        found = await cur.fetchone()
        if found:
            owner, table_owner = found
            raise BackupError(
                f"refusing to use the function {function}: it is owned by role {owner}, not by role "
                f"{table_owner}, which owns {self.table_description}. It runs on every change of the table "
                "with the rights of whoever makes it, and its owner can rewrite it at any time. Nothing was "
                f"started. Check what it does, then as a superuser: DROP FUNCTION {function}; (it is created "
                f"anew), or ALTER FUNCTION {function} OWNER TO {table_owner};"
            )

    # -- reading -------------------------------------------------------------------------------

    async def read(self, conn: psycopg.AsyncConnection, for_update: bool = False) -> BackupRow | None:
        """The backup row, or None when there is none (or the table is not created/migrated yet)."""
        if not await self._table_ready(conn):
            return None
        query = sql.SQL("SELECT {} FROM {} b WHERE b.id = 1").format(_ROW_COLUMNS, self.qualified)
        if for_update:
            query += sql.SQL(" FOR UPDATE OF b")
        row = await (await conn.execute(query)).fetchone()
        if row is None:
            return None
        return BackupRow(BackupState(row[0]), *row[1:])

    async def listen(self, conn: psycopg.AsyncConnection) -> None:
        await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))

    @staticmethod
    async def wait_for_change(
        conn: psycopg.AsyncConnection, timeout: float, *also: psycopg.AsyncConnection
    ) -> None:
        """Sleep until a NOTIFY on a LISTENed channel of ``conn`` arrives, the server sends anything
        else on ``conn`` or on the ``also`` connections (an error, the end of a session), or
        ``timeout`` seconds pass.

        Truly asleep in between: psycopg's own ``notifies(timeout=...)`` wakes up every 0.1 s,
        which one triggerer holding hundreds of backups pays in CPU (see ``make bench``).
        """
        if await _drain_notifies(conn):  # came in with the last statement's results
            return
        loop = asyncio.get_running_loop()
        woken = loop.create_future()
        async with AsyncExitStack() as stack:
            for c in (conn, *also):
                await stack.enter_async_context(c.lock)  # nothing else may read these sockets meanwhile
                loop.add_reader(c.fileno(), lambda: woken.done() or woken.set_result(None))
                stack.callback(loop.remove_reader, c.fileno())
            try:
                await asyncio.wait_for(woken, max(timeout, 0.0))
            except asyncio.TimeoutError:
                return
        await _drain_notifies(conn)  # consume it; raises if the server ended the session

    # -- the holder's statements ---------------------------------------------------------------

    async def claim(
        self,
        conn: psycopg.AsyncConnection,
        owner: str,
        attempt: str,
        holder_try: int,
        label: str,
        terminate_live: bool,
    ) -> tuple[Claim, BackupRow | None]:
        """Decide (see :func:`decide_claim`) and, when starting, record this session as the holder.

        Holders of one table are serialised by an advisory lock, so a duplicate trigger sees the
        first one's claim and never starts a second backup for the same attempt.
        """
        async with conn.transaction():
            await self._lock(conn)
            row = await self.read(conn, for_update=True)
            decision = decide_claim(row, owner, attempt, terminate_live)
            if decision is Claim.LOST:
                await self._fail(
                    conn,
                    attempt,
                    f"the session holding backup mode (pid {row.pid}) ended before the backup"
                    " finished (triggerer restarted or connection lost); this backup is unusable and was not"
                    " restarted, because a copy may already have begun under it",
                )
            if decision is Claim.TERMINATE_AND_START:
                await conn.execute("SELECT pg_terminate_backend(%s)", [row.pid])
            if decision in (Claim.REPLACE_STALE, Claim.TERMINATE_AND_START):
                why = (
                    "its holder session is gone" if decision is Claim.REPLACE_STALE else "terminate_live=True"
                )
                await self._fail(conn, row.attempt, f"replaced by a backup of {owner} ({why})")
            if decision in (Claim.START, Claim.REPLACE_STALE, Claim.TERMINATE_AND_START):
                await conn.execute(
                    sql.SQL(
                        "INSERT INTO {t} AS b (id, state, pid, owner, attempt, holder_try, label, "
                        "holder_started_at,"
                        " started_at, start_lsn, stop_lsn, timeline, finished_at, backup_label,"
                        " tablespace_map, error, system_identifier, warnings)"
                        " SELECT 1, 'running', pg_backend_pid(), %s, %s, %s, %s, backend_start, now(),"
                        " NULL, NULL, NULL, NULL, NULL, NULL, NULL,"
                        " (SELECT system_identifier FROM pg_control_system()), NULL"
                        " FROM pg_stat_activity WHERE pid = pg_backend_pid()"
                        " ON CONFLICT (id) DO UPDATE SET state = EXCLUDED.state, pid = EXCLUDED.pid,"
                        " owner = EXCLUDED.owner, attempt = EXCLUDED.attempt, holder_try = "
                        "EXCLUDED.holder_try,"
                        " label = EXCLUDED.label,"
                        " holder_started_at = EXCLUDED.holder_started_at, started_at = EXCLUDED.started_at,"
                        " start_lsn = NULL, stop_lsn = NULL, timeline = NULL, finished_at = NULL,"
                        " backup_label = NULL, tablespace_map = NULL, error = NULL, warnings = NULL,"
                        " stop_timeline = NULL, timeline_history = NULL,"
                        " system_identifier = EXCLUDED.system_identifier"
                    ).format(t=self.qualified),
                    [owner, attempt, holder_try, label],
                )
            return decision, row

    async def start_backup(self, conn: psycopg.AsyncConnection, label: str, fast: bool) -> str:
        """Enter non-exclusive backup mode in this session; returns the start LSN."""
        if conn.info.server_version >= 150000:
            query = "SELECT pg_backup_start(%s, %s)::text"
        else:
            query = "SELECT pg_start_backup(%s, %s, false)::text"
        return (await (await conn.execute(query, [label, fast])).fetchone())[0]

    async def record_start(self, conn: psycopg.AsyncConnection, start_lsn: str) -> bool:
        """Open the gate: store the start LSN, if the row is still this holder's running backup."""
        cur = await conn.execute(
            sql.SQL(
                "UPDATE {} SET start_lsn = %s WHERE id = 1 AND pid = pg_backend_pid() AND state = 'running'"
            ).format(self.qualified),
            [start_lsn],
        )
        return cur.rowcount == 1

    async def stop_backup(
        self, conn: psycopg.AsyncConnection, wait_for_archive: bool
    ) -> tuple[str, str, str | None]:
        """Leave backup mode; returns (stop LSN, backup_label, tablespace_map or None)."""
        if conn.info.server_version >= 150000:
            query = "SELECT lsn::text, labelfile, spcmapfile FROM pg_backup_stop(%s)"
        else:
            query = "SELECT lsn::text, labelfile, spcmapfile FROM pg_stop_backup(false, %s)"
        lsn, labelfile, spcmap = await (await conn.execute(query, [wait_for_archive])).fetchone()
        return lsn, labelfile, (spcmap or None)

    async def replay_timeline(
        self, conn: psycopg.AsyncConnection, known_timeline: int
    ) -> tuple[int | None, str | None]:
        """The timeline a standby has replayed WAL up to (its minimum recovery point's, in pg_control), and
        that timeline's history file unless it is ``known_timeline``; (None, None) out of recovery.

        do_pg_backup_stop ends a standby's backup at its minimum recovery point, on minRecoveryPointTLI,
        and returns the point alone; both only move forward, so asked right after the stop this timeline
        holds the stop point in its history (:func:`~pg_safe_backup.files.manifest.timeline_at`).
        Reading the history needs ``GRANT EXECUTE ON FUNCTION pg_catalog.pg_read_file(text)`` (asked only
        when the standby changed timeline).

        :param known_timeline: the timeline whose history is not needed (the backup's start timeline).
        """
        cur = await conn.execute(
            "SELECT pg_catalog.pg_is_in_recovery(), min_recovery_end_timeline"
            " FROM pg_catalog.pg_control_recovery()"
        )
        in_recovery, timeline = await cur.fetchone()
        if not in_recovery or not timeline:
            return None, None
        if timeline == known_timeline or timeline == 1:
            return timeline, None
        cur = await conn.execute("SELECT pg_catalog.pg_read_file(%s)", [f"pg_wal/{timeline:08X}.history"])
        return timeline, (await cur.fetchone())[0]

    async def abort_backup(self, conn: psycopg.AsyncConnection) -> None:
        """End backup mode without waiting for WAL archiving; the result is discarded."""
        try:
            await self.stop_backup(conn, wait_for_archive=False)
        except (psycopg.errors.ObjectNotInPrerequisiteState, psycopg.errors.InsufficientPrivilege):
            pass  # not in backup mode (or never allowed to be): nothing to end

    async def archive_settings(self, conn: psycopg.AsyncConnection, backup_server: bool) -> ArchiveSettings:
        """How the server of ``conn`` archives WAL (``backup_server``: the one backed up, else the
        state's)."""
        row = await (await conn.execute(ARCHIVE_SETTINGS_SQL)).fetchone()
        param, conn_id = (
            ("postgres_conn_id", self.postgres_conn_id)
            if backup_server
            else ("state_conn_id", self.state_conn_id)
        )
        return archive_settings_of(row, conn_id, param, conn.info.user, conn.info.server_version)

    async def config_files(self, conn: psycopg.AsyncConnection) -> ServerConfig:
        """Where the server of ``conn`` keeps its configuration: data_directory, config_file, hba_file and
        ident_file (pg_settings shows them to superusers and pg_read_all_settings only), and the files it
        read settings from (pg_file_settings: the same roles)."""
        cur = await conn.execute(
            "SELECT name, setting FROM pg_catalog.pg_settings WHERE name = ANY(%s)", [list(SERVER_SETTINGS)]
        )
        found = dict(await cur.fetchall())
        role = sql.Identifier(conn.info.user or "backup_role").as_string(None)
        hidden = [name for name in SERVER_SETTINGS if not found.get(name)]
        fixes = [f"GRANT pg_read_all_settings TO {role};"] if hidden else []
        try:
            cur = await conn.execute(
                "SELECT DISTINCT sourcefile FROM pg_catalog.pg_file_settings WHERE sourcefile IS NOT NULL"
                " ORDER BY 1"
            )
            sources = tuple(row[0] for row in await cur.fetchall())
        except psycopg.errors.InsufficientPrivilege:
            # Superusers' alone by default, pg_read_all_settings or not.
            sources, hidden = (), [*hidden, "pg_file_settings"]
            fixes.append(
                f"GRANT SELECT ON pg_catalog.pg_file_settings TO {role};"
                f" GRANT EXECUTE ON FUNCTION pg_catalog.pg_show_all_file_settings() TO {role};"
            )
        unreadable = (
            f"role {role} may not read {', '.join(hidden)}; as a superuser run: {' '.join(fixes)}"
            if hidden
            else None
        )
        return ServerConfig(
            **{name: found.get(name) for name in SERVER_SETTINGS}, sources=sources, unreadable=unreadable
        )

    async def wal_timeline_and_segment_size(self, conn: psycopg.AsyncConnection) -> tuple[int, int]:
        """(timeline, wal_segment_size) of a primary: the timeline it writes and archives WAL on, as only
        pg_walfile_name shows it (pg_control_checkpoint's lags behind a promotion until a checkpoint)."""
        cur = await conn.execute(WAL_TIMELINE_SQL)
        name, size = await cur.fetchone()
        return int(name[:8], 16), size

    async def switch_wal(self, conn: psycopg.AsyncConnection) -> None:
        """Complete the primary's current WAL segment, so that it is archived (a no-op at a segment's
        start)."""
        await conn.execute(SWITCH_WAL_SQL)

    async def last_archived_wal(self, conn: psycopg.AsyncConnection) -> str | None:
        return (await (await conn.execute(LAST_ARCHIVED_SQL)).fetchone())[0]

    async def archiver_status(self, conn: psycopg.AsyncConnection) -> str:
        """What pg_stat_archiver says, for errors about pg_backup_stop waiting on the archive."""
        return ArchiverState(*await (await conn.execute(ARCHIVER_SQL)).fetchone()).describe()

    def explain(self, err: psycopg.Error, conn: psycopg.AsyncConnection) -> str:
        """The error, plus the GRANT that fixes it when it is a missing privilege."""
        text = " ".join(str(err).split())
        if not isinstance(err, psycopg.errors.InsufficientPrivilege):
            return text
        grantee = sql.Identifier(conn.info.user or "backup_role").as_string(None)
        table = f'"{self.schema}"."{self.table}"'
        if "pg_read_file" in text:
            fix = (
                f"GRANT EXECUTE ON FUNCTION pg_catalog.pg_read_file(text) TO {grantee}; (the timeline history"
                " of a standby that followed a promotion during the backup)"
            )
        elif "pg_switch_wal" in text:
            fix = (
                f"GRANT EXECUTE ON FUNCTION pg_catalog.pg_switch_wal() TO {grantee}; "
                "(a standby backup's last WAL segment)"
            )
        elif "function" in text:
            fix = f"GRANT EXECUTE ON FUNCTION {backup_functions(conn.info.server_version)} TO {grantee};"
        elif "terminate" in text or "signal" in text:
            fix = f"GRANT pg_signal_backend TO {grantee}; (needed for terminate_live=True)"
        elif "schema" in text:
            fix = (
                f'GRANT USAGE, CREATE ON SCHEMA "{self.schema}" TO {grantee}; (CREATE only to create the '
                "table on first use; or create it once as its owner and "
                f"GRANT SELECT, INSERT, UPDATE ON {table})"
            )
        else:
            fix = (
                f'GRANT USAGE ON SCHEMA "{self.schema}" TO {grantee}; '
                f"GRANT SELECT, INSERT, UPDATE ON {table} TO {grantee};"
            )
        return f"{text}. Missing privilege for role {grantee}; as a superuser run: {fix}"

    async def mark_complete(
        self,
        conn: psycopg.AsyncConnection,
        stop_lsn: str,
        backup_label: str,
        tablespace_map: str | None,
        timeline: int | None,
        warnings: str | None = None,
        stop_timeline: int | None = None,
        timeline_history: str | None = None,
    ) -> bool:
        """Record the label of the backup this session holds; False if it is no longer ours or done.

        :param timeline: the timeline it started on.
        :param warnings: what PostgreSQL warned about during the backup, kept in the row.
        :param stop_timeline: the timeline it stopped on.
        :param timeline_history: the history file of ``stop_timeline`` when it is not ``timeline``.
        """
        cur = await conn.execute(
            sql.SQL(
                "UPDATE {} SET state = 'complete', stop_lsn = %s, backup_label = %s, tablespace_map = %s,"
                " timeline = %s, warnings = %s, stop_timeline = %s, timeline_history = %s,"
                " finished_at = now()"
                " WHERE id = 1 AND pid = pg_backend_pid() AND state = 'done'"
            ).format(self.qualified),
            [stop_lsn, backup_label, tablespace_map, timeline, warnings, stop_timeline, timeline_history],
        )
        return cur.rowcount == 1

    # -- what the finish (and anyone else) may ask -----------------------------------------------

    async def request_done(
        self, conn: psycopg.AsyncConnection, attempt: str, start_lsn: str
    ) -> BackupRow | None:
        """Ask the holder of ``attempt``'s running backup to stop it, if it still has the start LSN the
        copy began under; returns the row as it is after."""
        await conn.execute(
            sql.SQL(
                "UPDATE {} SET state = 'done' WHERE id = 1 AND attempt = %s AND state = 'running'"
                " AND start_lsn = %s::pg_lsn"
            ).format(self.qualified),
            [attempt, start_lsn],
        )
        return await self.read(conn)

    async def mark_failed(
        self, conn: psycopg.AsyncConnection, attempt: str | None, reason: str, withdraw: bool = False
    ) -> bool:
        """Fail ``attempt``'s live backup with ``reason``; its holder then ends backup mode.

        :param withdraw: also fail it when already ``complete`` (only the finish of that same attempt,
            which knows its copy did not succeed, may withdraw the label this way).
        """
        async with conn.transaction():
            return await self._fail(conn, attempt, reason, withdraw)

    async def _fail(
        self, conn: psycopg.AsyncConnection, attempt: str | None, reason: str, withdraw: bool = False
    ) -> bool:
        states = ["running", "done", "complete"] if withdraw else ["running", "done"]
        cur = await conn.execute(
            sql.SQL(
                "UPDATE {} SET state = 'failed', error = %s, finished_at = now()"
                " WHERE id = 1 AND attempt IS NOT DISTINCT FROM %s AND state::text = ANY(%s)"
            ).format(self.qualified),
            [reason[:2000], attempt, states],
        )
        return cur.rowcount == 1
