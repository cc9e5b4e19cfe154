"""The ``pg-safe-backup`` console script: what a DBA runs on a machine with the backups.

Needs only this package and PostgreSQL's binaries (nothing of Airflow is imported).

``pg-safe-backup list ROOT`` lists the backups under ROOT, each proven from its own files, oldest first.

``pg-safe-backup verify BACKUP_DIR [WAL_ARCHIVE]`` runs, in order, the page-LSN check, ``pg_verifybackup``
(when the copy has a backup_manifest) and the restore check, prints a verdict line and a line per check,
and exits 0 when none failed, 1 otherwise. Without WAL_ARCHIVE the backup must be self-contained (its
WAL in its pg_wal/).

``pg-safe-backup retention ROOT --keep-last N --keep-days D --wal-archive DIR [--dry-run]`` deletes the
backups of ROOT the policy lets go, then the archive's WAL older than the oldest kept backup's start; one
line per backup kept, deleted or left alone, with the reason.

``pg-safe-backup restore BACKUP TARGET_DIR --wal-archive DIR [--target-time T | --target-lsn L |
--target-name N | --target-immediate] [--latest-before TIME]`` prepares TARGET_DIR so that ``pg_ctl start``
recovers the backup (see :mod:`pg_safe_backup.restore`), then prints that command.
"""

from __future__ import annotations

import argparse
import sys

from pg_safe_backup.catalog import LIST_DESCRIPTION, LIST_EPILOG, add_list_arguments
from pg_safe_backup.restore import RESTORE_DESCRIPTION, RESTORE_EPILOG, add_restore_arguments
from pg_safe_backup.retention import RETENTION_DESCRIPTION, RETENTION_EPILOG, add_retention_arguments
from pg_safe_backup.verify import VERIFY_DESCRIPTION, VERIFY_EPILOG, add_verify_arguments

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
)


def main(argv: list[str] | None = None) -> int:
    """Run the ``pg-safe-backup`` command line; returns the exit status."""
    parser = argparse.ArgumentParser(prog="pg-safe-backup", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, add_arguments, overview, description, epilog in SUBCOMMANDS:
        add_arguments(
            sub.add_parser(
                name,
                help=overview,
                description=description,
                epilog=epilog,
                formatter_class=argparse.RawDescriptionHelpFormatter,
            )
        )
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
