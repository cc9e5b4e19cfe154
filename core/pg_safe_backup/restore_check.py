"""The restore check: recover a backup copy on a temporary server, then check it.

``verify_backup(BACKUP_DIR, WAL_ARCHIVE)`` never touches the backup, the WAL archive (read only,
through ``restore_command``) or the backed-up tablespace locations:

Steps 1-3 are :func:`pg_safe_backup.restore.prepare_restore`'s, the same as ``pg-safe-backup restore``,
into a sandbox:

1. The backup is copied into a fresh work dir (owned by the server's OS user, mode 0700).
   ``pg_wal`` is not copied (an empty ``pg_wal/archive_status`` is created), nor are
   ``postmaster.pid``/``postmaster.opts``, ``standby.signal``, ``recovery.conf``, ``backup_manifest``,
   ``backup_info.json`` or the ``pg_tblspc`` links. A tar backup's archives are extracted.
2. Tablespaces. For each ``OID PATH`` line of the backup's ``tablespace_map`` the tablespace's
   backup (what was in PATH, i.e. the ``PG_<major>_<catversion>`` folder) is looked up, first found
   wins, in:

   * ``tablespace_dirs[OID]`` (argument),
   * ``<BACKUP_DIR>_tablespaces/<OID>/``  (the layout the provider's example DAG writes),
   * ``<BACKUP_DIR>.tablespaces/<OID>/``,
   * ``<BACKUP_DIR>/pg_tblspc/<OID>/`` when it is a real folder (not a link).

   It is copied into the work dir (``tablespaces/<OID>``, never its original location) and
   ``tablespace_map`` is rewritten to point at the copy, so
   PostgreSQL recreates the ``pg_tblspc`` links to the copies. A tablespace without a backup, or a
   ``pg_tblspc`` link the map does not list, is a FAIL: the original location is never used.
3. ``recovery.signal`` is written and settings are appended to ``postgresql.auto.conf`` (read
   last): ``restore_command`` reading the archive (``pg-safe-backup wal-fetch`` from one ``wal-push``
   manages, an encrypted one's key in a file of the work dir that goes with it; else ``cp``),
   ``recovery_target = 'immediate'`` (or the
   end of the archive), ``recovery_target_action = 'promote'``, a unix socket in the work dir only
   (no TCP), its own ``pg_hba.conf``, ``archive_mode = off``, no preload libraries, no SSL, no
   synchronous standbys, log to stderr (the work dir). ``data_directory`` is pinned in
   ``postgresql.conf``.
4. A temporary server starts (``LocalCluster``), and once recovery has ended (``pg_is_in_recovery()``
   false) the checks run: the server log (recovery started at the label's redo point, reached a
   consistent state, no PANIC / ``could not``), no page of the copy newer than that consistent
   point (its highest page LSN, read before the server starts), ``bt_index_check(heapallindexed)``
   on every valid btree index of every connectable database (and ``verify_heapam`` on tables where
   available), and an optional application invariant: a query returning rows ``(ok boolean, detail
   text)``.

``WAL_ARCHIVE`` None: a self-contained backup (its WAL copied into its ``pg_wal/`` by
:func:`pg_safe_backup.files.wal.include_wal`) recovers from that WAL alone, as one pg_basebackup
``-X fetch`` made: no ``recovery.signal``, no ``restore_command``, crash recovery from backup_label.

A backup without ``backup_label`` is refused (``require_backup_label=False`` checks it anyway, e.g.
a cold copy of a stopped server). The result is a ``VerifyResult``; a server that does not start or
recover is a FAIL with the end of its log, never an exception.

A check that could not run is not a verdict: a WAL archive that is missing, closed to the server's OS
user or another cluster's (its oldest segment's system identifier against the backup's), or no usable
server binaries (the backup's major's ``postgres`` and ``pg_ctl``: :func:`server_bindir`) raises
:class:`CheckNotRun` before any check.

It is the last and slowest check of :func:`pg_safe_backup.verify.check_backup` (the check pipeline),
which ``pg-safe-backup verify``, the verify task and the drill run. The SQL it runs is against this
temporary server only (the backed-up cluster's SQL is in ``hooks/``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql as pgsql

from pg_safe_backup.encryption import KEY_FLAGS, backup_key_id
from pg_safe_backup.errors import TransientError
from pg_safe_backup.files.crypt import EncryptionKey
from pg_safe_backup.files.pgcontrol import (
    CopyMismatch,
    PageLSN,
    check_copy,
    format_lsn,
    newest_page,
    parse_lsn,
)
from pg_safe_backup.local_cluster import (
    SERVER_USER,
    LocalCluster,
    as_server_user,
    find_bindir,
    free_port,
    give_to_server_user,
)
from pg_safe_backup.pgverify import tool_major
from pg_safe_backup.restore import (
    ArchiveKey,
    ArchiveNotUsable,
    RecoveryTarget,
    RestoreError,
    archive_place,
    backup_major,
    check_backup_dir,
    prepare_restore,
    quote_setting,
)
from pg_safe_backup.state import parse_backup_label

LSN = r"[0-9A-F]+/[0-9A-F]+"
LOG_TAIL_LINES = 40
# Lines of the log up to the end of recovery that mean trouble. Connection attempts refused while
# the server is still recovering are expected (hot_standby is off).
_BAD_LOG = re.compile(r"\bPANIC:|\b(?:LOG|WARNING|ERROR|FATAL):\s.*\bcould not\b")
#: How the CLI names the archive in its messages (the library and the operator: ``wal_archive``).
ARCHIVE_ARG = "WAL_ARCHIVE"
#: The key of an encrypted archive, for wal-fetch in the sandbox (in the work dir, removed after the check).
KEY_FILE = "wal_archive.key"
#: What the restore check runs of a server's binaries.
SERVER_TOOLS = ("postgres", "pg_ctl")


class CheckNotRun(TransientError):
    """A check could not run here (a missing or another cluster's WAL archive, no usable binary): an error
    before any check, never a verdict; the message names the flag or file."""


@dataclass
class VerifyResult:
    ok: bool
    reasons: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        if not self.ok:
            return "FAIL: " + "; ".join(self.reasons or ["unknown failure"])
        d = self.details
        parts = [
            (f"backup {d['label']!r}" if d.get("label") else "the copy")
            + " recovered"
            + (f" to {d['recovery_end_lsn']}" if d.get("recovery_end_lsn") else "")
            + (f" on timeline {d['timeline']}" if d.get("timeline") else "")
            + f" ({d.get('wal_files_restored', 0)} WAL files from the archive)"
        ]
        if "btree_indexes_checked" in d:
            parts.append(
                f"amcheck: {d['btree_indexes_checked']} btree indexes"
                + (f", {d['tables_checked']} tables" if d.get("tables_checked") else "")
                + f" in {len(d.get('databases', []))} databases"
            )
        if "invariant_rows" in d:
            parts.append(f"invariant: {len(d['invariant_rows'])} rows ok")
        if d.get("kept_work_dir"):
            parts.append(f"kept {d['kept_work_dir']}")
        return "PASS: " + "; ".join(parts)


def verify_backup(
    backup_dir: Path | str,
    wal_archive: Path | str | None,
    *,
    invariant_sql: str | None = None,
    invariant_db: str = "postgres",
    work_dir: Path | str | None = None,
    keep: bool = False,
    timeout: float = 300,
    bindir: Path | str | None = None,
    recovery_target_immediate: bool = True,
    require_backup_label: bool = True,
    tablespace_dirs: Mapping[str | int, Path | str] | None = None,
    check_heap: bool = True,
    user: str = SERVER_USER,
    extra_settings: Mapping[str, str] | None = None,
    use_backup_pg_wal: bool = False,
    archive_key: EncryptionKey | None = None,
) -> VerifyResult:
    """Restore ``backup_dir`` with WAL from ``wal_archive`` on a temporary server and check it.

    ``work_dir``: the folder in which the temporary work dir is made (default: the system temp
    folder). ``timeout``: seconds for the temporary server to start and finish recovery. ``bindir``: the
    server binaries (default: those of the backup's PG_VERSION). ``user``: the superuser to connect
    as. ``extra_settings``: more ``name: value`` lines for ``postgresql.auto.conf`` (values as
    written in the file, e.g. ``{"shared_preload_libraries": "'timescaledb'"}``).
    ``use_backup_pg_wal``: restore with the backup's own ``pg_wal/`` files instead of an empty
    ``pg_wal/`` (what a careless restore of an rsync copy does; only to show what it leads to).
    ``archive_key``: the key of an archive ``wal-push`` encrypts; the sandbox's wal-fetch reads it from a
    file in the work dir (the server's OS user's alone), removed after the check even with ``keep``.

    :raises CheckNotRun: the WAL archive is missing, closed or another cluster's, or no usable server
        binaries: before anything is copied (a tar backup's cluster: once extracted).
    """
    started = time.monotonic()
    backup = Path(backup_dir).absolute()
    if (key_id := backup_key_id(backup)) is not None:  # no key here: check_backup decrypts it first
        raise CheckNotRun(
            f"{backup} is encrypted with key {key_id}: check it with check_backup(encryption_key=...)"
            f" (pg-safe-backup verify with {KEY_FLAGS})"
        )
    archive = archive_place(wal_archive)
    major = backup_major(backup)
    bin_path = server_bindir(major, bindir)
    reasons: list[str] = []
    details: dict[str, Any] = {"backup_dir": str(backup), "wal_archive": str(archive) if archive else None}
    work: Path | None = None
    cluster: LocalCluster | None = None
    try:
        label_text = check_backup_dir(
            backup,
            archive,
            require_backup_label=require_backup_label,
            archive_flag=ARCHIVE_ARG,
            key=archive_key,
        )
        fields = parse_backup_label(label_text) if label_text is not None else None
        details["backup_label"] = fields
        if fields is not None:
            details["label"] = fields.get("LABEL")
            try:
                check_copy(backup, None, label_text)
            except CopyMismatch as exc:
                reasons.append(str(exc))
        work = Path(tempfile.mkdtemp(prefix="pgsb-verify-", dir=work_dir))
        details["work_dir"] = str(work)
        data = work / "data"
        settings = _sandbox_settings(work, major, extra_settings)
        sandbox_key = _key_file(work, archive_key) if archive_key is not None else None
        prepared = prepare_restore(
            backup,
            data,
            wal_archive=archive,
            recovery=RecoveryTarget(
                immediate=recovery_target_immediate,
                action="promote",
                timeline="current" if recovery_target_immediate else "latest",
            ),
            tablespace_root=work / "tablespaces",
            tablespace_sources=tablespace_dirs,
            archive_key=sandbox_key,
            extra_settings=settings,
            owner=None,
            require_backup_label=require_backup_label,
            use_backup_pg_wal=use_backup_pg_wal,
        )
        if prepared.not_copied:
            details["not_copied"] = prepared.not_copied
        if prepared.used_backup_pg_wal:
            details["used_backup_pg_wal"] = prepared.used_backup_pg_wal
        if prepared.tablespaces:
            details["tablespaces"] = prepared.tablespaces
        newest = _newest_page(data, details)
        (work / "pg_hba.conf").write_text("local all all trust\n")
        (work / "pg_ident.conf").write_text("")
        cluster = LocalCluster(data, port=int(settings["port"]), bindir=bin_path)
        give_to_server_user(work)
        os.chmod(work, 0o700)
        if subprocess.run(as_server_user(["test", "-w", str(data), "-a", "-x", str(data)])).returncode != 0:
            raise RestoreError(
                f"the work dir {work} is not reachable by the {SERVER_USER} OS user"
                " (pick another work_dir / --work-dir)"
            )

        log_at_end = _start_and_recover(cluster, user, time.monotonic() + timeout, reasons, details)
        if log_at_end is None:
            return _result(reasons, details, started)
        _check_recovery_log(log_at_end, label_text, details, reasons)
        _check_newest_page(newest, details, reasons)
        _check_indexes(cluster, user, check_heap, details, reasons)
        if invariant_sql:
            _check_invariant(cluster, user, invariant_sql, invariant_db, details, reasons)
        # A backend that crashed while checking shows up as a PANIC / "terminated by signal".
        tail = cluster.log_text()[len(log_at_end) :]
        for line in tail.splitlines():
            if "PANIC:" in line or "was terminated by signal" in line:
                reasons.append(f"server log during the checks: {line.strip()}")
        return _result(reasons, details, started)
    except ArchiveNotUsable as exc:  # the check cannot run with this archive: no verdict
        raise CheckNotRun(str(exc)) from exc
    except RestoreError as exc:  # the backup cannot be restored safely here: a FAIL reason
        reasons.append(str(exc))
        return _result(reasons, details, started)
    except Exception as exc:  # anything unexpected is a FAIL of the check, with what we know
        reasons.append(f"restore check error: {type(exc).__name__}: {exc}")
        if cluster is not None:
            reasons.append("server log: " + _tail(cluster.log_text()))
        return _result(reasons, details, started)
    finally:
        if cluster is not None:
            try:
                cluster.stop("fast" if keep else "immediate")
            except Exception as exc:  # pragma: no cover - best effort
                details["stop_error"] = str(exc)
        if work is not None:
            (work / KEY_FILE).unlink(missing_ok=True)  # the key goes even from a kept work dir
            if keep:
                details["kept_work_dir"] = str(work)
            else:
                shutil.rmtree(work, ignore_errors=True)


def _key_file(work: Path, key: EncryptionKey) -> ArchiveKey:
    """The archive's key in a file of the work dir, mode 0600 (handed to the server's OS user with the work
    dir): the sandbox server's environment is not ours to set, its wal-fetch reads the key there."""
    path = work / KEY_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key.material.hex() + "\n")
    return ArchiveKey(key, "--encryption-key-file", str(path))


def server_bindir(major: int | None, bindir: Path | str | None = None) -> Path:
    """The server binaries the restore check starts the copy with: ``bindir``, else the backup's major's.

    :param major: the backup's PostgreSQL major (None: unknown, e.g. a tar backup before extraction).
    :param bindir: the folder given (--bindir), if any.
    :raises CheckNotRun: none found, one missing, or of another major (which refuses the copy's files).
    """
    try:
        folder = Path(bindir) if bindir else find_bindir(major)
    except FileNotFoundError:
        raise CheckNotRun(
            f"no PostgreSQL {major or ''} server binaries for the restore check: install them, set PG_BINDIR"
            " or pass --bindir"
        ) from None
    missing = [tool for tool in SERVER_TOOLS if not (folder / tool).is_file()]
    if missing:
        raise CheckNotRun(
            f"no {' or '.join(missing)} in {folder} (--bindir): the restore check starts the copy with"
            f" {f'PostgreSQL {major}' if major else 'its major'}'s server"
        )
    found = tool_major(folder / "postgres")
    if major is not None and found is not None and found != major:
        raise CheckNotRun(
            f"{folder}/postgres is PostgreSQL {found} and the backup {major}: pass --bindir with PostgreSQL"
            f" {major}'s server binaries"
        )
    return folder


def _result(reasons: list[str], details: dict[str, Any], started: float) -> VerifyResult:
    details["seconds"] = round(time.monotonic() - started, 2)
    return VerifyResult(ok=not reasons, reasons=reasons, details=details)


def _one_line(exc: BaseException) -> str:
    return " ".join(line.strip() for line in str(exc).strip().splitlines())


def _tail(text: str, lines: int = LOG_TAIL_LINES) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:]) or "(empty)"


# --------------------------------------------------------------------------------------- preparation
def _newest_page(data: Path, details: dict[str, Any]) -> PageLSN | None:
    """The newest page of the copy (in the work dir, tablespaces included), before recovery changes it."""
    spaces = {oid: Path(t["restored_to"]) for oid, t in details.get("tablespaces", {}).items()}
    try:
        newest = newest_page(data, tablespaces=spaces)
    except CopyMismatch:  # an unreadable pg_control is already a reason (check_copy)
        return None
    if newest is not None:
        details["newest_page_lsn"] = format_lsn(newest.lsn)
        details["newest_page"] = f"{newest.file} block {newest.block}"
    return newest


def _sandbox_settings(work: Path, major: int | None, extra: Mapping[str, str] | None) -> dict[str, str]:
    """The temporary server's settings: its own socket, port and pg_hba.conf, nothing it could reach or
    send out (no TCP, archiving, replication, preload libraries), cheap on resources."""
    settings = {
        "port": str(free_port()),
        "listen_addresses": "''",
        "unix_socket_directories": quote_setting(str(work)),
        "unix_socket_group": "''",
        "unix_socket_permissions": "0700",
        "hba_file": quote_setting(str(work / "pg_hba.conf")),
        "ident_file": quote_setting(str(work / "pg_ident.conf")),
        "external_pid_file": quote_setting(str(work / "external.pid")),
        "ssl": "off",
        "recovery_end_command": "''",
        "archive_cleanup_command": "''",
        "primary_conninfo": "''",
        "primary_slot_name": "''",
        "hot_standby": "off",
        "archive_mode": "off",
        "archive_command": "''",
        "synchronous_standby_names": "''",
        "shared_preload_libraries": "''",
        "session_preload_libraries": "''",
        "local_preload_libraries": "''",
        "default_transaction_read_only": "off",
        "restart_after_crash": "off",
        "autovacuum": "off",
        "fsync": "off",
        "shared_buffers": "'128MB'",
        "huge_pages": "'try'",
        "logging_collector": "off",
        "log_destination": "'stderr'",
        "log_min_messages": "'warning'",
        "log_line_prefix": "'%m [%p] '",
        "lc_messages": "'C'",
    }
    if major is not None and major < 15:
        settings["stats_temp_directory"] = "'pg_stat_tmp'"
    settings.update(extra or {})
    return settings


# ---------------------------------------------------------------------------------------- recovery
def _start_and_recover(
    cluster: LocalCluster, user: str, deadline: float, reasons: list[str], details: dict[str, Any]
) -> str | None:
    """Start the server and wait until it left recovery; the log up to then, or None (FAIL)."""
    try:
        cluster.start(timeout=max(5.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        reasons.append("the server did not start in time" + _why(cluster.log_text()))
        return None
    except subprocess.CalledProcessError:
        reasons.append("the server did not start" + _why(cluster.log_text()))
        return None
    last_error = ""
    while True:
        try:
            with cluster.connect(user=user, connect_timeout=5) as conn:
                if not conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]:
                    (details["server_version"],) = conn.execute("SHOW server_version").fetchone()
                    tli, lsn = conn.execute(
                        "SELECT timeline_id, checkpoint_lsn::text FROM pg_control_checkpoint()"
                    ).fetchone()
                    details["timeline"] = tli
                    details["checkpoint_after_recovery"] = lsn
                    return cluster.log_text()
        except psycopg.OperationalError as exc:
            last_error = str(exc).strip()
        if not (cluster.datadir / "postmaster.pid").exists():
            reasons.append("the server stopped during recovery" + _why(cluster.log_text()))
            return None
        if time.monotonic() > deadline:
            reasons.append(
                f"recovery did not end in time (last: {last_error or 'still in recovery'})"
                + _why(cluster.log_text())
            )
            return None
        time.sleep(0.2)


_OUR_POLLING = (
    "not accepting connections",
    "Hot standby mode is disabled",
    "the database system is starting up",
)


def _why(log: str) -> str:
    """': <first PANIC/FATAL message>; server log: <tail>' for a server that did not recover."""
    key = ""
    for line in log.splitlines():
        m = re.search(r"\b(?:PANIC|FATAL):\s.*", line)
        if m and not any(p in line for p in _OUR_POLLING):
            key = m.group(0).strip()
            break
    return (f": {key}" if key else "") + "; server log: " + _tail(log)


def _check_recovery_log(
    log: str, label_text: str | None, details: dict[str, Any], reasons: list[str]
) -> None:
    def first(pattern: str) -> str | None:
        m = re.search(pattern, log)
        return m.group(1) if m else None

    details["redo_start_lsn"] = first(rf"redo starts at ({LSN})")
    details["consistent_lsn"] = first(rf"consistent recovery state reached at ({LSN})")
    details["redo_done_lsn"] = first(rf"redo done at ({LSN})")
    details["recovery_end_lsn"] = details["redo_done_lsn"] or details["consistent_lsn"]
    details["stopped_at_consistency"] = "recovery stopping after reaching consistency" in log
    details["new_timeline"] = first(r"selected new timeline ID: (\d+)")
    details["last_transaction_time"] = first(r"last completed transaction was at log time (.+)")
    details["wal_files_restored"] = len(re.findall(r'restored log file "[0-9A-F]{24}" from archive', log))
    if not details["consistent_lsn"] and not details["redo_done_lsn"]:
        reasons.append(
            "the server log shows neither 'consistent recovery state reached' nor 'redo done':"
            " " + _tail(log, 15)
        )
    if label_text is not None:
        start = parse_backup_label(label_text).get("START WAL LOCATION", "").split(" ")[0]
        redo = details["redo_start_lsn"]
        if redo and start and redo != start:
            reasons.append(
                f"recovery started at {redo}, not at the backup_label's START WAL LOCATION {start}"
            )
    bad = [line.strip() for line in log.splitlines() if _BAD_LOG.search(line)]
    if bad:
        details["bad_log_lines"] = bad
        reasons.append("server log during recovery: " + " | ".join(bad[:5]))


def _check_newest_page(newest: PageLSN | None, details: dict[str, Any], reasons: list[str]) -> None:
    """No page of the copy may be newer than the point where its recovery became consistent: recovery
    of a backup ends there at the earliest (the default target), and a page ahead of the WAL breaks the
    server's first checkpoint ("xlog flush request ... is not satisfied")."""
    consistent = details.get("consistent_lsn")
    if newest is None or not consistent or newest.lsn <= parse_lsn(consistent):
        return
    reasons.append(
        f"the copy holds pages newer than the point where its recovery became consistent: {newest.file} block"
        f" {newest.block} has LSN {format_lsn(newest.lsn)}, recovery was consistent at {consistent}. The copy"
        " does not match its backup_label: for a backup of a standby, global/pg_control must be copied last"
        " (its minimum recovery point is where the backup ends); or the label is of an earlier backup than "
        "the copy"
    )


# ------------------------------------------------------------------------------------------- checks
def _databases(cluster: LocalCluster, user: str) -> list[str]:
    with cluster.connect(user=user) as conn:
        rows = conn.execute("SELECT datname FROM pg_database WHERE datallowconn ORDER BY datname").fetchall()
    return [r[0] for r in rows]


def _check_indexes(
    cluster: LocalCluster, user: str, check_heap: bool, details: dict[str, Any], reasons: list[str]
) -> None:
    dbs = _databases(cluster, user)
    details["databases"] = dbs
    indexes = tables = 0
    problems: list[str] = []
    for db in dbs:
        with cluster.connect(db, user=user) as conn:
            try:
                conn.execute("CREATE EXTENSION IF NOT EXISTS amcheck")
            except psycopg.Error as exc:
                reasons.append(f"amcheck is not available in database {db}: {_one_line(exc)}")
                continue
            (schema,) = conn.execute(
                "SELECT extnamespace::regnamespace::text FROM pg_extension WHERE extname = 'amcheck'"
            ).fetchone()
            bt_check = pgsql.SQL("SELECT {}.bt_index_check(%s::regclass, heapallindexed => true)").format(
                pgsql.Identifier(schema)
            )
            rows = conn.execute("""
                SELECT c.oid, c.oid::regclass::text FROM pg_index i
                JOIN pg_class c ON c.oid = i.indexrelid
                JOIN pg_am am ON am.oid = c.relam
                WHERE am.amname = 'btree' AND c.relkind = 'i' AND c.relpersistence <> 't'
                  AND i.indisvalid AND i.indisready
                ORDER BY c.oid""").fetchall()
            for oid, name in rows:
                try:
                    conn.execute(bt_check, (oid,))
                    indexes += 1
                except psycopg.Error as exc:
                    problems.append(f"{db}: index {name}: {_one_line(exc)}")
            has_heapam = conn.execute(
                "SELECT EXISTS (SELECT FROM pg_proc WHERE proname = 'verify_heapam'"
                " AND pronamespace = %s::regnamespace)",
                (schema,),
            ).fetchone()[0]
            if not (check_heap and has_heapam):
                continue
            heap_check = pgsql.SQL(
                "SELECT blkno, offnum, msg FROM {}.verify_heapam(%s::regclass) LIMIT 5"
            ).format(pgsql.Identifier(schema))
            for oid, name in conn.execute("""
                    SELECT c.oid, c.oid::regclass::text FROM pg_class c JOIN pg_am am ON am.oid = c.relam
                    WHERE c.relkind IN ('r', 'm', 't') AND c.relpersistence <> 't' AND am.amname = 'heap'
                    ORDER BY c.oid""").fetchall():
                try:
                    found = conn.execute(heap_check, (oid,)).fetchall()
                    tables += 1
                except psycopg.Error as exc:
                    problems.append(f"{db}: table {name}: {_one_line(exc)}")
                    continue
                for blkno, offnum, msg in found:
                    problems.append(f"{db}: table {name} block {blkno} offset {offnum}: {msg}")
    details["btree_indexes_checked"] = indexes
    details["tables_checked"] = tables
    if problems:
        details["amcheck_problems"] = problems
        reasons.append(f"amcheck found {len(problems)} problems: " + " | ".join(problems[:5]))


def _check_invariant(
    cluster: LocalCluster, user: str, query: str, db: str, details: dict[str, Any], reasons: list[str]
) -> None:
    try:
        with cluster.connect(db, user=user) as conn:
            cur = conn.execute(query)
            rows = cur.fetchall() if cur.description else []
    except psycopg.Error as exc:
        reasons.append(f"invariant query failed in database {db}: {_one_line(exc)}")
        return
    details["invariant_rows"] = [tuple(r) for r in rows]
    if not rows:
        reasons.append("invariant query returned no rows")
        return
    failed = [r for r in rows if len(r) < 1 or r[0] is not True]
    for r in failed:
        reasons.append("invariant violated: " + (str(r[1]) if len(r) > 1 else repr(tuple(r))))
