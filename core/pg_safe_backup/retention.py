"""Retention carried out: the backups a :class:`~pg_safe_backup.catalog.RetentionPlan` lets go are deleted,
then the WAL archive files older than the oldest kept backup's start (pg_archivecleanup's rule).

Only backups that prove themselves (:mod:`pg_safe_backup.proof`: label, manifest, checksums, LSNs) are
counted, kept or deleted; the catalog entries are a cache and decide nothing. An unverifiable or
incomplete backup is named in every run and left alone, and never moves the WAL cut-off.

One place for the ``PostgresBackupRetentionOperator`` and ``pg-safe-backup retention``. Folders are local
``pathlib.Path`` or anything with its API (Airflow's ``ObjectStoragePath``): nothing of Airflow is imported.

The order is what keeps a crash in the middle safe:

1. Nothing at all goes unless a kept backup still proves itself, checked when the plan is carried out,
   not only when it was made.
2. Backups go first, oldest first; in each, backup_label goes first, so a half-deleted copy is never taken
   for a restorable backup (a restore and the checks refuse a copy without it); the next run names it as
   incomplete and leaves it for a person. Its catalog entry beside it goes after its folder. Nothing is
   deleted through a symbolic link.
3. WAL goes last, oldest first, and only below the oldest kept backup's START WAL file: a crash anywhere
   leaves every kept backup with all of its WAL (and perhaps WAL that nothing needs any more, which the
   next run removes).

A dry run goes through the same steps, logs the same lines ("would delete") and changes nothing.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from pg_safe_backup.catalog import (
    CatalogError,
    RetentionPlan,
    against_server,
    entry_path,
    list_backups,
    one_cluster,
    plan_retention,
    wal_to_remove,
)
from pg_safe_backup.errors import PermanentError
from pg_safe_backup.files.copier import is_local_path
from pg_safe_backup.files.crypt import EncryptionKey
from pg_safe_backup.files.xlog import wal_file_position
from pg_safe_backup.hooks.server import ServerPosition, server_position
from pg_safe_backup.proof import LABEL_NAME, prove_backup
from pg_safe_backup.snapshots import KeptSnapshot, Snapshot, delete_all

#: Where the copies of a backup's tablespaces may be kept beside it (files/tablespaces.py looks there).
TABLESPACE_SUFFIXES = ("_tablespaces", ".tablespaces")


class Place(Protocol):
    """A folder or file, local or in an object store (``pathlib.Path``, ``ObjectStoragePath``)."""

    @property
    def name(self) -> str: ...
    @property
    def parent(self) -> Place: ...
    def __truediv__(self, name: str) -> Place: ...
    def exists(self) -> bool: ...
    def is_dir(self) -> bool: ...
    def iterdir(self) -> Iterator[Place]: ...
    def unlink(self) -> None: ...


class RetentionRefused(PermanentError, RuntimeError):
    """Retention removed nothing, for the reason given (no proven backup kept, a plan at odds with the
    disk)."""


@dataclass
class RetentionReport:
    """What a retention run kept, deleted (or, dry, would delete) and left alone."""

    dry_run: bool
    #: Kept backup -> why.
    kept: dict[str, list[str]] = field(default_factory=dict)
    #: Deleted backup -> the folders removed (the backup's and its tablespace copies').
    deleted: dict[str, list[str]] = field(default_factory=dict)
    #: Backup left alone -> why.
    skipped: dict[str, str] = field(default_factory=dict)
    #: The first WAL file kept; None: no WAL archive was given, or no WAL may go.
    wal_cutoff: str | None = None
    #: The WAL archive's files removed, oldest first.
    wal_removed: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """JSON for XCom: the WAL as a count and its first and last names, not a list of thousands."""
        return {
            "dry_run": self.dry_run,
            "kept": self.kept,
            "deleted": sorted(self.deleted),
            "skipped": self.skipped,
            "wal_cutoff": self.wal_cutoff,
            "wal_removed": len(self.wal_removed),
            "wal_first_removed": self.wal_removed[0] if self.wal_removed else None,
            "wal_last_removed": self.wal_removed[-1] if self.wal_removed else None,
        }


def plan_root(
    root: Any,
    *,
    keep_last: int | None,
    keep_days: float | None,
    now: datetime | None = None,
    server: ServerPosition | None = None,
    key: EncryptionKey | None = None,
) -> RetentionPlan:
    """The retention plan of the backups under ``root``: :func:`~pg_safe_backup.catalog.plan_retention` of
    what :func:`~pg_safe_backup.catalog.list_backups` finds; those that do not prove themselves are
    neither counted nor deleted (``skipped``).

    :param root: a local folder or an ObjectStoragePath.
    :param keep_last: how many of the newest to keep (None: not by count).
    :param keep_days: keep those started within this many days (None: not by age).
    :param now: the time to count days from (default: now).
    :param server: the live cluster's identity and WAL position (``--dsn``): a backup it disowns (another
        system identifier, a stop LSN beyond its WAL) is left alone as unverifiable.
    :param key: the key of encrypted backups; without it they do not prove themselves and are left alone.
    :raises ValueError: neither ``keep_last`` nor ``keep_days``, or a bad one (named).
    :raises RetentionRefused: no backup under ``root`` (a mistyped root must not pass for an empty one),
        or backups of several clusters.
    """
    entries = list_backups(root, key=key)
    if server is not None:
        entries = against_server(entries, server.system_identifier, server.wal_position)
    plan = plan_retention(entries, keep_last=keep_last, keep_days=keep_days, now=now)  # checks keep_*
    if not entries:
        raise RetentionRefused(f"no backup found under {root}: removing nothing")
    try:
        one_cluster(entries, root)  # one policy and one WAL cut-off are a cluster's own
    except CatalogError as err:
        raise RetentionRefused(f"{err}; removing nothing") from err
    return plan


def carry_out_retention(
    plan: RetentionPlan,
    *,
    wal_archive: Any | None,
    dry_run: bool,
    log: Callable[[str], Any],
    key: EncryptionKey | None = None,
) -> RetentionReport:
    """Delete the backups ``plan`` lets go, then the WAL archive's files older than its cut-off (see the
    module docstring for the order and why).

    :param plan: :func:`plan_root` of the root (or :func:`~pg_safe_backup.catalog.plan_retention`).
    :param wal_archive: the archive folder (local or ObjectStoragePath); None: no WAL is removed.
    :param dry_run: change nothing; log and report what would go.
    :param log: called with one line per backup kept, deleted or left alone, and for the WAL.
    :param key: the key of encrypted backups (the kept ones are proven again with it).
    :raises RetentionRefused: no kept backup proves itself, or the plan would delete a kept backup or the
        WAL archive, or a backup through a link: nothing was removed.
    :raises OSError: a deletion failed (what was deleted before it is logged).
    """
    _check_plan(plan, wal_archive, key)
    report = RetentionReport(dry_run=dry_run, skipped=dict(plan.skipped))
    deleted, removed = ("would delete", "would remove") if dry_run else ("deleted", "removed")
    for entry in plan.keep:
        report.kept[entry.name] = plan.reasons[entry.name]
        log(f"keep      {entry.name}: {'; '.join(plan.reasons[entry.name])}")
    for name, why in plan.skipped.items():
        log(f"skip      {name}: {why}")
    for entry in plan.delete:
        folders = [entry.folder, *_tablespace_copies(entry.folder)]
        kept = KeptSnapshot.read(Path(entry.folder)) if is_local_path(entry.folder) else None
        snapshots = kept.snapshots if kept else ()
        existing = [Path(s.path) for s in snapshots if Path(s.path).exists()]  # as they were, for the report
        if not dry_run:
            for folder in folders:
                _remove_folder(folder, snapshots if folder is entry.folder else ())
        folders += existing
        report.deleted[entry.name] = [str(f) for f in folders]
        if not dry_run and (info := entry_path(entry.folder)).exists():
            info.unlink()  # after its folder: a half-deleted backup stays listed, as incomplete
        also = f" (and {', '.join(str(f) for f in folders[1:])})" if folders[1:] else ""
        log(f"{deleted:<9} {entry.name}{also}: not among {plan.policy or 'the kept'}")
    if wal_archive is None:
        log("WAL: no archive given, none removed")
        return report
    report.wal_cutoff = plan.wal_cutoff
    files = {p.name: p for p in wal_archive.iterdir()}
    report.wal_removed = wal_to_remove(files, plan.wal_cutoff)
    for name in report.wal_removed:
        if dry_run:
            log(f"would remove WAL {name}")
        else:
            files[name].unlink()
    first_last = f": {report.wal_removed[0]} .. {report.wal_removed[-1]}" if report.wal_removed else ""
    log(
        f"WAL: {removed} {len(report.wal_removed)} files of {wal_archive}{first_last}"
        f" (keeping from {plan.wal_cutoff}, the oldest kept backup's start)"
    )
    return report


def _check_plan(plan: RetentionPlan, wal_archive: Any | None, key: EncryptionKey | None) -> None:
    """Refuse a plan that would leave no proven backup, cut WAL a kept backup needs, delete an unproven
    backup, a kept one or the WAL archive (one inside a folder to delete), or delete through a link; and
    an archive that is not there (a mistyped one), before anything goes. Kept backups are proven again
    now: the disk may have changed since the plan was made."""
    if wal_archive is not None and not wal_archive.is_dir():
        raise RetentionRefused(
            f"the WAL archive {wal_archive} is not a folder: removing nothing"
            " (without --wal-archive / wal_archive, no WAL is removed)"
        )
    if not any(prove_backup(e.folder, key).ok for e in plan.keep):
        raise RetentionRefused(
            "no backup that proves itself (backup_label and backup_manifest agreeing) would be kept:"
            " removing nothing" + (f"; left alone: {', '.join(plan.skipped)}" if plan.skipped else "")
        )
    unproven = [e.name for e in plan.delete if not e.proof.ok]
    if unproven:
        raise RetentionRefused(f"the plan deletes unproven backups ({', '.join(unproven)}): removing nothing")
    links = [str(f) for e in plan.delete for f in (e.folder, entry_path(e.folder)) if _is_link(f)]
    if links:
        raise RetentionRefused(f"{', '.join(links)} is a link, never deleted through: removing nothing")
    cutoff = plan.wal_cutoff
    if cutoff is None or any(
        not e.proof.start_wal or wal_file_position(e.proof.start_wal) < wal_file_position(cutoff)
        for e in plan.keep
    ):
        raise RetentionRefused(
            f"the WAL cut-off {cutoff} is not at or before every kept backup's start: removing nothing"
        )
    kept = [_where(e.folder) for e in plan.keep] + ([_where(wal_archive)] if wal_archive is not None else [])
    # What is left alone stays too: an unproven folder inside a tablespace copy to delete is not deleted.
    # A link among them is compared as the link (abspath), not what it points to: never followed.
    kept += [os.path.abspath(name) if name.startswith("/") else name for name in plan.skipped]
    for entry in plan.delete:
        for folder in [entry.folder, *_tablespace_copies(entry.folder)]:
            where = _where(folder)
            inside = [k for k in kept if k == where or k.startswith(where.rstrip("/") + "/")]
            if inside:
                raise RetentionRefused(
                    f"deleting {folder} would delete {', '.join(inside)}, which is kept: removing nothing"
                )


def _where(place: Any) -> str:
    """A place as text to compare: a local path absolute, links resolved (``--wal-archive ../wal``)."""
    return str(place.resolve()) if is_local_path(place) else str(place)


def _is_link(place: Any) -> bool:
    return is_local_path(place) and Path(place).is_symlink()


def _tablespace_copies(folder: Any) -> list[Any]:
    """The folders beside a backup holding copies of its tablespaces (files/tablespaces.py), existing; a
    link there is left alone (never deleted through)."""
    return [
        c
        for s in TABLESPACE_SUFFIXES
        if (c := folder.parent / f"{folder.name}{s}").is_dir() and not _is_link(c)
    ]


def _remove_folder(folder: Any, snapshots: Sequence[Snapshot] = ()) -> None:
    """Remove a backup's folder, its backup_label first (see the module docstring); never a link. A kept
    snapshot's ``snapshots`` go after its label, each through its own driver, then its entry folder."""
    if _is_link(folder):
        raise RetentionRefused(f"{folder} is a link: never deleted through")
    label = folder / LABEL_NAME
    if label.exists():
        label.unlink()
    if problems := delete_all(None, snapshots):
        raise OSError(f"cannot delete the snapshots of {folder}: {'; '.join(problems)}")
    if is_local_path(folder):
        shutil.rmtree(folder)  # links inside (pg_tblspc) are removed, never followed
    elif folder.exists():
        folder.rmdir(recursive=True)


__all__ = [
    "RetentionRefused",
    "RetentionReport",
    "carry_out_retention",
    "plan_root",
    "server_position",
]
