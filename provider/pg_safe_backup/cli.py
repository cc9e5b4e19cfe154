"""The ``pg-safe-backup`` console script: what a DBA runs on a machine with the backups.

Needs only this package and PostgreSQL's binaries (nothing of Airflow is imported).

``pg-safe-backup verify BACKUP_DIR [WAL_ARCHIVE]`` runs, in order, the page-LSN check, ``pg_verifybackup``
(when the copy has a backup_manifest) and the restore check, prints a verdict line and a line per check,
and exits 0 when none failed, 1 otherwise. Without WAL_ARCHIVE the backup must be self-contained (its
WAL in its pg_wal/).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pg_safe_backup.local_cluster import SERVER_USER


def _verify_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "verify",
        help="check a stored backup: page LSNs, pg_verifybackup, restore on a temporary server",
        description="Check a stored backup: the page-LSN check, pg_verifybackup against its backup_manifest,"
        " then the restore check (recover it on a temporary server, amcheck, an optional invariant).",
    )
    p.add_argument("backup_dir", type=Path)
    p.add_argument(
        "wal_archive", type=Path, nargs="?", help="the WAL archive; omit for a self-contained backup"
    )
    p.add_argument("--stop-lsn", help="the backup's stop LSN (default: from backup_manifest or the archive)")
    p.add_argument("--no-page-lsn", action="store_true", help="skip the page-LSN check")
    p.add_argument("--no-verifybackup", action="store_true", help="skip pg_verifybackup")
    p.add_argument("--no-restore", action="store_true", help="skip the restore check (the slow one)")
    p.add_argument("--verifier-bindir", type=Path, help="folder of pg_verifybackup (default: --bindir)")
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
    p.set_defaults(run=_verify)


def _verify(args: argparse.Namespace) -> int:
    from pg_safe_backup.verify import check_backup

    report = check_backup(
        args.backup_dir,
        args.wal_archive,
        stop_lsn=args.stop_lsn,
        page_lsns=not args.no_page_lsn,
        manifest=not args.no_verifybackup,
        restore=not args.no_restore,
        verifier_bindir=args.verifier_bindir or args.bindir,
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
    )
    print(report.summary())
    if args.verbose:
        for step in report.steps:
            print(f"{step.name}:")
            for key, value in step.details.items():
                print(f"  {key}: {value}")
    return 0 if report.ok else 1


def main(argv: list[str] | None = None) -> int:
    """Run the ``pg-safe-backup`` command line; returns the exit status."""
    parser = argparse.ArgumentParser(prog="pg-safe-backup", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _verify_parser(sub)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
