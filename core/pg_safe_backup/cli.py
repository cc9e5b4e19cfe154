"""The ``pg-safe-backup`` console script: what a DBA runs on a machine with the backups.

Needs only this package and PostgreSQL's binaries (nothing of Airflow is imported). Every subcommand's
arguments and handler are here; the domain modules they call define no command line. The one entry point:
this console script, also ``python -m pg_safe_backup`` (the older ``python -m pg_safe_backup.verify ...`` is
``python -m pg_safe_backup verify ...``).

``pg-safe-backup list ROOT`` lists the backups under ROOT, each proven from its own files, oldest first.

``pg-safe-backup verify BACKUP_DIR [WAL_ARCHIVE]`` runs, in order, the page-LSN check, ``pg_verifybackup``
(when the copy has a backup_manifest) and the restore check, prints a verdict line and a line per check,
and exits 0 when none failed, 1 otherwise, 3 when a check could not run. Without WAL_ARCHIVE the backup
must be self-contained (its WAL in its pg_wal/).

``pg-safe-backup retention ROOT --keep-last N --keep-days D --wal-archive DIR [--dry-run]`` deletes the
backups of ROOT the policy lets go, then the archive's WAL older than the oldest kept backup's start; one
line per backup kept, deleted or left alone, with the reason.

``pg-safe-backup restore BACKUP TARGET_DIR --wal-archive DIR [--target-time T | --target-lsn L |
--target-name N | --target-immediate] [--latest-before TIME]`` prepares TARGET_DIR so that ``pg_ctl start``
recovers the backup (see :mod:`pg_safe_backup.restore`), then prints that command.

``pg-safe-backup check --dsn DSN [--archive URL_OR_DIR] [--pgdata PATH] [--destination PATH]`` checks a
server before its first backup (see :mod:`pg_safe_backup.preflight`): one line per finding, exit 0 when
ready, 1 on a problem, 3 when something could not be checked.

``pg-safe-backup wal-push [--archive URL_OR_DIR] [--compress none|gzip|lz4|zstd] [--encryption-key-file F |
--encryption-key-env NAME] [--parallel N] %p`` is an archive_command, ``pg-safe-backup wal-fetch [--archive
URL_OR_DIR] [--encryption-key-file F | --encryption-key-env NAME] %f %p`` a restore_command (see
:mod:`pg_safe_backup.wal_archive`); ``--archive`` defaults to ``$PGSB_WAL_ARCHIVE``.

Every subcommand takes ``--json`` and ends with one of :data:`EXIT_STATUSES`' statuses; a failure is one line,
``pg-safe-backup SUBCOMMAND: error: WHAT``, naming flags (:func:`flag_names`).

``restore``, ``verify`` and ``list`` read an encrypted backup (:mod:`pg_safe_backup.encryption`) with
``--encryption-key-file FILE`` or ``--encryption-key-env NAME``; without it they say which key it needs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from pg_safe_backup import __version__
from pg_safe_backup.errors import PgSafeBackupError, error_line

if TYPE_CHECKING:  # annotations only: never imported when the command runs
    from collections.abc import Callable
    from datetime import datetime

    from pg_safe_backup.files.crypt import EncryptionKey
    from pg_safe_backup.restore import ArchiveKey
    from pg_safe_backup.verify import BackupCheck

# The domain modules are imported inside each subcommand's functions: ``wal-push`` runs once per WAL segment
# as archive_command and must start in a few tens of milliseconds, without psycopg or fsspec.


# ---------------------------------------------------------------- exit statuses, errors and the output
#: Every subcommand's exit statuses (:data:`EXIT_STATUSES` says what each means, in the main ``--help``).
OK, FAILED, USAGE, NO_VERDICT = 0, 1, 2, 3

EXIT_STATUSES = """exit status, the same for every subcommand:
  0    done: listed, passed, ready, retention carried out, restore prepared, archived, fetched
  1    failed: a check failed or found a problem, the work was refused or failed (named on stderr);
       wal-fetch: the archive does not hold the file
  2    usage: an unknown flag, a missing or bad value, a ROOT, BACKUP or --wal-archive folder that is not
       there (the flag or argument named); nothing was done
  3    no verdict (verify, check): a check could not run (a server, archive, binary or key out of reach)
  255  wal-fetch only, any failure but 1's: above 125, so PostgreSQL stops recovery (usage errors too);
       wal-push's failures are all 1 (PostgreSQL keeps the file and asks again)

errors: one line on stderr, "pg-safe-backup SUBCOMMAND: error: WHAT" (after the usage line for 2).
--json (every subcommand): stdout holds exactly one JSON document: the result (list: an array of backups;
the others: an object whose "ok" is the verdict) or, on an error, {"ok": false, "error": WHAT,
"exit_code": N}; lines meant for a person (progress, retention's and restore's steps) go to stderr.
A reader that goes away (| head) ends the output quietly, never the work: a restore or retention runs on."""

#: Names of settings the domain's messages use (they serve the operators too) -> the flag the CLI gives them
#: by: every error the CLI prints goes through :func:`flag_names`. In order: a phrase before a name in it.
FLAG_OF_PARAMETER = (
    ("require_backup_label=False", "--allow-missing-label"),
    ("--wal-archive / wal_archive", "--wal-archive"),
    ("work_dir / --work-dir", "--work-dir"),
    ("keep_last", "--keep-last"),
    ("keep_days", "--keep-days"),
)


def flag_names(text: str) -> str:
    """``text`` (a domain message: an error, a check's outcome) with each setting named by its flag
    (:data:`FLAG_OF_PARAMETER`)."""
    for parameter, flag in FLAG_OF_PARAMETER:
        text = text.replace(parameter, flag)
    return text


def _flags_in(value: Any) -> Any:
    """:func:`flag_names` of every text in a JSON document."""
    if isinstance(value, str):
        return flag_names(value)
    if isinstance(value, dict):
        return {k: _flags_in(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_flags_in(v) for v in value]
    return value


class Failed(Exception):
    """A subcommand ends without its result: the line to print (flags named) and the exit status."""

    def __init__(self, what: BaseException | str, status: int = FAILED) -> None:
        super().__init__(flag_names(what if isinstance(what, str) else error_line(what)))
        self.status = status


def out(text: str) -> None:
    """Print ``text`` on stdout. A reader gone (``| head``: a closed pipe) stops the output, never the work:
    stdout goes to /dev/null from then on, and the command ends with its work's status."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        _stdout_gone()


def _stdout_gone() -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def emit(document: Any) -> None:
    """``--json``'s one document on stdout (paths and times as text)."""
    out(json.dumps(document, indent=1, default=str))


def _error_document(line: str, status: int) -> dict[str, Any]:
    """``--json``'s document of an error (:data:`EXIT_STATUSES`)."""
    return {"ok": False, "error": line, "exit_code": status}


def for_a_person(args: argparse.Namespace) -> Callable[[str], None]:
    """Where a subcommand's lines for a person go: stdout, or stderr with ``--json`` (stdout holds JSON)."""
    if getattr(args, "json", False):
        return lambda line: print(line, file=sys.stderr, flush=True)
    return out


def add_json_flag(p: argparse.ArgumentParser, what: str) -> None:
    """``--json``: print the result as one JSON document (:data:`EXIT_STATUSES` says its shape).

    :param p: the subcommand's parser.
    :param what: the document, for the help.
    """
    p.add_argument("--json", action="store_true", help=f"print one JSON document: {what}")


class Parser(argparse.ArgumentParser):
    """argparse's parser, whose usage error names flags in one line, is a JSON document too when ``--json``
    was given, and ends with the subcommand's usage status (wal-fetch's is :data:`FETCH_FAILED`)."""

    json_errors = False
    usage_status = USAGE

    def error(self, message: str) -> NoReturn:
        line = flag_names(" ".join(message.split()))
        if self.json_errors:
            emit(_error_document(line, self.usage_status))
        self.print_usage(sys.stderr)
        self.exit(self.usage_status, f"{self.prog}: error: {line}\n")


def _folder(place: Any, given: str, what: str) -> None:
    """A usage error unless ``place`` (``what``'s value, ``given``) is a folder."""
    if not place.is_dir():
        raise Failed(f"{what} {given} is not a folder", USAGE)


def encryption_key(args: argparse.Namespace) -> EncryptionKey | None:
    """The key :func:`add_key_flags`' flags give (None: none given): an encrypted backup's, an encrypted
    WAL archive's. Imports only ``files/crypt.py`` (wal-push and wal-fetch read it too).

    :raises CryptError: the file or variable holds no key (named, never its content).
    """
    from pg_safe_backup.files.crypt import key_from_flags

    return key_from_flags(
        getattr(args, "encryption_key_file", None), getattr(args, "encryption_key_env", None)
    )


# -------------------------------------------------------------------------------------------- verify
VERIFY_DESCRIPTION = (
    "Check a stored backup: the page-LSN check, pg_verifybackup against its backup_manifest, then the"
    " restore check (recover it on a temporary server, amcheck, an optional invariant)."
)

VERIFY_EPILOG = """examples:
  pg-safe-backup verify /backups/main/20261126T010000 /var/lib/postgresql/wal_archive
  pg-safe-backup verify /backups/main/20261126T010000        # self-contained (include_wal=True)
  pg-safe-backup verify BACKUP ARCHIVE --invariant-sql "SELECT count(*) > 0, 'orders' FROM orders"

Exits 0 when every check passed, 1 when one failed, 3 when a check could not run (no archive, another
cluster's archive, no binaries, no key: no verdict, nothing recorded), 2 on a bad flag or value.
"""


def add_verify_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``pg-safe-backup verify``.

    :param p: the parser (or subcommand parser) to add them to; its ``run`` default runs the checks.
    """
    from pg_safe_backup.local_cluster import SERVER_USER

    p.add_argument(
        "backup_dir",
        metavar="BACKUP",
        help="the backup folder, or its object-store URL (s3://bucket/backups/20261126T010000, gs://, abfs://)",
    )
    p.add_argument(
        "wal_archive",
        nargs="?",
        metavar="WAL_ARCHIVE",
        help="the WAL archive: a folder, or the URL of one wal-push manages (s3://...); omit for a"
        " self-contained backup",
    )
    p.add_argument("--stop-lsn", help="the backup's stop LSN (default: from backup_manifest or the archive)")
    p.add_argument("--no-page-lsn", action="store_true", help="skip the page-LSN check")
    p.add_argument("--no-verifybackup", action="store_true", help="skip pg_verifybackup")
    p.add_argument("--no-restore", action="store_true", help="skip the restore check (the slow one)")
    p.add_argument(
        "--verifier-bindir",
        type=Path,
        help="folder of pg_verifybackup (default: --bindir's, the backup's major's, else the nearest"
        " installed)",
    )
    p.add_argument("--invariant-sql", help="a query returning rows (ok boolean, detail text); all must be ok")
    p.add_argument("--invariant-db", default="postgres")
    p.add_argument("--keep", action="store_true", help="keep the work dir (the server is stopped)")
    p.add_argument("--work-dir", type=Path, help="where to make the temporary work dir")
    p.add_argument("--timeout", type=float, default=300, help="seconds to start and recover")
    p.add_argument("--bindir", type=Path, help="PostgreSQL server binaries (default: the backup's major's)")
    p.add_argument(
        "--to-end-of-archive",
        action="store_true",
        help="replay the whole archive instead of stopping at the backup's consistent point",
    )
    p.add_argument(
        "--allow-missing-label",
        action="store_true",
        help="check a copy without backup_label (only right for a copy of a stopped server)",
    )
    p.add_argument(
        "--use-backup-pg-wal",
        action="store_true",
        help="start with the backup's pg_wal/ files instead of an empty pg_wal/ (not recommended)",
    )
    p.add_argument("--user", default=SERVER_USER, help="superuser of the backed up cluster")
    p.add_argument("-v", "--verbose", action="store_true", help="print each check's details too")
    add_json_flag(p, '{"ok", "summary", "checks": {name: {status, summary, details}}, "recorded"}')
    add_storage_flag(p)
    add_key_flags(p)
    p.set_defaults(run=_verify)


def _verify(args: argparse.Namespace) -> int:
    from pg_safe_backup.catalog import entry_path
    from pg_safe_backup.files.crypt import CryptError
    from pg_safe_backup.storage import StorageError, location, storage_options
    from pg_safe_backup.verify import CheckNotRun, record_check

    began = time.monotonic()
    try:
        key = encryption_key(args)
        backup = location(args.backup_dir, storage_options(args.storage_option), "BACKUP")
    except (CryptError, StorageError) as err:
        raise Failed(err, USAGE) from None
    try:
        _folder(backup, args.backup_dir, "BACKUP")
        report = _check(args, backup, key)
    except (CheckNotRun, CryptError, StorageError, OSError) as err:  # no verdict: never a FAIL
        raise Failed(err, NO_VERDICT) from None
    recorded = record_check(backup, report, time.monotonic() - began, "pg-safe-backup verify", _warn, key)
    if args.json:
        emit(_flags_in({**report.as_dict(), "recorded": str(entry_path(backup)) if recorded else None}))
        return OK if report.ok else FAILED
    out(flag_names(report.summary()))
    if recorded:
        out(f"recorded in {entry_path(backup)}")
    if args.verbose:
        for step in report.steps:
            out(f"{step.name}:")
            for name, value in step.details.items():
                out(f"  {name}: {flag_names(str(value))}")
    return OK if report.ok else FAILED


def _warn(line: str) -> None:
    print(f"warning: {line}", file=sys.stderr)


def _check(args: argparse.Namespace, backup: Any, key: EncryptionKey | None = None) -> BackupCheck:
    """:func:`check_backup` of ``backup`` (a path, or a path object of an object store) as the CLI's flags
    say."""
    from pg_safe_backup.verify import check_backup

    return check_backup(
        backup,
        args.wal_archive,
        stop_lsn=args.stop_lsn,
        page_lsns=not args.no_page_lsn,
        manifest=not args.no_verifybackup,
        restore=not args.no_restore,
        verifier_bindir=args.verifier_bindir,
        invariant_sql=args.invariant_sql,
        invariant_db=args.invariant_db,
        work_dir=args.work_dir,
        keep=args.keep,
        timeout=args.timeout,
        bindir=args.bindir,
        recovery_target_immediate=not args.to_end_of_archive,
        require_backup_label=not args.allow_missing_label,
        user=args.user,
        use_backup_pg_wal=args.use_backup_pg_wal,
        archive_key=key,
        progress=lambda line: print(line, file=sys.stderr, flush=True),
        encryption_key=key,
    )


# ------------------------------------------------------------------------------ an encrypted archive
def add_key_flags(p: argparse.ArgumentParser) -> None:
    """``--encryption-key-file FILE | --encryption-key-env NAME``: the key of what the command reads or
    writes (an encrypted WAL archive, an encrypted backup: one key, one pair of flags, added once).

    :param p: the subcommand's parser.
    """
    keys = p.add_mutually_exclusive_group()
    try:
        keys.add_argument(
            "--encryption-key-file",
            type=Path,
            metavar="FILE",
            help="the encryption key in FILE: 64 hex digits (openssl rand -hex 32)",
        )
        keys.add_argument(
            "--encryption-key-env", metavar="NAME", help="the environment variable holding the key"
        )
    except argparse.ArgumentError:
        pass  # already there: another part of the command added the same pair


def archive_key(args: argparse.Namespace) -> ArchiveKey | None:
    """The key the flags name, and how a restored server's wal-fetch names it again (None: none given).

    :raises CryptError: the file or variable holds no key (named with its flag).
    """
    from pg_safe_backup.restore import ArchiveKey

    if getattr(args, "encryption_key_file", None) is not None:
        return ArchiveKey.from_file(args.encryption_key_file)
    if getattr(args, "encryption_key_env", None) is not None:
        return ArchiveKey.from_env(args.encryption_key_env)
    return None


# ---------------------------------------------------------------------------------------------- list
LIST_DESCRIPTION = """List the backups under ROOT (folders holding backup_label, backup_manifest or base.tar,
or with a catalog entry beside them), unproven first, then oldest first by stop LSN: when each started,
its age (since it stopped), how long it took (start to stop), its size, its cluster (the system
identifier's last 6 digits, as pg_controldata ends it), start and stop LSN, timeline, format, whether it
proves itself (proven / UNVERIFIABLE / incomplete, each reason named) and whether its newest check passed."""
LIST_EPILOG = """example:
  pg-safe-backup list /backups/main
  pg-safe-backup list /backups/main --json | jq '.[-1].proof.stop_lsn'
  pg-safe-backup list /backups --json | jq -r '.[] | "\\(.cluster) \\(.age_seconds) \\(.folder)"'"""


def add_list_arguments(p: argparse.ArgumentParser) -> None:
    """The ``pg-safe-backup list`` command's arguments (the CLI and ``python -m pg_safe_backup``).

    :param p: the subcommand's parser.
    """
    p.add_argument(
        "root",
        metavar="ROOT",
        help="the folder the backups are stored under, or an object-store URL (s3://...)",
    )
    add_json_flag(
        p,
        "an array of {folder, status, verified, proof, info, info_error, cluster, age_seconds,"
        " duration_seconds}",
    )
    add_storage_flag(p)
    add_key_flags(p)
    p.set_defaults(run=_list)


def add_storage_flag(p: argparse.ArgumentParser) -> None:
    """``--storage-option KEY=VALUE`` (repeated): fsspec options of an object-store URL (endpoint_url,
    profile, anon ...), beside the store's own credential chain (environment, profiles).

    :param p: the subcommand's parser.
    """
    p.add_argument(
        "--storage-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an fsspec option of an object-store URL, e.g. endpoint_url=http://127.0.0.1:9000 (repeat it)",
    )


def _list(args: argparse.Namespace) -> int:
    from datetime import datetime, timezone

    from pg_safe_backup.catalog import format_listing, list_backups
    from pg_safe_backup.files.crypt import CryptError
    from pg_safe_backup.storage import StorageError, location, storage_options

    try:
        root = location(args.root, storage_options(args.storage_option))
        key = encryption_key(args)
    except (CryptError, StorageError) as err:
        raise Failed(err, USAGE) from None
    try:
        _folder(root, args.root, "ROOT")
        entries = list_backups(root, key=key)
    except OSError as err:  # an object store out of reach
        raise Failed(err) from None
    now = datetime.now(timezone.utc)
    if args.json:
        emit([e.as_dict(now) for e in entries])
    else:
        out(format_listing(entries, now))
    return OK


# ----------------------------------------------------------------------------------------- retention
#: Broken into lines: the subcommand's help keeps its layout (for the epilog's example).
RETENTION_DESCRIPTION = (
    "Keep the newest N backups of ROOT and/or those within D days (always the newest verified one),\n"
    "delete the others, then the WAL archive's files older than the oldest kept backup's start\n"
    "(as pg_archivecleanup)."
)
RETENTION_EPILOG = """example:
  pg-safe-backup retention /backups/main --keep-last 7 --wal-archive /wal/main --dry-run
  pg-safe-backup retention /backups/main --keep-last 7 --keep-days 30 --wal-archive /wal/main

Only backups that prove themselves (backup_label listed with its checksum in a backup_manifest whose own
checksum holds, WAL-Ranges agreeing with the label) are counted: an unverifiable or incomplete one is
neither counted nor deleted, it is listed for a person to look at. Nothing is deleted when no proven
backup would be kept. Exits 0 when done (or planned, with --dry-run), 1 when refused (nothing removed) or
when a deletion failed (what went before it is listed), 2 on a bad flag or value (nothing removed)."""


def add_retention_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``pg-safe-backup retention``.

    :param p: the (sub)parser to add them to; its ``run`` default carries retention out.
    """
    p.add_argument(
        "root",
        metavar="ROOT",
        help="the folder holding the backups (searched for backups on disk), or an object-store URL",
    )
    p.add_argument("--keep-last", type=int, metavar="N", help="keep the newest N backups")
    p.add_argument("--keep-days", type=float, metavar="D", help="keep the backups started within D days")
    p.add_argument(
        "--wal-archive",
        metavar="DIR_OR_URL",
        help="the WAL archive to clean up below the oldest kept backup's start (default: leave WAL alone)",
    )
    p.add_argument(
        "--dsn",
        metavar="CONNINFO",
        help="the live cluster (libpq string or URI): leave alone backups of another system identifier or"
        " ending beyond its current WAL position",
    )
    p.add_argument("--dry-run", action="store_true", help="print what would go; change nothing")
    add_json_flag(
        p,
        '{"ok", "dry_run", "kept": {folder: [why]}, "deleted": [folder] (or would be),'
        ' "skipped": {folder: why}, "wal_cutoff", "wal_removed" (a count), "wal_first_removed",'
        ' "wal_last_removed"}',
    )
    add_storage_flag(p)
    add_key_flags(p)
    p.set_defaults(run=_retention)


def _retention(args: argparse.Namespace) -> int:
    if args.keep_last is None and args.keep_days is None:
        raise Failed("give --keep-last N and/or --keep-days D", USAGE)
    from pg_safe_backup.files.crypt import CryptError
    from pg_safe_backup.hooks.server import ServerUnreachable
    from pg_safe_backup.retention import RetentionRefused, carry_out_retention, plan_root, server_position
    from pg_safe_backup.storage import StorageError, location, storage_options

    try:
        key = encryption_key(args)
        options = storage_options(args.storage_option)
        root = location(args.root, options)
        wal_archive = location(args.wal_archive, options, "--wal-archive") if args.wal_archive else None
        _folder(root, args.root, "ROOT")
        if wal_archive is not None:
            _folder(wal_archive, args.wal_archive, "--wal-archive")
    except (CryptError, StorageError) as err:
        raise Failed(err, USAGE) from None
    try:
        server = server_position(args.dsn) if args.dsn else None
        plan = plan_root(root, keep_last=args.keep_last, keep_days=args.keep_days, server=server, key=key)
    except ServerUnreachable as err:
        raise Failed(f"--dsn: {error_line(err)}; removing nothing") from None
    except ValueError as err:  # a bad --keep-last or --keep-days (named as a parameter: flag_names)
        raise Failed(err, USAGE) from None
    except (RetentionRefused, OSError) as err:
        raise Failed(err) from None
    try:
        report = carry_out_retention(
            plan, wal_archive=wal_archive, dry_run=args.dry_run, log=for_a_person(args), key=key
        )
    except (RetentionRefused, OSError) as err:
        raise Failed(err) from None
    if args.json:
        emit({"ok": True, **report.as_dict()})
    return OK


# ------------------------------------------------------------------------------------------- restore
RESTORE_DESCRIPTION = (
    "Prepare TARGET_DIR from a stored backup so that `pg_ctl -D TARGET_DIR start` recovers it: the copy, its"
    " tablespaces, an empty pg_wal/, recovery.signal, restore_command and the recovery target."
)
RESTORE_EPILOG = """examples:
  # a point-in-time restore from the newest backup that ended before 06:00 UTC
  pg-safe-backup restore /backups/main /srv/pg-restored --latest-before 2026-11-26T06:00:00Z \\
      --target-time 2026-11-26T06:00:00Z --target-action promote --wal-archive /backups/wal
  # one backup to the end of the archive, tablespace 16384 into a new folder
  pg-safe-backup restore /backups/main/20261126T010000 /srv/pg-restored --wal-archive /backups/wal \\
      --tablespace 16384=/srv/pg-restored-space1
"""


def _tablespace_flag(text: str) -> tuple[str, Path]:
    oid, sep, folder = text.partition("=")
    if not sep or not oid.isdigit() or not folder:
        raise argparse.ArgumentTypeError(f"--tablespace wants OID=DIR, got {text!r}")
    return oid, Path(folder)


def _time_flag(text: str) -> datetime:
    from pg_safe_backup.catalog import parse_when

    try:
        return parse_when(text)  # Z, +00, UTC...: the forms PostgreSQL reads, on every Python
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_restore_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``pg-safe-backup restore``.

    :param p: the parser (or subcommand parser) to add them to; its ``run`` default runs the restore.
    """
    from pg_safe_backup.local_cluster import SERVER_USER
    from pg_safe_backup.restore import ARCHIVE_MODES, TARGET_ACTIONS

    p.add_argument(
        "backup",
        metavar="BACKUP",
        help="the backup folder or its object-store URL (s3://bucket/backups/20261126T010000, gs://, abfs://;"
        " with --latest-before: the backups' root)",
    )
    p.add_argument(
        "target_dir", type=Path, metavar="TARGET_DIR", help="the new data directory (absent or empty)"
    )
    p.add_argument(
        "--wal-archive",
        required=True,
        metavar="DIR_OR_URL",
        help="the WAL archive: a folder, or the URL of one wal-push manages (s3://bucket/wal, gs://, abfs://),"
        " read by the restored server's wal-fetch with the store's credentials in ITS environment",
    )
    p.add_argument(
        "--tablespace",
        type=_tablespace_flag,
        action="append",
        default=[],
        metavar="OID=DIR",
        help="restore tablespace OID to DIR instead of its original location (repeatable)",
    )
    p.add_argument(
        "--tablespace-root",
        type=Path,
        metavar="DIR",
        help="restore each tablespace not named by --tablespace to DIR/<OID>, not to its original location",
    )
    p.add_argument(
        "--bindir",
        type=Path,
        help="folder of pg_combinebackup, for an incremental backup (default: the backup's major's)",
    )
    p.add_argument("--target-time", type=_time_flag, help="stop at this time (ISO 8601; no zone: UTC)")
    p.add_argument("--target-lsn", help="stop at this LSN")
    p.add_argument("--target-name", help="stop at this restore point (pg_create_restore_point)")
    p.add_argument("--target-immediate", action="store_true", help="stop as soon as the backup is consistent")
    p.add_argument(
        "--target-action", choices=TARGET_ACTIONS, default="pause", help="at the target (default: pause)"
    )
    p.add_argument(
        "--target-timeline",
        default="latest",
        metavar="TIMELINE",
        help="the timeline to recover along: current (the backup's), latest (default, as PostgreSQL) or a"
        " number",
    )
    p.add_argument(
        "--latest-before",
        type=_time_flag,
        metavar="TIME",
        help="BACKUP is a root: use its newest backup that proves itself and ended before TIME (incomplete,"
        " unverifiable and failed ones are passed over, each named)",
    )
    p.add_argument(
        "--allow-failed",
        action="store_true",
        help="with --latest-before: also take a backup whose newest check FAILED",
    )
    p.add_argument(
        "--owner",
        default=SERVER_USER if os.geteuid() == 0 else None,
        help=f"OS user to own the data directory (as root; default {SERVER_USER})",
    )
    p.add_argument(
        "--restore-command",
        metavar="CMD",
        help="restore_command to fetch WAL with (default: pg-safe-backup wal-fetch from an archive wal-push"
        " manages, else cp from --wal-archive)",
    )
    p.add_argument(
        "--archive-mode",
        choices=ARCHIVE_MODES,
        default="off",
        help="off (default): the restored server does not archive, so a test restore never writes into the"
        " backed up cluster's archive; on: it archives with the backed up server's archive_command (a real"
        " replacement)",
    )
    p.add_argument(
        "--delta",
        action="store_true",
        help="TARGET_DIR is a stopped data directory of the backup's cluster (a standby to rebuild, a failed"
        " primary): write only the files that differ from the backup, remove what it does not hold",
    )
    add_json_flag(
        p,
        '{"ok", "backup", "skipped": {folder: why}, "target", "files", "bytes", "seconds", "delta", "kept",'
        ' "removed", "tablespaces", "configuration", "archive_mode", "settings", "notes", "start_command"}'
        " (the copy's progress on stderr)",
    )
    add_storage_flag(p)
    add_key_flags(p)
    p.set_defaults(run=_restore)


def _restore(args: argparse.Namespace) -> int:
    from pg_safe_backup.catalog import CatalogError, choose_backup, list_backups, one_cluster
    from pg_safe_backup.files.crypt import CryptError
    from pg_safe_backup.restore import RecoveryTarget, RestoreError, prepare_restore, start_command
    from pg_safe_backup.storage import StorageError, location, storage_options

    say = for_a_person(args)
    try:
        key = encryption_key(args)
        wal_key = archive_key(args)
        backup = location(args.backup, storage_options(args.storage_option), "BACKUP")
    except (CryptError, StorageError) as err:
        raise Failed(err, USAGE) from None
    skipped: dict[str, str] = {}
    try:
        _folder(backup, args.backup, "BACKUP")
        if args.latest_before is not None:
            entries = list_backups(backup.absolute() if isinstance(backup, Path) else backup, key=key)
            one_cluster(entries, backup)  # never another cluster's backup
            choice = choose_backup(entries, before=args.latest_before, allow_failed=args.allow_failed)
            for name, why in choice.skipped:
                skipped[name] = why
                say(f"skipped {name}: {why}")
            picked = choice.picked
            if picked is None:
                raise RestoreError(
                    f"--latest-before: no backup under {backup} that proves itself ended before"
                    f" {args.latest_before.isoformat()}"
                )
            backup = picked.folder
            say(
                f"picked {backup} (label {picked.proof.label!r}, stop LSN {picked.proof.stop_lsn} on timeline"
                f" {picked.proof.stop_tli})"
            )

        began = time.monotonic()

        def report(done: int, total: int) -> None:
            seconds = time.monotonic() - began
            rate = done / 2**20 / seconds if seconds > 0 else 0.0
            left = f", {(total - done) / 2**20 / rate:.0f} s left" if rate > 0 and done < total else ""
            say(f"copied {done / 2**20:.1f} MB of {total / 2**20:.1f} MB, {rate:.1f} MB/s{left}")

        result = prepare_restore(
            backup,
            args.target_dir,
            wal_archive=args.wal_archive,
            recovery=RecoveryTarget(
                time=args.target_time,
                lsn=args.target_lsn,
                name=args.target_name,
                immediate=args.target_immediate,
                action=args.target_action,
                timeline=args.target_timeline,
            ),
            tablespaces=dict(args.tablespace),
            tablespace_root=args.tablespace_root,
            bindir=args.bindir,
            restore_command=args.restore_command,
            archive_key=wal_key,
            archive_mode=args.archive_mode,
            owner=args.owner,
            progress=report,
            encryption_key=key,
            delta=args.delta,
        )
    except (RestoreError, CatalogError, CryptError, StorageError, OSError) as err:
        raise Failed(err) from None
    placed = result.config.placed if result.config else {}
    notes = list(result.config.notes) if result.config else []
    if args.target_action == "pause" and (
        args.target_time or args.target_lsn or args.target_name or args.target_immediate
    ):
        notes.append(
            "recovery pauses at the target (--target-action pause): check the data, then run"
            " SELECT pg_wal_replay_resume(); to promote it, or restore again with another target"
        )
    fetching = "wal-fetch" in result.settings["restore_command"]
    if wal_key is not None and wal_key.flag == "--encryption-key-env" and fetching:
        notes.append(
            "the restored server's restore_command (wal-fetch) reads the key from"
            f" ${wal_key.value}: start the server with that variable in its environment"
        )
    start = start_command(result.target, result.owner)
    if args.json:
        emit(
            {
                "ok": True,
                "backup": str(backup),
                "skipped": skipped,
                "target": str(result.target),
                "files": result.files,
                "bytes": result.bytes,
                "seconds": round(result.seconds, 1),
                "delta": result.delta,
                "kept": result.kept,
                "removed": result.removed,
                "tablespaces": result.tablespaces,
                "configuration": placed,
                "archive_mode": result.archive_mode,
                "settings": result.settings,
                "notes": notes,
                "start_command": start,
            }
        )
        return OK
    for oid, place in result.tablespaces.items():
        out(f"tablespace {oid} ({place['original']}) restored to {place['restored_to']}")
    for original, place in placed.items():
        out(f"configuration {original} restored to {place}")
    out(
        f"restored {backup} into {result.target}: {result.files} files, {result.bytes / 2**20:.1f} MB in"
        f" {result.seconds:.1f} s"
        + (
            f" (--delta: {result.kept} files kept as they were, {result.removed} removed)"
            if result.delta
            else ""
        )
    )
    if result.archive_mode == "off":
        out(
            "archiving is off in the restored server (archive_mode = off, archive_command = ''): it never"
            " writes into the backed up cluster's archive; --archive-mode on for a real replacement"
        )
    else:
        out(
            "archiving is on (--archive-mode on): the restored server archives with the backed up server's"
            " archive_command, into that server's archive"
        )
    for note in notes:
        out(f"note: {note}")
    out(f"start it with:\n  {start}")
    return OK


# --------------------------------------------------------------------------------------------- check
CHECK_DESCRIPTION = (
    "Pre-flight check of a server to back up: its major, the role's privileges on every function a backup"
    " calls, wal_level, WAL archiving, data checksums, summarize_wal (--incremental), the state table, the"
    " data directory and free space when given; then a forced WAL switch and a bounded wait for that"
    " segment in the archive. One line per finding, its fix beside it."
)
CHECK_EPILOG = """examples:
  pg-safe-backup check --dsn "host=db1 user=backup dbname=postgres" --archive /var/lib/pgsb/wal
  pg-safe-backup check --dsn postgresql://backup@db1/postgres --archive s3://bucket/wal --incremental
  pg-safe-backup check --dsn "host=/run/postgresql" --pgdata /srv/pg/data --destination /backups/main

Exits 0 when ready (warnings allowed), 1 when a problem was found, 3 when something could not be checked
(the server or the archive out of reach): then there is no verdict; 2 on a bad flag or value."""


def add_check_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``pg-safe-backup check``.

    :param p: the (sub)parser to add them to; its ``run`` default runs the check.
    """
    p.add_argument(
        "--dsn", required=True, metavar="CONNINFO", help="the server to back up (libpq string or URI)"
    )
    add_archive_flag(p, "; none: trust pg_stat_archiver")
    p.add_argument("--pgdata", type=Path, metavar="PATH", help="the data directory as the copy reads it")
    p.add_argument("--destination", metavar="PATH", help="the folder backups go to: is there room for one?")
    p.add_argument(
        "--table", default="backup", metavar="NAME", help="the backup state table (default backup)"
    )
    p.add_argument("--table-schema", default="public", metavar="NAME", help="its schema (default public)")
    p.add_argument("--incremental", action="store_true", help="incremental backups are wanted (17+)")
    p.add_argument(
        "--require-checksums", action="store_true", help="data checksums off is a problem, not a warning"
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=60,
        metavar="S",
        help="seconds to wait for the WAL segment (default 60)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="print only what did not pass, and the verdict")
    add_json_flag(p, '{"ok", "server", "findings": [{check, level, message, fix}], "summary"}')
    p.set_defaults(run=_check_server)


def _check_server(args: argparse.Namespace) -> int:
    from pg_safe_backup.hooks.server import validate_identifier
    from pg_safe_backup.preflight import CheckRequest, Level, run_check

    try:
        request = CheckRequest(
            archive=args.archive or None,
            pgdata=args.pgdata,
            destination=args.destination,
            table=validate_identifier(args.table, "--table"),
            schema=validate_identifier(args.table_schema, "--table-schema"),
            incremental=args.incremental,
            require_checksums=args.require_checksums,
            timeout=args.timeout,
        )
        if not args.timeout > 0:
            raise ValueError(f"--timeout must be a number of seconds > 0, got {args.timeout:g}")
    except ValueError as err:
        raise Failed(err, USAGE) from None
    try:
        preflight = run_check(args.dsn, request)
    except PgSafeBackupError as err:  # the server out of reach, or the session broke: no verdict
        raise Failed(f"--dsn: {error_line(err)}", NO_VERDICT) from None
    status = OK if preflight.ok else FAILED if preflight.problems else NO_VERDICT
    if args.json:
        emit({**preflight.as_dict(), "summary": preflight.summary()})
        return status
    for finding in preflight.findings:
        if not (args.quiet and finding.level is Level.OK):
            out(finding.line())
    out(preflight.summary())
    return status


# -------------------------------------------------------------------------------- wal-push, wal-fetch
WAL_PUSH_DESCRIPTION = (
    "Archive one WAL file (archive_command's %p) into a local folder or an object store (s3://, gs://,"
    " abfs://): durable before it exits 0, never overwriting (the same file already archived is success,"
    " other content an error naming both checksums), refusing another cluster's segment; optionally"
    " compressed and encrypted."
)
WAL_PUSH_EPILOG = """examples (postgresql.conf):
  archive_command = 'pg-safe-backup wal-push --archive /backups/wal --compress zstd %p'
  archive_command = 'pg-safe-backup wal-push --archive s3://bucket/wal --compress lz4 \\
      --encryption-key-file /etc/pg-safe-backup/wal.key --parallel 4 %p'

Exits 0 once the file is durable in the archive, 1 otherwise (PostgreSQL keeps the file and asks again).
With --parallel N (as pgBackRest's archive-async) the first call starts a background pusher, one per spool
(pg_wal/pg_safe_backup_spool/ or --spool-dir), that pushes every .ready file, N at once, and records each
once it is durable; each call returns once its file's record is there, or exits 1 with the pusher's error
(the pusher tries that file again), or after 60 s without either.

--json prints {"ok": true, "wal": NAME} (or the error object) for a person or a script calling it by hand:
PostgreSQL's archiver reads only the exit status, and without --json a call is quicker (it skips the
command line's parser), so leave it out of archive_command."""
WAL_FETCH_DESCRIPTION = (
    "Fetch one WAL file (restore_command's %f into %p) from an archive wal-push wrote (or cp did):"
    " decrypted, decompressed, fsynced, renamed into place."
)
WAL_FETCH_EPILOG = """example (postgresql.conf of the restored server):
  restore_command = 'pg-safe-backup wal-fetch --archive s3://bucket/wal \\
      --encryption-key-env PGSB_KEY %f %p'

Exits 0 when %p is written; 1, printing nothing, when the archive does not hold %f (the end of the archive,
normal at the end of recovery); 255 on any other failure, a bad flag included, with one line on stderr:
above 125, so PostgreSQL stops recovery rather than take a wrong key or a damaged file for the end of the
archive. --json prints {"ok": true, "wal": %f, "path": %p} or the error object (its "exit_code" 1 or 255),
for a person or a script: PostgreSQL reads only the exit status."""
#: wal-fetch's status for a failure: PostgreSQL takes a restore_command's status above 125 as fatal
#: (xlogarchive.c, wait_result_is_any_signal), any other as "not archived".
FETCH_FAILED = 255


def add_archive_flag(p: argparse.ArgumentParser, default_note: str = "") -> None:
    """``--archive URL_OR_DIR``: the WAL archive, ``$PGSB_WAL_ARCHIVE`` by default (check, wal-push and
    wal-fetch).

    :param p: the subcommand's parser.
    :param default_note: what no archive at all means, after the default in the help.
    """
    p.add_argument(
        "--archive",
        metavar="URL_OR_DIR",
        default=os.environ.get("PGSB_WAL_ARCHIVE"),
        help="the WAL archive: a folder, file://, s3://bucket/prefix, gs://, abfs://"
        f" (default: $PGSB_WAL_ARCHIVE{default_note})",
    )


def _add_archive_arguments(p: argparse.ArgumentParser) -> None:
    """--archive and the key flags, shared by wal-push and wal-fetch."""
    add_archive_flag(p)
    add_key_flags(p)


def add_wal_push_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``pg-safe-backup wal-push``.

    :param p: the (sub)parser to add them to; its ``run`` default pushes.
    """
    _add_archive_arguments(p)
    p.add_argument(
        "--compress", choices=("none", "gzip", "lz4", "zstd"), default="none", help="default: none"
    )
    p.add_argument(
        "--parallel",
        type=int,
        default=1,
        metavar="N",
        help="push every .ready file through a background pusher, N at once (default 1: %%p alone, here)",
    )
    p.add_argument(
        "--spool-dir",
        type=Path,
        metavar="DIR",
        help="where --parallel records the files pushed ahead (default: pg_wal/pg_safe_backup_spool)",
    )
    p.add_argument("path", type=Path, metavar="%p", help="the file to archive, as PostgreSQL names it")
    add_json_flag(p, '{"ok": true, "wal": NAME} (by hand: not in archive_command)')
    p.set_defaults(run=_wal_push)


def add_wal_fetch_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``pg-safe-backup wal-fetch``.

    :param p: the (sub)parser to add them to; its ``run`` default fetches.
    """
    _add_archive_arguments(p)
    p.add_argument("name", metavar="%f", help="the file's name")
    p.add_argument("path", type=Path, metavar="%p", help="where to write it")
    add_json_flag(p, '{"ok": true, "wal": %%f, "path": %%p} (by hand: not in restore_command)')
    p.set_defaults(run=_wal_fetch)
    p.usage_status = FETCH_FAILED  # type: ignore[attr-defined]  # argparse's 2 is "not archived" to PostgreSQL


def _wal_push(args: argparse.Namespace) -> int:
    from pg_safe_backup.wal_archive import push_command

    if args.parallel < 1:
        raise Failed(f"--parallel {args.parallel}: give 1 or more", USAGE)
    errors: list[str] = []
    status = push_command(
        args.path,
        args.archive,
        compression=args.compress,
        parallel=args.parallel,
        spool_dir=args.spool_dir,
        key_file=args.encryption_key_file,
        key_env=args.encryption_key_env,
        failed=errors.append,
    )
    if args.json:  # push_command printed the error line already
        emit({"ok": True, "wal": args.path.name} if status == OK else _error_document(errors[-1], status))
    return status


def _wal_fetch(args: argparse.Namespace) -> int:
    from pg_safe_backup.wal_archive import WalNotArchived, fetch, open_store, required

    try:
        fetch(args.name, args.path, open_store(required(args.archive)), key=encryption_key(args))
    except WalNotArchived:  # the end of the archive: silent, as recovery asks past it every time
        if args.json:
            emit(_error_document(f"the archive does not hold {args.name}", FAILED))
        return FAILED
    except Exception as err:  # noqa: BLE001 - restore_command: one line in the server log, never a traceback
        raise Failed(err, FETCH_FAILED) from None
    if args.json:
        emit({"ok": True, "wal": args.name, "path": str(args.path)})
    return OK


# --------------------------------------------------------------------------------------- the command
#: Each subcommand: name, what adds its arguments, its line in the overview, its description and its
#: epilog (examples, kept as written).
SUBCOMMANDS = (
    (
        "verify",
        add_verify_arguments,
        "check a stored backup: page LSNs, pg_verifybackup, restore on a temporary server",
        VERIFY_DESCRIPTION,
        VERIFY_EPILOG,
    ),
    (
        "list",
        add_list_arguments,
        "list the backups under a folder: when, size, LSNs, timeline, verified",
        LIST_DESCRIPTION,
        LIST_EPILOG,
    ),
    (
        "retention",
        add_retention_arguments,
        "delete the backups a retention policy lets go, then the WAL they alone needed",
        RETENTION_DESCRIPTION,
        RETENTION_EPILOG,
    ),
    (
        "restore",
        add_restore_arguments,
        "prepare a data directory from a backup so that pg_ctl start recovers it (PITR)",
        RESTORE_DESCRIPTION,
        RESTORE_EPILOG,
    ),
    (
        "check",
        add_check_arguments,
        "pre-flight check of a server: privileges, settings, state table, WAL reaching the archive",
        CHECK_DESCRIPTION,
        CHECK_EPILOG,
    ),
    (
        "wal-push",
        add_wal_push_arguments,
        "archive_command: archive a WAL file durably, compressed and encrypted if asked",
        WAL_PUSH_DESCRIPTION,
        WAL_PUSH_EPILOG,
    ),
    (
        "wal-fetch",
        add_wal_fetch_arguments,
        "restore_command: fetch a WAL file from the archive wal-push writes",
        WAL_FETCH_DESCRIPTION,
        WAL_FETCH_EPILOG,
    ),
)


def main(argv: list[str] | None = None) -> int:
    """Run the ``pg-safe-backup`` command line; returns the exit status (:data:`EXIT_STATUSES`).

    Only the chosen subcommand's arguments are built (each may import its domain module for a default); the
    others appear in the overview by name.
    """
    try:
        return _run(sys.argv[1:] if argv is None else argv)
    finally:
        try:
            sys.stdout.flush()  # --help or --version into a closed pipe: quiet too
        except BrokenPipeError:
            _stdout_gone()


def _run(argv: list[str]) -> int:
    chosen = next((a for a in argv if not a.startswith("-")), None)
    parser = Parser(
        prog="pg-safe-backup",
        description=__doc__.split("\n\n")[0],
        epilog=EXIT_STATUSES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"pg-safe-backup {__version__}")
    parser.json_errors = "--json" in argv
    sub = parser.add_subparsers(dest="command", required=True)
    for name, add_arguments, overview, description, epilog in SUBCOMMANDS:
        p = sub.add_parser(
            name,
            help=overview,
            description=description,
            epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.json_errors = parser.json_errors
        if name == chosen:
            add_arguments(p)
    args, unknown = parser.parse_known_args(argv)
    command = sub.choices[args.command]
    if unknown:  # named by the subcommand, as each of its own errors is
        command.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return args.run(args)
    except Failed as failed:
        status, line = failed.status, str(failed)
    except (PgSafeBackupError, OSError) as err:  # one a subcommand did not foresee: one line, no traceback
        status, line = FAILED, str(Failed(err))
    if status == USAGE:
        command.error(line)
    print(f"pg-safe-backup {args.command}: error: {line}", file=sys.stderr)
    if getattr(args, "json", False):
        emit(_error_document(line, status))
    return status


if __name__ == "__main__":
    sys.exit(main())
