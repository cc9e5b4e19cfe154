"""File-system snapshots of a data directory and its tablespaces: take, make readable, delete.

A snapshot backup takes one snapshot per *volume* (a file system, or a btrfs subvolume) holding the data
directory or a tablespace, while backup mode is on: the tablespaces' volumes first, the data directory's last
(it holds ``global/pg_control``, which a backup of a standby needs copied last). Backup mode is then ended at
once and the copy engine reads the snapshots: each tablespace from ITS snapshot, since inside the data
directory's snapshot a ``pg_tblspc/<oid>`` link still points at the live tablespace.

Drivers (:class:`SnapshotDriver`): :class:`~pg_safe_backup.snapshots.btrfs.BtrfsDriver` (built in) and
:class:`~pg_safe_backup.snapshots.command.CommandDriver` (the user's snapshot / mount / delete command
templates: LVM, ZFS, a cloud CLI). Nothing here imports Airflow: the CLI deletes and restores kept snapshots
on a host with only this package.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pg_safe_backup.snapshots.base import (
    NAME_PREFIX,
    RECORD_NAME,
    KeptSnapshot,
    Snapshot,
    SnapshotDriver,
    SnapshotError,
    SnapshotExists,
    Volume,
    kept_name,
    plan_volumes,
    planned,
    readable_tree,
    snapshot_name,
    tablespace_links,
    volume_root,
)
from pg_safe_backup.snapshots.btrfs import BtrfsDriver
from pg_safe_backup.snapshots.command import CommandDriver


def take_all(
    driver: SnapshotDriver, snapshots: Sequence[Snapshot], log: Callable[[str], None] = lambda _: None
) -> list[Snapshot]:
    """Take ``snapshots`` in order; when one fails, delete those taken (and the failed one's leftovers) and
    raise. A snapshot folder that exists already is refused before anything is taken, naming it."""
    for snap in snapshots:
        if os.path.lexists(snap.path):
            raise SnapshotExists(
                f"snapshot folder {snap.path} already exists: another backup's, or left over (delete it, or"
                " choose another snapshot_dir)"
            )
    taken: list[Snapshot] = []
    try:
        for snap in snapshots:
            taken.append(snap)  # a failed take may leave a partial snapshot: delete it too
            driver.take(Path(snap.volume), Path(snap.path))
            log(f"snapshot of {snap.volume} taken: {snap.path}")
    except BaseException as err:
        problems = delete_all(driver, taken)
        if problems:
            raise SnapshotError(f"{err}; and could not delete: {'; '.join(problems)}") from err
        raise
    return taken


def read_tree(snapshots: Sequence[Snapshot], data_directory: Path | str) -> tuple[Path, dict[str, Path]]:
    """Each snapshot mounted where its driver mounts, then where the data directory and each tablespace are
    readable in them (:func:`~pg_safe_backup.snapshots.base.readable_tree`): what a copy-out or a restore
    reads."""
    for snap in snapshots:
        driver_from(snap.driver).mount(snap)
    return readable_tree(snapshots, data_directory)


def delete_all(driver: SnapshotDriver | None, snapshots: Sequence[Snapshot]) -> list[str]:
    """Delete ``snapshots`` (the data directory's first: the reverse of taking them), each with its own driver
    when ``driver`` is None. Returns the problems, one line each; goes on past one that fails."""
    problems = []
    for snap in reversed(snapshots):
        try:
            (driver or driver_from(snap.driver)).delete(snap)
        except (SnapshotError, OSError) as err:
            problems.append(f"{snap.path}: {err}")
    return problems


def driver_from(spec: Mapping[str, Any]) -> SnapshotDriver:
    """The driver ``spec`` describes (:meth:`SnapshotDriver.spec`)."""
    kind = spec.get("driver")
    if kind == "btrfs":
        return BtrfsDriver()
    if kind == "command":
        return CommandDriver(
            snapshot=spec["snapshot"],
            delete=spec["delete"],
            mount=spec.get("mount"),
            timeout=spec.get("timeout"),
        )
    raise SnapshotError(f"driver: unknown snapshot driver {kind!r} (btrfs, or command templates)")


__all__ = [
    "NAME_PREFIX",
    "RECORD_NAME",
    "KeptSnapshot",
    "BtrfsDriver",
    "CommandDriver",
    "Snapshot",
    "SnapshotDriver",
    "SnapshotError",
    "SnapshotExists",
    "Volume",
    "delete_all",
    "kept_name",
    "read_tree",
    "driver_from",
    "plan_volumes",
    "planned",
    "readable_tree",
    "snapshot_name",
    "tablespace_links",
    "take_all",
    "volume_root",
]
