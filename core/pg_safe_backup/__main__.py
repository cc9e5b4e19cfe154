"""``python -m pg_safe_backup`` and the ``pg-safe-backup`` console script: :func:`pg_safe_backup.cli.main`.

One short way before it, for ``wal-push``, which PostgreSQL's archiver runs once per WAL file and waits for:
its flags are read here, without argparse or the CLI module, and the push is
:func:`pg_safe_backup.wal_archive.push_command`, the same function the CLI calls. A file the background
pusher (``--parallel``) already archived is answered from its spool record
(:mod:`pg_safe_backup.files.walspool`) with nothing imported but ``os`` and ``json``. Anything this short way
does not know (``--help``, a typo, a bad value, a second path) goes the whole way, where argparse answers.
The short way ends the process itself (``os._exit``), without the interpreter's teardown.
"""

from __future__ import annotations

import os
import sys

#: ``wal-push``'s flags that take a value (cli.py's ``add_wal_push_arguments``), and their keyword.
_VALUE_FLAGS = {
    "--archive": "archive",
    "--spool-dir": "spool_dir",
    "--parallel": "parallel",
    "--compress": "compression",
    "--encryption-key-file": "key_file",
    "--encryption-key-env": "key_env",
}
_COMPRESSIONS = ("none", "gzip", "lz4", "zstd")


def _wal_push_flags(argv: list[str]) -> dict[str, str] | None:
    """``wal-push``'s flags and ``%p`` by keyword (``path`` included), or None when argparse must answer."""
    if argv[:1] != ["wal-push"]:
        return None
    values: dict[str, str] = {}
    paths: list[str] = []
    args = iter(argv[1:])
    for arg in args:
        flag, equals, value = arg.partition("=")
        if flag in _VALUE_FLAGS:
            value = value if equals else next(args, None)
            if value is None or _VALUE_FLAGS[flag] in values:
                return None
            values[_VALUE_FLAGS[flag]] = value
        elif arg.startswith("-"):
            return None
        else:
            paths.append(arg)
    if len(paths) != 1 or values.get("compression", "none") not in _COMPRESSIONS:
        return None
    if not values.get("parallel", "1").isdigit() or int(values.get("parallel", "1")) < 1:
        return None
    values.setdefault("archive", os.environ.get("PGSB_WAL_ARCHIVE") or "")
    return {**values, "path": paths[0]}


def main() -> int:
    """The command line (``sys.argv``); returns the exit status (wal-push's short way exits the process)."""
    flags = _wal_push_flags(sys.argv[1:])
    if flags is None:
        from pg_safe_backup.cli import main as cli_main

        return cli_main()
    parallel = int(flags.pop("parallel", "1"))
    status = None
    if parallel > 1 and flags["archive"]:
        from pg_safe_backup.files import walspool

        spool = walspool.spool_folder(flags["path"], flags.get("spool_dir"))
        if walspool.answered(flags["path"], walspool.archive_location(flags["archive"]), spool):
            status = 0
    if status is None:
        from pg_safe_backup.wal_archive import push_command

        status = push_command(flags.pop("path"), flags.pop("archive"), parallel=parallel, **flags)
    # Done, and durable: skip the interpreter's teardown (a few ms of each archive_command call).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    sys.exit(main())
