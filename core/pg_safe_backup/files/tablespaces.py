"""Where a stored backup's tablespaces are: its tablespace_map, and the copies of each tablespace.

A backup's ``tablespace_map`` lists ``OID PATH``: the tablespace's location on the backed up server. The
backup of that location's contents (its ``PG_<major>_<catversion>`` folder) is looked up, first found wins,
in:

* ``overrides[OID]``,
* ``<BACKUP_DIR>_tablespaces/<OID>/`` (the layout of the provider's example DAG),
* ``<BACKUP_DIR>.tablespaces/<OID>/``,
* ``<BACKUP_DIR>/pg_tblspc/<OID>/`` when it is a real folder (not a link).

The original location is never used: it is the LIVE tablespace.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from pg_safe_backup.errors import PermanentError


class TablespaceNotCopied(PermanentError, ValueError):
    """A tablespace of the backup has no copy: only its live location is known."""


def parse_tablespace_map(text: str) -> list[tuple[str, str]]:
    """``OID PATH`` lines; PATH may contain backslash-escaped newlines/backslashes (PostgreSQL 13+)."""
    entries: list[tuple[str, str]] = []
    buf: list[str] = []
    escaped = False
    for ch in text:
        if escaped:
            buf.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch in "\n\r":
            line = "".join(buf)
            buf = []
            if line.strip():
                oid, _, path = line.partition(" ")
                entries.append((oid, path))
        else:
            buf.append(ch)
    if "".join(buf).strip():
        oid, _, path = "".join(buf).partition(" ")
        entries.append((oid, path))
    return entries


def escape_map_path(path: str) -> str:
    """A location as tablespace_map writes it: backslash, newline and carriage return escaped."""
    return "".join("\\" + c if c in "\\\n\r" else c for c in path)


def find_tablespace_copy(
    backup: Path, oid: str, original: str, overrides: Mapping[str | int, Path | str], major: int | None
) -> Path:
    """The folder holding the backup of tablespace ``oid`` (see the module docstring for where it is looked
    for), checked to hold a ``PG_<major>_*`` folder.

    :param backup: the copy of the data directory.
    :param oid: the tablespace's OID.
    :param original: its location on the backed up server, from tablespace_map (for messages).
    :param overrides: OID -> folder, looked at first.
    :param major: the backup's PostgreSQL major, or None not to check the folder's contents.
    :raises TablespaceNotCopied: no such folder, or one without the tablespace's contents.
    """
    spc = backup / "pg_tblspc"
    candidates = (
        ([Path(overrides[oid])] if oid in overrides else [])
        + ([Path(overrides[int(oid)])] if oid.isdigit() and int(oid) in overrides else [])
        + [
            backup.parent / f"{backup.name}_tablespaces" / oid,
            backup.parent / f"{backup.name}.tablespaces" / oid,
        ]
    )
    inside = spc / oid
    if inside.is_dir() and not inside.is_symlink():
        candidates.append(inside)
    source = next((c for c in candidates if c.is_dir()), None)
    if source is None:
        raise TablespaceNotCopied(
            f"tablespace {oid} ({original} in tablespace_map): no backup of it found in "
            + ", ".join(str(c) for c in candidates)
            + "; refusing to restore from the original location"
        )
    if major is not None and not any(p.name.startswith(f"PG_{major}_") for p in source.iterdir()):
        raise TablespaceNotCopied(
            f"tablespace {oid}: {source} has no PG_{major}_* folder (it holds"
            f" {sorted(os.listdir(source))}) instead of the contents of {original}"
        )
    return source


def tablespace_copies(
    backup_dir: Path | str, overrides: Mapping[str | int, Path | str] | None = None, major: int | None = None
) -> dict[str, Path]:
    """Tablespace OID -> the folder holding its backup, for each line of the backup's tablespace_map.

    :param backup_dir: the copy, with its tablespace_map (none: no tablespaces).
    :param overrides: OID -> folder, looked at first.
    :param major: the backup's PostgreSQL major, or None not to check the folders' contents.
    :raises TablespaceNotCopied: a tablespace without a backup.
    """
    backup = Path(backup_dir).absolute()
    map_file = backup / "tablespace_map"
    entries = parse_tablespace_map(map_file.read_text()) if map_file.exists() else []
    return {
        oid: find_tablespace_copy(backup, oid, original, overrides or {}, major) for oid, original in entries
    }


def link_tablespace_copies(copy_dir: Path | str) -> dict[str, Path]:
    """Point each ``pg_tblspc/<oid>`` link of a copy at that tablespace's copy, never at its live location.

    A file-system copy (``rsync -a``) keeps the links as they are on the server: to the LIVE tablespaces.
    Anything reading the copy through them (pg_verifybackup, a careless restore) reads live data. A restore
    with tablespace_map replaces these links anyway, so pointing them at the copies (relative links, so the
    backup can move) changes nothing a restore does.

    :param copy_dir: the copy, with its tablespace_map.
    :returns: tablespace OID -> its copy.
    :raises TablespaceNotCopied: a tablespace of the map has no copy.
    """
    copy_dir = Path(copy_dir).absolute()
    major = int((copy_dir / "PG_VERSION").read_text().strip())
    copies = tablespace_copies(copy_dir, None, major)
    for oid, source in copies.items():
        link = copy_dir / "pg_tblspc" / oid
        if link.is_dir() and not link.is_symlink():
            continue  # the tablespace was copied into the backup's own tree
        target = os.path.relpath(source, link.parent)
        if link.is_symlink() and os.readlink(link) == target:
            continue
        link.parent.mkdir(exist_ok=True)
        partial = link.with_name(f".{oid}.tmp")
        partial.unlink(missing_ok=True)
        partial.symlink_to(target)
        os.replace(partial, link)
    return copies
