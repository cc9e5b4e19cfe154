"""The pre-flight check: is a server ready to be backed up, and does its WAL reach the archive?

``pg-safe-backup check`` and ``PostgresCheckBackupOperator`` run :func:`run_check`, which returns one
:class:`Finding` per thing checked: the server's major, the role's privileges on every function a backup
calls, ``wal_level``, WAL archiving, data checksums, ``summarize_wal`` (incremental backups), the state
table (schema, privileges, owner), the data directory the copy reads, free space at the destination, and
last, as pgBackRest's ``check`` does, a forced WAL switch and a bounded wait for that segment to appear in
the archive. Each finding is one line with its fix.

A finding that could not be checked is :attr:`Level.UNCHECKED`, never a pass: the outcome is then an error
to retry (:class:`PreflightNotRun`), not a verdict. Airflow-free: the CLI runs it on a database host with
only this package; all its SQL is in :mod:`pg_safe_backup.hooks.server`. Nothing secret is printed: the
connection string never, an archive URL's password and a command's ``*KEY=``/``*SECRET=``-style values
masked.
"""

from __future__ import annotations

import enum
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import psycopg
from psycopg import sql

from pg_safe_backup.errors import PermanentError, PgSafeBackupError, TransientError
from pg_safe_backup.files.pgcontrol import read_pg_control
from pg_safe_backup.files.walarchive import IDENTITY_FILE, ArchiveIdentity, parse_stored_name
from pg_safe_backup.files.xlog import archived_through, wal_segment_name
from pg_safe_backup.hooks import server
from pg_safe_backup.state import ArchiveSettings

T = TypeVar("T")

#: The majors this release backs up.
SUPPORTED_MAJORS = range(12, 19)
#: Seconds between two looks for the switched segment.
POLL_S = 0.25
#: Functions of pg_catalog a backup calls besides the start/stop pair, with what for; executable by PUBLIC
#: by default except pg_switch_wal, so a missing one is a hardened server's revoke.
BACKUP_PATH_FUNCTIONS = (
    (
        "pg_switch_wal()",
        "completes the last WAL segment of a standby's backup, on its primary, and of this check",
    ),
    ("pg_current_wal_lsn()", "the primary's WAL position"),
    ("pg_walfile_name(pg_lsn)", "the timeline WAL is archived on"),
    ("pg_is_in_recovery()", "tells a standby"),
    ("pg_last_wal_replay_lsn()", "a standby's WAL position"),
    ("pg_control_system()", "the system identifier recorded with each backup"),
    ("pg_control_recovery()", "the timeline a standby's backup stops on"),
    ("pg_backend_pid()", "the holder's session"),
    ("pg_advisory_xact_lock(bigint)", "serialises the backups of one state table"),
    ("pg_notify(text, text)", "wakes the tasks waiting on the state table"),
)
#: Only a standby's backup that follows a promotion reads the new timeline's history with it.
STANDBY_FUNCTION = ("pg_read_file(text)", "a standby backup's timeline history after a promotion")
#: ``NAME=value`` in a command whose NAME says it holds a secret.
_SECRET_ASSIGNMENT = re.compile(
    r"(?i)\b([A-Z0-9_]*(?:SECRET|PASSWORD|PASSWD|TOKEN|KEY|CREDENTIAL)[A-Z0-9_]*=)(\S+)"
)
#: ``scheme://user:password@`` in a URL.
_URL_PASSWORD = re.compile(r"(://[^/:@\s]*:)[^@/\s]+@")


class Level(str, enum.Enum):
    """How a finding came out; only OK and WARNING pass."""

    OK = "ok"
    WARNING = "warning"
    PROBLEM = "PROBLEM"
    UNCHECKED = "NOT CHECKED"


@dataclass(frozen=True)
class Finding:
    """One thing checked.

    :param check: what was checked, e.g. ``wal_level``.
    :param level: how it came out.
    :param message: what was found, one line.
    :param fix: what to do about it (None when nothing is to be done).
    """

    check: str
    level: Level
    message: str
    fix: str | None = None

    def line(self) -> str:
        """The finding in one line, its fix after it."""
        fix = f" -- fix: {self.fix}" if self.fix and self.level is not Level.OK else ""
        return " ".join(f"{self.level.value}: {self.check}: {self.message}{fix}".split())


class PreflightFailed(PermanentError, RuntimeError):
    """The check found problems (each named in the message): running it again gives the same answer."""


class PreflightNotRun(TransientError, RuntimeError):
    """The check could not look at something (a server or an archive out of reach): no verdict."""


@dataclass(frozen=True)
class CheckRequest:
    """What to check besides the server itself.

    :param archive: the WAL archive: a local folder or an fsspec URL (``s3://bucket/prefix``), listed with
        the store's own credentials; None: pg_stat_archiver's word that the segment was archived.
    :param pgdata: the data directory as the copy reads it; checked to be this server's.
    :param destination: a local folder the backups go to; its free space is checked against the databases.
    :param table: the backup state table.
    :param schema: its schema.
    :param incremental: incremental backups are wanted (PostgreSQL 17+, summarize_wal = on).
    :param require_checksums: data checksums off is a problem, not a warning.
    :param timeout: seconds to wait for the switched WAL segment in the archive.
    """

    archive: str | None = None
    pgdata: Path | None = None
    destination: str | None = None
    table: str = "backup"
    schema: str = "public"
    incremental: bool = False
    require_checksums: bool = False
    timeout: float = 60.0


@dataclass(frozen=True)
class Preflight:
    """The findings of one check of ``server``."""

    server: str
    findings: tuple[Finding, ...]

    @property
    def problems(self) -> list[Finding]:
        return [f for f in self.findings if f.level is Level.PROBLEM]

    @property
    def unchecked(self) -> list[Finding]:
        return [f for f in self.findings if f.level is Level.UNCHECKED]

    @property
    def ok(self) -> bool:
        """Nothing failed and everything was checked."""
        return not self.problems and not self.unchecked

    def summary(self) -> str:
        """One line: the verdict and the counts."""
        counts = {level: sum(f.level is level for f in self.findings) for level in Level}
        verdict = "ready" if self.ok else "NOT READY" if self.problems else "NOT CHECKED"
        return (
            f"check of {self.server}: {verdict} ({counts[Level.PROBLEM]} problems, {counts[Level.UNCHECKED]}"
            f" not checked, {counts[Level.WARNING]} warnings, {counts[Level.OK]} ok)"
        )

    def error(self) -> PgSafeBackupError | None:
        """The error this outcome is, or None when it passed: problems are a verdict (never retried), a
        check that could not run is not (retried)."""
        failing = self.problems or self.unchecked
        if not failing:
            return None
        kind = PreflightFailed if self.problems else PreflightNotRun
        return kind(f"{self.summary()}: " + "; ".join(f.line() for f in failing))

    def as_dict(self) -> dict[str, Any]:
        """What the operator returns (its XCom): ``ok``, ``server`` and every finding."""
        findings = [{**asdict(f), "level": f.level.value} for f in self.findings]
        return {"ok": self.ok, "server": self.server, "findings": findings}


def redact(text: str) -> str:
    """``text`` with a URL's password and ``*KEY=``/``*SECRET=``/``*PASSWORD=``/``*TOKEN=`` values masked."""
    return _SECRET_ASSIGNMENT.sub(r"\1***", _URL_PASSWORD.sub(r"\1***@", text))


def _quoted(name: str) -> str:
    return sql.Identifier(name).as_string(None)


def describe_server(conn: psycopg.Connection) -> str:
    """``user@host:port/dbname`` of a session (never its password or other options)."""
    info = conn.info
    return f"{info.user}@{info.host}:{info.port}/{info.dbname}"


# ------------------------------------------------------------------------------------ the server itself
def check_version(facts: server.ServerFacts) -> Finding:
    major, minor = divmod(facts.server_version, 10000)
    if major in SUPPORTED_MAJORS:
        return Finding("server version", Level.OK, f"PostgreSQL {major}.{minor}")
    return Finding(
        "server version",
        Level.PROBLEM,
        f"PostgreSQL {major}.{minor} is not supported (majors {SUPPORTED_MAJORS[0]}-{SUPPORTED_MAJORS[-1]})",
        "back up with a release of pg-safe-backup that supports it, or upgrade the server",
    )


def check_privileges(conn: psycopg.Connection, facts: server.ServerFacts) -> list[Finding]:
    """EXECUTE on each function a backup calls (pg_catalog's, by signature)."""
    start, stop = server.backup_function_signatures(facts.server_version)
    wanted = [(start, "enters backup mode"), (stop, "leaves it"), *BACKUP_PATH_FUNCTIONS]
    optional = [STANDBY_FUNCTION] if facts.in_recovery else []
    why = dict(wanted + optional)
    rows = server.function_privileges(conn, [f"pg_catalog.{f}" for f in why])
    denied = {f.removeprefix("pg_catalog."): exists for f, exists, allowed in rows if not allowed}
    role = _quoted(facts.role)
    findings = []
    for kind, level in ((wanted, Level.PROBLEM), (optional, Level.WARNING)):
        missing = [f for f, _ in kind if f in denied]
        if not missing:
            continue
        absent = [f for f in missing if not denied[f]]
        if absent:
            findings.append(
                Finding("privileges", Level.PROBLEM, f"the server has no function {', '.join(absent)}")
            )
        grant = [f for f in missing if denied[f]]
        if grant:
            findings.append(
                Finding(
                    "privileges",
                    level,
                    f"role {role} may not execute " + ", ".join(f"pg_catalog.{f} ({why[f]})" for f in grant),
                    "as a superuser run: GRANT EXECUTE ON FUNCTION "
                    + ", ".join(f"pg_catalog.{f}" for f in grant)
                    + f" TO {role};",
                )
            )
    if not findings:
        findings.append(
            Finding(
                "privileges",
                Level.OK,
                f"role {role} may execute every function a backup calls ({start.split('(')[0]},"
                f" {stop.split('(')[0]}, pg_switch_wal, ...)",
            )
        )
    return findings


def check_wal_level(facts: server.ServerFacts) -> Finding:
    if facts.wal_level in ("replica", "logical"):
        return Finding("wal_level", Level.OK, f"wal_level = {facts.wal_level}")
    return Finding(
        "wal_level",
        Level.PROBLEM,
        f"wal_level = {facts.wal_level}: an online backup needs replica or logical",
        "set wal_level = replica in postgresql.conf and restart the server",
    )


def check_archiving(settings: ArchiveSettings) -> Finding:
    """archive_mode and archive_command / archive_library, as :meth:`ArchiveSettings.not_archiving` reads
    them (the backup's own rule)."""
    why_not = settings.not_archiving()
    how = (
        f"archive_library = {settings.archive_library}"
        if settings.archive_library
        else f"archive_command = {redact(settings.archive_command)!r}"
    )
    if settings.in_recovery:
        if why_not is None:
            return Finding(
                "archiving", Level.OK, f"a standby archiving itself (archive_mode = always, {how})"
            )
        return Finding(
            "archiving",
            Level.WARNING,
            f"a standby with archive_mode = {settings.archive_mode}: its backups' WAL is archived by its"
            " primary",
            "run this check against the primary too",
        )
    if why_not is None:
        return Finding("archiving", Level.OK, f"archive_mode = {settings.archive_mode}, {how}")
    return Finding(
        "archiving",
        Level.PROBLEM,
        f"{why_not}: a backup restores only as far as its WAL is archived",
        "set archive_mode = on (restart) and archive_command = 'pg-safe-backup wal-push --archive ARCHIVE %p'"
        " (archive_library empty)",
    )


def check_checksums(facts: server.ServerFacts, required: bool) -> Finding:
    if facts.data_checksums:
        return Finding("data checksums", Level.OK, "data checksums are on")
    return Finding(
        "data checksums",
        Level.PROBLEM if required else Level.WARNING,
        "data checksums are off: a torn or corrupted page is copied into the backup unnoticed",
        "stop the server and run pg_checksums --enable -D PGDATA (initdb --data-checksums for a new cluster)",
    )


def check_summarize_wal(facts: server.ServerFacts) -> Finding:
    major = facts.server_version // 10000
    if major < 17:
        return Finding(
            "summarize_wal",
            Level.PROBLEM,
            f"incremental backups need PostgreSQL 17 or later (WAL summaries); the server runs {major}",
            "take full backups, or upgrade the server",
        )
    if facts.summarize_wal == "on":
        return Finding("summarize_wal", Level.OK, "summarize_wal = on (incremental backups possible)")
    return Finding(
        "summarize_wal",
        Level.PROBLEM,
        f"summarize_wal = {facts.summarize_wal}: an incremental backup needs the WAL summaries since its"
        " parent",
        "as a superuser run: ALTER SYSTEM SET summarize_wal = on; SELECT pg_reload_conf(); then take a full"
        " backup as the first parent",
    )


# ------------------------------------------------------------------------------------------ state table
def check_state_table(conn: psycopg.Connection, role: str, schema: str, table: str) -> list[Finding]:
    """The state table as the backup uses it (hooks/backup.py ensure_table): created on first use when the
    role may create in the schema; else read and written by the role, current, its trigger functions owned
    by its owner, and that owner no one who could turn those triggers against the role."""
    t = server.state_table(conn, schema, table)
    name = sql.Identifier(schema, table).as_string(None)
    role_q, schema_q = _quoted(role), _quoted(schema)
    what = "state table"
    if not t.schema_exists:
        return [
            Finding(
                what,
                Level.PROBLEM,
                f"schema {schema_q} of the state table {name} does not exist",
                f"as a superuser run: CREATE SCHEMA {schema_q}; GRANT USAGE, CREATE ON SCHEMA {schema_q} TO"
                f" {role_q}; (or name another schema)",
            )
        ]
    if not t.schema_usage:
        return [
            Finding(
                what,
                Level.PROBLEM,
                f"role {role_q} may not use schema {schema_q} of the state table {name}",
                f"as a superuser run: GRANT USAGE ON SCHEMA {schema_q} TO {role_q};",
            )
        ]
    if not t.exists:
        if t.schema_create:
            return [
                Finding(what, Level.OK, f"{name} does not exist yet; role {role_q} creates it on first use")
            ]
        return [
            Finding(
                what,
                Level.PROBLEM,
                f"{name} does not exist, and role {role_q} may not create it in schema {schema_q}",
                f"as a superuser run: GRANT CREATE ON SCHEMA {schema_q} TO {role_q}; (or create it once by"
                f" running a backup as its owner, then GRANT SELECT, INSERT, UPDATE ON {name} TO {role_q};)",
            )
        ]
    owner_q = _quoted(t.owner or "")
    findings = []
    missing = [p for p, has in (("SELECT", t.select), ("INSERT", t.insert), ("UPDATE", t.update)) if not has]
    if missing:
        findings.append(
            Finding(
                what,
                Level.PROBLEM,
                f"role {role_q} lacks {', '.join(missing)} on {name}",
                f"as its owner {owner_q} run: GRANT SELECT, INSERT, UPDATE ON {name} TO {role_q};",
            )
        )
    for function, function_owner in t.foreign_functions:
        findings.append(
            Finding(
                what,
                Level.PROBLEM,
                f"trigger function {function} is owned by role {_quoted(function_owner)}, not by {owner_q}"
                f" who owns {name}: backups refuse it (it runs with the rights of whoever writes the table)",
                f"check what it does, then as a superuser: ALTER FUNCTION {function} OWNER TO {owner_q}; or"
                f" DROP FUNCTION {function}; (a backup creates it anew)",
            )
        )
    # A superuser is a member of every role (pg_has_role): only the owner's name tells another owner apart.
    if t.owner != role and not t.owner_superuser and conn.info.parameter_status("is_superuser") == "on":
        findings.append(
            Finding(
                what,
                Level.PROBLEM,
                f"{name} is owned by role {owner_q}, who can rewrite its triggers, which run with the rights"
                f" of the superuser {role_q} writing it",
                f"as a superuser run: ALTER TABLE {name} OWNER TO {role_q}; (or back up as a role that is not"
                " a superuser)",
            )
        )
    if not t.current and not t.owned:
        findings.append(
            Finding(
                what,
                Level.PROBLEM,
                f"{name} is not at the schema this release uses, and role {role_q} cannot migrate it: it is"
                f" owned by {owner_q}",
                f"run one backup as {owner_q} (it migrates the table), or as a superuser: ALTER TABLE {name}"
                f" OWNER TO {role_q};",
            )
        )
    if not findings:
        state = "current" if t.current else "migrated by the next backup"
        findings.append(
            Finding(what, Level.OK, f"{name}: owned by {owner_q}, read and written by {role_q}, {state}")
        )
    return findings


# ---------------------------------------------------------------------------------- files on this host
def check_pgdata(pgdata: Path, facts: server.ServerFacts) -> Finding:
    """The folder the copy reads is this server's data directory (its pg_control's system identifier)."""
    try:
        control = read_pg_control(Path(pgdata))
    except (OSError, PgSafeBackupError) as err:
        return Finding(
            "data directory",
            Level.PROBLEM,
            f"pgdata {str(pgdata)!r}: cannot read its global/pg_control ({' '.join(str(err).split())})",
            "give the server's data directory, readable by the user the copy runs as",
        )
    if control.system_identifier != facts.system_identifier:
        return Finding(
            "data directory",
            Level.PROBLEM,
            f"pgdata {str(pgdata)!r} belongs to system {control.system_identifier}, the server is system"
            f" {facts.system_identifier}",
            f"give this server's data directory ({facts.data_directory or 'SHOW data_directory'})",
        )
    return Finding("data directory", Level.OK, f"{pgdata} is this server's data directory")


def _is_url(location: str) -> bool:
    return "://" in location and not location.startswith("file://")


def _local(location: str) -> Path:
    return Path(location.removeprefix("file://"))


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def check_free_space(destination: str, facts: server.ServerFacts) -> Finding:
    """Room for a full copy of the databases at ``destination`` (its nearest existing folder)."""
    if _is_url(destination):
        return Finding(
            "free space",
            Level.WARNING,
            f"destination {redact(destination)}: an object store's space is not measured",
        )
    folder = _local(destination).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError as err:
        return Finding("free space", Level.UNCHECKED, f"destination {destination}: {err}")
    need = facts.databases_bytes
    unmeasured = (
        f" (not counting {', '.join(facts.databases_unmeasured)}: no CONNECT privilege)"
        if facts.databases_unmeasured
        else ""
    )
    where = f"destination {destination}" + (f" (on {folder})" if str(folder) != destination else "")
    if free < need:
        return Finding(
            "free space",
            Level.PROBLEM,
            f"{where} has {_size(free)} free, the databases take {_size(need)}{unmeasured}",
            "free space there or choose another destination",
        )
    return Finding(
        "free space", Level.OK, f"{where} has {_size(free)} free for databases of {_size(need)}{unmeasured}"
    )


# -------------------------------------------------------------------------------------------- archive
class _Archive:
    """A WAL archive to look into: a local folder, or an fsspec URL with the store's own credentials.

    :raises PreflightFailed: a local archive that is not a folder.
    :raises PreflightNotRun: the store cannot be opened or listed (no verdict).
    """

    def __init__(self, location: str) -> None:
        self.shown = redact(location)
        self.fs: Any = None
        self.root = str(_local(location))
        if _is_url(location):

            def open_store() -> tuple[Any, str]:
                from fsspec.core import url_to_fs

                return url_to_fs(location)

            self.fs, self.root = self._asking("open it", open_store)
        elif not Path(self.root).is_dir():
            raise PreflightFailed(f"archive {self.shown} is not a folder")

    def _asking(self, what: str, call: Callable[[], T]) -> T:
        """``call()``, its failure a :class:`PreflightNotRun` naming ``what`` could not be done."""
        try:
            return call()
        except PgSafeBackupError:
            raise
        except Exception as err:  # the store's own: OSErrors, botocore's (not OSErrors), a missing s3fs
            why = redact(" ".join(str(err).split()))
            raise PreflightNotRun(
                f"archive {self.shown}: cannot {what} ({type(err).__name__}: {why})"
            ) from err

    def holds(self, segment: str) -> str | None:
        """The stored name of ``segment`` (compressed, encrypted or not), or None; listed afresh."""

        def names() -> list[str]:
            if self.fs is None:
                return [e.name for e in os.scandir(self.root) if e.name.startswith(segment)]
            self.fs.invalidate_cache(self.root)  # a listing cached by the last look would hide it
            return [p.rsplit("/", 1)[-1] for p in self.fs.glob(f"{self.root.rstrip('/')}/{segment}*")]

        for name in self._asking("list it", names):
            stored = parse_stored_name(name)
            if stored is not None and stored.name == segment:
                return name
        return None

    def identity(self) -> ArchiveIdentity | None:
        """Its identity file, when it has one.

        :raises ArchiveFormatError: one this release cannot read.
        """
        path = f"{self.root.rstrip('/')}/{IDENTITY_FILE}"

        def read() -> bytes | None:
            if self.fs is None:
                return Path(path).read_bytes() if Path(path).exists() else None
            return self.fs.cat_file(path) if self.fs.exists(path) else None

        data = self._asking(f"read {IDENTITY_FILE}", read)
        return (
            None
            if data is None
            else ArchiveIdentity.from_bytes(data, f"{self.shown.rstrip('/')}/{IDENTITY_FILE}")
        )


def check_archive_identity(archive: _Archive, facts: server.ServerFacts) -> Finding | None:
    """The archive, when ``wal-push`` manages it, is this cluster's."""
    identity = archive.identity()
    if identity is None or identity.system_identifier == facts.system_identifier:
        return None
    return Finding(
        "archive",
        Level.PROBLEM,
        f"archive {archive.shown} holds the WAL of system {identity.system_identifier}, the server is system"
        f" {facts.system_identifier}",
        "give this cluster's own archive (one archive per cluster)",
    )


def check_wal_reaches_archive(
    conn: psycopg.Connection,
    settings: ArchiveSettings,
    archive: _Archive | None,
    timeout: float,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Finding:
    """Switch WAL on the primary and wait up to ``timeout`` seconds for the completed segment in
    ``archive`` (or, without one, for pg_stat_archiver to report it archived)."""
    what = "WAL archived"
    if not settings.can_switch_wal:
        return Finding(
            what,
            Level.UNCHECKED,
            f"role {settings.role} may not run pg_catalog.pg_switch_wal() to complete a segment",
            f"as a superuser run: GRANT EXECUTE ON FUNCTION pg_catalog.pg_switch_wal() TO {settings.role};",
        )
    timeline, segment_size = server.wal_timeline_and_segment_size(conn)
    began = clock()
    segment = wal_segment_name(server.switch_wal(conn), timeline, segment_size)
    where = f"archive {archive.shown}" if archive else "pg_stat_archiver"
    while True:
        stored = archive.holds(segment) if archive else None
        if archive is None and archived_through(server.archiver_state(conn).last_archived_wal, segment):
            stored = segment
        if stored:
            how = "" if archive else " (pass the archive to see it there, not only the server's word)"
            return Finding(
                what,
                Level.OK,
                f"segment {segment} reached {where} as {stored} in {clock() - began:.1f} s{how}",
            )
        if clock() - began > timeout:
            break
        sleep(POLL_S)
    return Finding(
        what,
        Level.PROBLEM,
        f"segment {segment} did not reach {where} within {timeout:g} s of pg_switch_wal();"
        f" archive_command = {redact(settings.archive_command)!r};"
        f" {redact(server.archiver_state(conn).describe())}",
        "run archive_command by hand as the server's OS user on a file of pg_wal, and read the server log",
    )


# --------------------------------------------------------------------------------------- the check
def run_check(
    dsn: str,
    request: CheckRequest,
    *,
    server_param: str = "--dsn",
    server_name: str | None = None,
    state_dsn: str | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Preflight:
    """Check the server at ``dsn`` for backups as ``request`` describes them.

    :param dsn: libpq connection string of the server to back up, as the backup role.
    :param request: what else to check.
    :param server_param: the parameter or flag naming the server in messages.
    :param server_name: how messages name it (default: ``user@host:port/dbname``).
    :param state_dsn: the server holding the state table when it is another (a standby's primary).
    :param clock: seconds, for the wait (a test may fake it).
    :param sleep: waits between looks into the archive.
    :raises server.ServerUnreachable: the server cannot be reached (no verdict).
    """
    with server.connect(dsn, timeout=min(30, max(1, request.timeout))) as conn:
        name = server_name or describe_server(conn)
        try:
            return Preflight(
                name, tuple(_findings(conn, name, server_param, request, state_dsn, clock, sleep))
            )
        except psycopg.Error as err:  # the session broke, or a statement was refused: no verdict
            raise PreflightNotRun(f"{server_param} {name}: {' '.join(str(err).split())}") from err


def _findings(
    conn: psycopg.Connection,
    name: str,
    server_param: str,
    request: CheckRequest,
    state_dsn: str | None,
    clock: Callable[[], float],
    sleep: Callable[[float], None],
) -> list[Finding]:
    findings: list[Finding] = []
    facts = server.server_facts(conn)
    settings = server.archive_settings(conn, name, server_param)
    findings.append(check_version(facts))
    findings += check_privileges(conn, facts)
    findings.append(check_wal_level(facts))
    findings.append(check_archiving(settings))
    findings.append(check_checksums(facts, request.require_checksums))
    if request.incremental:
        findings.append(check_summarize_wal(facts))
    if state_dsn is None:
        findings += check_state_table(conn, facts.role, request.schema, request.table)
    else:
        findings += _state_table_elsewhere(state_dsn, request)
    if request.pgdata is not None:
        findings.append(check_pgdata(request.pgdata, facts))
    if request.destination:
        findings.append(check_free_space(request.destination, facts))
    findings += _archive_findings(conn, facts, settings, request, clock, sleep)
    return findings


def _state_table_elsewhere(state_dsn: str, request: CheckRequest) -> list[Finding]:
    try:
        with server.connect(state_dsn, timeout=min(30, max(1, request.timeout))) as conn:
            return check_state_table(conn, conn.info.user or "", request.schema, request.table)
    except server.ServerUnreachable as err:
        return [Finding("state table", Level.UNCHECKED, f"the state table's server: {err}")]


def _archive_findings(
    conn: psycopg.Connection,
    facts: server.ServerFacts,
    settings: ArchiveSettings,
    request: CheckRequest,
    clock: Callable[[], float],
    sleep: Callable[[float], None],
) -> list[Finding]:
    """The archive's identity, then the WAL switch and the wait (on a primary that archives)."""
    findings: list[Finding] = []
    archive = None
    if request.archive:
        try:
            archive = _Archive(request.archive)
            identity = check_archive_identity(archive, facts)
        except PreflightNotRun as err:
            return [Finding("archive", Level.UNCHECKED, str(err))]
        except PermanentError as err:  # not a folder; an identity file this release cannot read
            return [
                Finding("archive", Level.PROBLEM, str(err), "give this cluster's WAL archive, folder or URL")
            ]
        if identity:
            findings.append(identity)
    if facts.in_recovery or settings.not_archiving() is not None:
        return findings  # a standby switches no WAL; a server that does not archive is a problem above
    try:
        findings.append(check_wal_reaches_archive(conn, settings, archive, request.timeout, clock, sleep))
    except PreflightNotRun as err:
        findings.append(Finding("WAL archived", Level.UNCHECKED, str(err)))
    return findings


__all__ = [
    "CheckRequest",
    "Finding",
    "Level",
    "Preflight",
    "PreflightFailed",
    "PreflightNotRun",
    "redact",
    "run_check",
]
