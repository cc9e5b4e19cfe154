"""The btrfs driver: a read-only ``btrfs subvolume snapshot`` of each subvolume holding the backup.

Privileges: creating a snapshot needs write access to the snapshot folder and read access to the subvolume
(any user owning both, no root); deleting one needs root, or the file system mounted with
``user_subvol_rm_allowed`` (the driver then makes the snapshot writable first, as a user must). Snapshots are
taken read-only (``-r``): nothing, not even a mistaken restore, can write into a restore point.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

from pg_safe_backup.snapshots.base import Snapshot, SnapshotError, volume_root

#: The btrfs command line tool (btrfs-progs).
BTRFS = "btrfs"
#: The inode number of every btrfs subvolume's top folder.
SUBVOLUME_INODE = 256
#: Seconds a btrfs command may take (a snapshot is a metadata operation: well under a second).
TIMEOUT_S = 120.0


def btrfs(*args: str) -> str:
    """Run ``btrfs ARGS``; its output, or :class:`SnapshotError` with its error line."""
    try:
        done = subprocess.run(
            [BTRFS, *args], capture_output=True, text=True, errors="replace", timeout=TIMEOUT_S
        )
    except FileNotFoundError as err:
        raise SnapshotError("driver='btrfs': the btrfs command is not installed (btrfs-progs)") from err
    except subprocess.TimeoutExpired as err:
        raise SnapshotError(f"btrfs {' '.join(args)} did not end within {TIMEOUT_S:.0f}s") from err
    if done.returncode != 0:
        reason = " ".join((done.stderr or done.stdout).split()) or f"exit {done.returncode}"
        raise SnapshotError(f"btrfs {' '.join(args)} failed: {reason}")
    return done.stdout


class BtrfsDriver:
    """Snapshots of btrfs subvolumes (see the module's docstring for the privileges)."""

    def spec(self) -> dict[str, Any]:
        return {"driver": "btrfs"}

    def volume_of(self, folder: Path) -> Path:
        root = volume_root(folder)
        if root.stat().st_ino != SUBVOLUME_INODE:
            raise SnapshotError(
                f"driver='btrfs': {folder} is not on a btrfs subvolume (its volume's top folder {root} is not"
                " one): put the data directory and each tablespace on btrfs subvolumes"
            )
        return root

    def take(self, volume: Path, snapshot: Path) -> None:
        btrfs("subvolume", "snapshot", "-r", str(volume), str(snapshot))

    def mount(self, snapshot: Snapshot) -> None:
        if not Path(snapshot.path).is_dir():
            raise SnapshotError(f"snapshot {snapshot.path} is gone")

    def delete(self, snapshot: Snapshot) -> None:
        path = Path(snapshot.path)
        if not os.path.lexists(path):
            return
        if os.geteuid() != 0:  # a user may delete only a writable one (user_subvol_rm_allowed)
            btrfs("property", "set", "-f", "-ts", str(path), "ro", "false")
        btrfs("subvolume", "delete", str(path))
