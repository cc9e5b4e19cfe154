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
   last): ``restore_command`` copying from the archive, ``recovery_target = 'immediate'`` (or the
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
binary (the backup's major's ``postgres`` and ``pg_ctl``; a ``pg_verifybackup`` of any installed major
that reads the backup's manifest), raises :class:`CheckNotRun` before any check, and nothing is recorded.
Recording a verdict (:func:`record_check`) is best-effort: storage it cannot write gets a warning.

CLI: ``pg-safe-backup verify BACKUP_DIR WAL_ARCHIVE [--invariant-sql SQL] [--invariant-db DB] [--keep]``
(:mod:`pg_safe_backup.cli`) prints the summary and exits 0 on PASS, 1 on FAIL, 2 when the checks could not
run. ``python -m pg_safe_backup.verify ...``, the older spelling, runs the same.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql as pgsql

from pg_safe_backup.catalog import CatalogError, append_verification, entry_path, has_info
from pg_safe_backup.errors import TransientError
from pg_safe_backup.files.layout import CONTROL_FILE
from pg_safe_backup.files.pgcontrol import (
    CopyMismatch,
    MissingStopLsn,
    PageLSN,
    check_copy,
    check_page_lsns,
    format_lsn,
    newest_page,
    parse_lsn,
    stop_lsn_from_manifest,
)
from pg_safe_backup.files.tablespaces import tablespace_copies
from pg_safe_backup.local_cluster import (
    SERVER_USER,
    LocalCluster,
    as_server_user,
    find_bindir,
    free_port,
    give_to_server_user,
)
from pg_safe_backup.pgverify import run_pg_verifybackup, tool_major
from pg_safe_backup.restore import (
    ArchiveNotUsable,
    RecoveryTarget,
    RestoreError,
    backup_major,
    check_archive,
    check_backup_dir,
    manifest_field,
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
#: What the restore check runs of a server's binaries.
SERVER_TOOLS = ("postgres", "pg_ctl")
#: The first major whose pg_verifybackup reads each backup_manifest version.
MANIFEST_READERS = {1: 13, 2: 17}
_log = logging.getLogger(__name__)


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
) -> VerifyResult:
    """Restore ``backup_dir`` with WAL from ``wal_archive`` on a temporary server and check it.

    ``work_dir``: the folder in which the temporary work dir is made (default: the system temp
    folder). ``timeout``: seconds for the temporary server to start and finish recovery. ``bindir``: the
    server binaries (default: those of the backup's PG_VERSION). ``user``: the superuser to connect
    as. ``extra_settings``: more ``name: value`` lines for ``postgresql.auto.conf`` (values as
    written in the file, e.g. ``{"shared_preload_libraries": "'timescaledb'"}``).
    ``use_backup_pg_wal``: restore with the backup's own ``pg_wal/`` files instead of an empty
    ``pg_wal/`` (what a careless restore of an rsync copy does; only to show what it leads to).

    :raises CheckNotRun: the WAL archive is missing, closed or another cluster's, or no usable server
        binaries: before anything is copied (a tar backup's cluster: once extracted).
    """
    started = time.monotonic()
    backup = Path(backup_dir).absolute()
    archive = Path(wal_archive).absolute() if wal_archive is not None else None
    major = backup_major(backup)
    bin_path = server_bindir(major, bindir)
    reasons: list[str] = []
    details: dict[str, Any] = {"backup_dir": str(backup), "wal_archive": str(archive) if archive else None}
    work: Path | None = None
    cluster: LocalCluster | None = None
    try:
        label_text = check_backup_dir(
            backup, archive, require_backup_label=require_backup_label, archive_flag=ARCHIVE_ARG
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
            if keep:
                details["kept_work_dir"] = str(work)
            else:
                shutil.rmtree(work, ignore_errors=True)


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


def find_verifier(
    backup: Path, verifier_bindir: Path | str | None = None, bindir: Path | str | None = None
) -> Path:
    """The folder of the pg_verifybackup that checks the backup's manifest: ``verifier_bindir``; else, of
    ``bindir``, the backup's major's binaries and every installed PostgreSQL's, one whose verifier reads the
    manifest's version (13+ reads version 1, 17+ version 2): the backup's own major, else the nearest.

    :param backup: the backup, with its backup_manifest.
    :param verifier_bindir: the folder given (--verifier-bindir), if any: it is used or refused.
    :param bindir: the server binaries given (--bindir), if any: tried first.
    :raises CheckNotRun: ``verifier_bindir`` has no verifier that reads the manifest, or none is installed.
    """
    # Unreadable: any verifier runs and says what is wrong with it.
    version = manifest_field(backup, "PostgreSQL-Backup-Manifest-Version") or 1
    lowest = MANIFEST_READERS.get(version, max(MANIFEST_READERS.values()))
    if verifier_bindir:
        folder = Path(verifier_bindir)
        found = tool_major(folder / "pg_verifybackup") if (folder / "pg_verifybackup").is_file() else None
        if found is None or found < lowest:
            raise CheckNotRun(
                f"no pg_verifybackup of PostgreSQL {lowest} or later in {folder} (--verifier-bindir): the"
                f" backup_manifest is of version {version}"
            )
        return folder
    major = backup_major(backup)
    candidates = [Path(bindir)] if bindir else []
    try:
        candidates.append(find_bindir(major))
    except FileNotFoundError:
        pass
    candidates += [Path(folder) for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"))]
    if on_path := shutil.which("pg_verifybackup"):
        candidates.append(Path(on_path).parent)
    usable: dict[Path, int] = {}
    for folder in candidates:
        if folder not in usable and (folder / "pg_verifybackup").is_file():
            found = tool_major(folder / "pg_verifybackup")
            if found is not None and found >= lowest:
                usable[folder] = found
    if not usable:
        raise CheckNotRun(
            f"no installed pg_verifybackup reads {backup}/backup_manifest (version {version}: PostgreSQL"
            f" {lowest} or later): install one, pass --verifier-bindir, or skip it (--no-verifybackup)"
        )
    # The same major parses the WAL too; else the nearest, the newer of two as near.
    return min(usable, key=lambda f: (usable[f] != major, abs(usable[f] - (major or usable[f])), -usable[f]))


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


# ------------------------------------------------------------------------------ every check of a backup
PASS, FAIL, SKIPPED = "PASS", "FAIL", "SKIPPED"
#: The checks :func:`check_backup` runs, cheapest first.
CHECKS = ("page-LSN check", "pg_verifybackup", "restore check")


@dataclass
class CheckStep:
    """One check of a backup: PASS, FAIL or SKIPPED, and why, naming the file or page at fault."""

    name: str
    status: str
    summary: str
    details: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        return f"{self.name}: {self.status}: {self.summary}"


@dataclass
class BackupCheck:
    """The checks of one backup, in the order they ran."""

    steps: list[CheckStep]

    @property
    def ok(self) -> bool:
        return all(step.status != FAIL for step in self.steps)

    def step(self, name: str) -> CheckStep | None:
        return next((step for step in self.steps if step.name == name), None)

    def summary(self) -> str:
        """One verdict line (``PASS: ...`` or ``FAIL: ...``, naming each check), then a line per check."""
        verdict = ", ".join(f"{step.name} {step.status.lower()}" for step in self.steps)
        failed = [step.line() for step in self.steps if step.status == FAIL]
        head = f"{PASS if self.ok else FAIL}: {verdict}" + (f" ({'; '.join(failed)})" if failed else "")
        return "\n".join([head, *(f"  {step.line()}" for step in self.steps)])

    def as_dict(self) -> dict[str, Any]:
        """Plain values for XCom: ok, summary and each check's status, summary and details."""
        return {
            "ok": self.ok,
            "summary": self.summary(),
            "checks": {
                s.name: {"status": s.status, "summary": s.summary, "details": s.details} for s in self.steps
            },
        }


def check_backup(
    backup_dir: Path | str,
    wal_archive: Path | str | None,
    *,
    stop_lsn: str | None = None,
    page_lsns: bool = True,
    manifest: bool = True,
    restore: bool = True,
    verifier_bindir: Path | str | None = None,
    tablespace_dirs: Mapping[str | int, Path | str] | None = None,
    progress: Callable[[str], None] | None = None,
    **restore_options: Any,
) -> BackupCheck:
    """Check a stored backup, cheapest first: its page LSNs, ``pg_verifybackup``, then the restore check.

    Each check runs whatever the one before found, so one report names every problem.

    :param backup_dir: the copy, with its backup_label (and backup_manifest, tablespace_map).
    :param wal_archive: the WAL archive; None for a self-contained backup (its WAL in its pg_wal/).
    :param stop_lsn: the backup's stop LSN, for the page-LSN check of a backup of a primary; default:
        the End-LSN of its backup_manifest, else the backup history file in the archive.
    :param page_lsns: run the page-LSN check (seconds per GB, no server).
    :param manifest: run pg_verifybackup when the copy has a backup_manifest.
    :param restore: run the restore check (a temporary server: minutes per GB).
    :param verifier_bindir: the folder of pg_verifybackup; default: the backup's major's binaries.
    :param tablespace_dirs: tablespace OID -> its backup, when not where the module docstring looks.
    :param progress: called with a line as each check starts (the CLI prints it).
    :param restore_options: :func:`verify_backup`'s keyword arguments.
    :raises CheckNotRun: before any check: the WAL archive is missing, closed to the server's OS user or
        another cluster's; no pg_verifybackup reads the manifest (``manifest``); no server binaries of the
        backup's major (``restore``).
    """
    backup = Path(backup_dir).absolute()
    archive = Path(wal_archive).absolute() if wal_archive is not None else None
    if archive is not None:
        try:
            check_archive(backup, archive, flag=ARCHIVE_ARG)
        except ArchiveNotUsable as err:
            raise CheckNotRun(str(err)) from err
    verifier = None
    if manifest and (backup / "backup_manifest").is_file():
        verifier = find_verifier(backup, verifier_bindir, restore_options.get("bindir"))
    if restore:
        server_bindir(backup_major(backup), restore_options.get("bindir"))
    say = progress or (lambda line: None)
    steps = []
    if page_lsns:
        say(f"{CHECKS[0]}: reading every page of {backup} ...")
        steps.append(_page_lsn_step(backup, archive, stop_lsn, tablespace_dirs))
    if manifest:
        say(f"{CHECKS[1]}: checking {backup} against its backup_manifest ...")
        steps.append(_verifybackup_step(backup, archive, verifier))
    if restore:
        say(f"{CHECKS[2]}: copying {backup} and recovering it on a temporary server ...")
        result = verify_backup(backup, archive, tablespace_dirs=tablespace_dirs, **restore_options)
        steps.append(CheckStep(CHECKS[2], PASS if result.ok else FAIL, result.summary()[6:], result.details))
    return BackupCheck(steps)


def record_check(
    backup_dir: Path | str,
    report: BackupCheck,
    seconds: float,
    by: str,
    warn: Callable[[str], None] | None = None,
) -> bool:
    """Append the outcome of the checks to the backup's ``backup_info.json`` (the catalog), when it has one.
    Best-effort: the verdict stands when it cannot be written (read-only storage), with a warning.

    :param backup_dir: the backup checked.
    :param report: what the checks found.
    :param seconds: how long they took (a drill's restore time).
    :param by: who checked: ``pg-safe-backup verify``, a task's id, ...
    :param warn: where to say it was not recorded (default: this module's logger).
    :returns: whether it was recorded.
    """
    folder = Path(backup_dir)
    if not has_info(folder):  # beside the folder, or inside it (an earlier release's)
        return False
    try:
        append_verification(
            folder,
            {
                "ok": report.ok,
                "by": by,
                "seconds": round(seconds, 1),
                "checks": {step.name: step.status for step in report.steps},
                "summary": report.summary().splitlines()[0],
            },
        )
    except (OSError, CatalogError) as err:
        (warn or _log.warning)(f"the verdict was not recorded in {entry_path(folder)}: {_one_line(err)}")
        return False
    return True


def backup_stop_lsn(backup: Path, wal_archive: Path | None) -> tuple[str, str] | None:
    """The backup's stop LSN and where it was read: its backup_manifest's WAL-Ranges, else the backup
    history file (``<segment>.<offset>.backup``) pg_backup_stop wrote into the archive for this very backup
    (same start, label and start time; a standby writes none); None if neither."""
    manifest_file = backup / "backup_manifest"
    if manifest_file.is_file():
        try:
            return stop_lsn_from_manifest(manifest_file.read_text()), str(manifest_file)
        except ValueError:
            pass
    label = backup / "backup_label"
    if wal_archive is None or not label.is_file():
        return None
    ours = parse_backup_label(label.read_text())
    start = ours.get("START WAL LOCATION", "")
    m = re.match(r"(\S+) \(file ([0-9A-F]{24})\)", start)
    # A standby writes no backup history file; one with the same start is another backup's (the primary's
    # backup a standby was made from starts at the same point until the standby's first restartpoint).
    if not m or ours.get("BACKUP FROM") == "standby":
        return None
    for history in sorted(wal_archive.glob(f"{m.group(2)}.*.backup")):
        fields = parse_backup_label(history.read_text(errors="replace"))
        same = all(fields.get(key) == ours.get(key) for key in ("START WAL LOCATION", "LABEL", "START TIME"))
        if same and fields.get("STOP WAL LOCATION"):
            return fields["STOP WAL LOCATION"].split(" ")[0], str(history)
    return None


def _page_lsn_step(
    backup: Path, archive: Path | None, stop_lsn: str | None, overrides: Mapping[str | int, Path | str] | None
) -> CheckStep:
    name = CHECKS[0]
    label = backup / "backup_label"
    if not label.is_file():
        return CheckStep(name, SKIPPED, f"{backup} has no backup_label: no backup to hold its pages against")
    details: dict[str, Any] = {}
    if stop_lsn:
        details["stop_lsn_from"] = "given"
    elif found := backup_stop_lsn(backup, archive):
        stop_lsn, details["stop_lsn_from"] = found
    try:
        spaces = tablespace_copies(backup, overrides, backup_major(backup))
        result = check_page_lsns(
            backup, backup_label=label.read_text(), stop_lsn=stop_lsn, tablespaces=spaces
        )
    except MissingStopLsn as err:
        return CheckStep(name, SKIPPED, str(err), details)
    except (ValueError, CopyMismatch, OSError) as err:
        return CheckStep(name, FAIL, _one_line(err), details)
    details.update(
        newest_page=str(result.newest) if result.newest else None,
        consistency_lsn=format_lsn(result.consistency_lsn),
        consistency_from=result.source,
        bytes_scanned=result.bytes_scanned,
        files=result.files,
        seconds=round(result.seconds, 2),
    )
    return CheckStep(name, PASS if result.ok else FAIL, result.message, details)


def _verifybackup_step(backup: Path, archive: Path | None, folder: Path | None) -> CheckStep:
    """pg_verifybackup of ``folder`` (:func:`find_verifier`; None: the backup has no manifest)."""
    name = CHECKS[1]
    major = backup_major(backup)
    if folder is None:
        why = "PostgreSQL 12 has no backup manifests" if major == 12 else "the store task wrote none"
        return CheckStep(name, SKIPPED, f"no backup_manifest in {backup} ({why})")
    verifier_major = tool_major(folder / "pg_verifybackup")
    # Another major's verifier of a version 2 manifest refuses the copy's pg_control version.
    ignore = () if verifier_major == major or (major or 0) < 17 else (CONTROL_FILE,)
    same = verifier_major == major and (folder / "pg_waldump").is_file()  # pg_waldump parses the WAL
    notes = []
    if not same:
        notes.append(
            f"WAL not parsed: no pg_waldump in {folder}"
            if verifier_major == major
            else f"WAL not parsed: pg_waldump {verifier_major} reads only its own major's WAL"
        )
    if ignore:
        notes.append(f"{CONTROL_FILE} not checked: pg_verifybackup {verifier_major} refuses another major's")
    note = f" ({'; '.join(notes)})" if notes else ""
    run = run_pg_verifybackup(backup, bindir=folder, wal_path=archive, skip_wal=not same, ignore=ignore)
    details = {"command": run.cmd, "verifier_major": verifier_major, "wal_parsed": same}
    if run.ok:
        return CheckStep(
            name, PASS, run.output.splitlines()[-1] + note if run.output else "ok" + note, details
        )
    return CheckStep(name, FAIL, " | ".join(run.output.splitlines()[:10]) + note, details)


if __name__ == "__main__":  # the older entry point, kept for scripts that call it: ``pg-safe-backup verify``
    import sys

    from pg_safe_backup.cli import main

    sys.exit(main(["verify", *sys.argv[1:]]))
