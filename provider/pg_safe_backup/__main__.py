"""``python -m pg_safe_backup`` and the ``pg-safe-backup`` console script: :func:`pg_safe_backup.cli.main`.

One shortcut before it: ``wal-push`` of a file that ``--parallel`` already pushed ahead is answered from its
spool record (:mod:`pg_safe_backup.files.walspool`) with nothing imported but ``os`` and ``json``, as
PostgreSQL's archiver calls ``archive_command`` once per file and waits for each. Any argument this shortcut
does not know sends the call the whole way (where the spool is checked again).
"""

from __future__ import annotations

import os
import sys

#: ``wal-push``'s flags that take a value (cli.py's ``add_wal_push_arguments``); the shortcut needs two.
_VALUE_FLAGS = (
    "--archive",
    "--spool-dir",
    "--parallel",
    "--compress",
    "--encryption-key-file",
    "--encryption-key-env",
)


def _pushed_ahead(argv: list[str]) -> bool:
    """Whether ``argv`` is ``wal-push ... %p`` for a file a push ahead recorded (see the module docstring)."""
    if argv[:1] != ["wal-push"]:
        return False
    values: dict[str, str] = {}
    paths: list[str] = []
    args = iter(argv[1:])
    for arg in args:
        flag, equals, value = arg.partition("=")
        if flag in _VALUE_FLAGS:
            values[flag] = value if equals else next(args, "")
        elif arg.startswith("-"):
            return False  # --help, a typo: argparse answers
        else:
            paths.append(arg)
    archive = values.get("--archive") or os.environ.get("PGSB_WAL_ARCHIVE")
    if len(paths) != 1 or not archive or values.get("--parallel", "1") == "1":
        return False
    from pg_safe_backup.files import walspool

    spool = walspool.spool_folder(paths[0], values.get("--spool-dir") or None)
    return walspool.answered(paths[0], walspool.archive_location(archive), spool)


def main() -> int:
    """The command line (``sys.argv``); returns the exit status."""
    if _pushed_ahead(sys.argv[1:]):
        return 0
    from pg_safe_backup.cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
