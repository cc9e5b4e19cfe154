"""Run PostgreSQL's ``pg_verifybackup`` on a backup's copy and its backup_manifest.

pg_verifybackup only reads: it checks that every file of the manifest is in the copy with its size
and checksum, that no other file is (but for the few it ignores), and, unless told not to, that
``pg_waldump`` of the same release can read the WAL-Ranges from ``wal_path``. Root can read a data
directory owned by the server's user, so it runs as whoever runs this.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from pg_safe_backup.files.layout import BACKUP_INFO


class VerifyRun(NamedTuple):
    """One run of pg_verifybackup: whether it passed, what it printed (stdout then stderr), its command."""

    ok: bool
    output: str
    cmd: list[str]


def run_pg_verifybackup(
    copy_dir: Path,
    *,
    bindir: Path,
    wal_path: Path | None,
    skip_wal: bool,
    ignore: Sequence[str] = (),
    timeout: float = 600,
) -> VerifyRun:
    """Verify ``copy_dir`` against its ``backup_manifest`` with ``bindir``'s pg_verifybackup.

    :param copy_dir: the copy, with its backup_manifest.
    :param bindir: the folder of pg_verifybackup (and of a pg_waldump of the same release, needed
        unless ``skip_wal``).
    :param wal_path: the folder holding the WAL (an archive); None for the copy's own pg_wal/.
    :param skip_wal: do not parse the WAL (``-n``): pg_waldump reads only its own major's WAL, so a
        verifier of another major must skip it.
    :param ignore: paths relative to the copy not to check (``-i``), e.g. ``global/pg_control``,
        which a newer verifier of a version 2 manifest refuses for its control file version.
    :param timeout: seconds before the run is stopped (``subprocess.TimeoutExpired``).
    """
    cmd = [str(Path(bindir) / "pg_verifybackup")]
    if skip_wal:
        cmd.append("-n")
    elif wal_path is not None:
        # -w: "--wal-directory" up to 18, "--wal-path" from 19; the short option is both.
        cmd += ["-w", str(wal_path)]
    # The catalog's sidecar is never in the manifest (files/layout.py).
    sidecar = [BACKUP_INFO] if (Path(copy_dir) / BACKUP_INFO).exists() else []
    for path in [*ignore, *sidecar]:
        cmd += ["-i", path]
    cmd.append(str(copy_dir))
    done = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=timeout)
    return VerifyRun(done.returncode == 0, (done.stdout + done.stderr).strip(), cmd)


def tool_major(tool: Path) -> int | None:
    """The PostgreSQL major version of a client tool, from ``tool --version`` (e.g. ``pg_verifybackup
    (PostgreSQL) 15.18 (Debian ...)`` -> 15); None when it does not say.

    :param tool: the tool's path.
    """
    try:
        out = subprocess.run([str(tool), "--version"], capture_output=True, text=True, timeout=30).stdout
    except OSError:
        return None
    m = re.search(r"\(PostgreSQL\) (\d+)", out)
    return int(m.group(1)) if m else None
