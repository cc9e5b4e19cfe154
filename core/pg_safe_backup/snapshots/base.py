"""The snapshot drivers' common ground: what a snapshot is, which volumes a backup snapshots, and where the
copy reads each folder (see the package's docstring)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pg_safe_backup.errors import PermanentError

#: The name of a snapshot folder: the backup attempt it belongs to, and its volume's place in the plan.
NAME_PREFIX = "pgsb-"


class SnapshotError(PermanentError, RuntimeError):
    """A snapshot could not be taken, read or deleted; the message names it and the command's error."""


class SnapshotExists(SnapshotError):
    """The folder a snapshot would be taken into already exists (another backup's, or one left over)."""


@dataclass(frozen=True)
class Volume:
    """A file system (or btrfs subvolume) that holds the data directory or tablespaces.

    :param root: the volume's top folder (what a snapshot captures).
    :param sources: the folders of the backup inside it (data directory, tablespace locations).
    """

    root: str
    sources: tuple[str, ...]


@dataclass(frozen=True)
class Snapshot:
    """One snapshot of one volume, as taken for one backup attempt.

    :param volume: the live volume's root.
    :param path: the snapshot (the folder the driver created; what delete removes).
    :param sources: live folder -> where its contents are readable in the snapshot.
    :param driver: the driver's spec (:meth:`SnapshotDriver.spec`): enough to delete or read it later.
    """

    volume: str
    path: str
    sources: dict[str, str] = field(default_factory=dict)
    driver: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, value: Mapping[str, Any]) -> Snapshot:
        try:
            return cls(
                volume=str(value["volume"]),
                path=str(value["path"]),
                sources={str(k): str(v) for k, v in dict(value.get("sources") or {}).items()},
                driver=dict(value.get("driver") or {}),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise SnapshotError(f"not a snapshot record: {value!r} ({err})") from err


class SnapshotDriver(Protocol):
    """Takes, reads and deletes snapshots of volumes."""

    def spec(self) -> dict[str, Any]:
        """What rebuilds this driver (:func:`driver_from`): no secret, recorded in XCom and the catalog."""
        ...

    def volume_of(self, folder: Path) -> Path:
        """The root of the volume holding ``folder`` (what a snapshot of it captures)."""
        ...

    def take(self, volume: Path, snapshot: Path) -> None:
        """Snapshot ``volume`` into ``snapshot`` (absent before)."""
        ...

    def mount(self, snapshot: Snapshot) -> None:
        """Make ``snapshot`` readable at its path (after backup mode ended; a no-op for btrfs)."""
        ...

    def delete(self, snapshot: Snapshot) -> None:
        """Remove ``snapshot`` (unmounting it first where the driver mounts); absent: nothing to do."""
        ...


def volume_root(folder: Path) -> Path:
    """The top folder of the file system or btrfs subvolume holding ``folder``: its highest ancestor on the
    same device (``st_dev``; every btrfs subvolume has a device of its own)."""
    folder = Path(os.path.realpath(folder))
    dev = folder.stat().st_dev
    while folder.parent != folder and folder.parent.stat().st_dev == dev:
        folder = folder.parent
    return folder


def kept_name(attempt: str) -> str:
    """The base name of backup ``attempt``'s (the hold's try id) kept-snapshot entry; its snapshots' names
    add ``-<n>``."""
    return NAME_PREFIX + re.sub(r"[^A-Za-z0-9_.-]", "_", attempt)


def snapshot_name(attempt: str, index: int) -> str:
    """The base name of the ``index``-th snapshot of backup ``attempt``."""
    return f"{kept_name(attempt)}-{index}"


def plan_volumes(
    driver: SnapshotDriver, data_directory: Path, tablespaces: Mapping[str, Path]
) -> list[Volume]:
    """The volumes to snapshot, in the order to take them: the tablespaces' first, the data directory's last.

    :param driver: finds each folder's volume.
    :param data_directory: the live data directory.
    :param tablespaces: oid -> live tablespace location (the ``pg_tblspc`` links' targets).
    """
    data_root = str(driver.volume_of(data_directory))
    roots: dict[str, list[str]] = {}
    for location in tablespaces.values():
        roots.setdefault(str(driver.volume_of(location)), []).append(os.path.realpath(location))
    roots.setdefault(data_root, []).append(os.path.realpath(data_directory))
    data_sources = roots.pop(data_root)
    return [Volume(r, tuple(s)) for r, s in roots.items()] + [Volume(data_root, tuple(data_sources))]


def tablespace_links(data_directory: Path) -> dict[str, Path]:
    """oid -> location of each tablespace of ``data_directory``: where its ``pg_tblspc`` links point (in a
    snapshot of the data directory, the LIVE location)."""
    folder = Path(data_directory) / "pg_tblspc"
    found: dict[str, Path] = {}
    for name in sorted(os.listdir(folder)) if folder.is_dir() else []:
        link = folder / name
        if name.isdigit() and link.is_symlink():
            found[name] = Path(os.path.normpath(folder / os.readlink(link)))
    return found


def planned(
    snapshot_dir: Path, attempt: str, volumes: Sequence[Volume], driver: SnapshotDriver
) -> list[Snapshot]:
    """The snapshots of ``volumes`` for ``attempt`` under ``snapshot_dir``, not taken yet."""
    found = []
    for index, volume in enumerate(volumes):
        path = Path(snapshot_dir) / snapshot_name(attempt, index)
        sources = {
            s: str(path if s == volume.root else path / os.path.relpath(s, volume.root))
            for s in volume.sources
        }
        found.append(Snapshot(volume.root, str(path), sources, driver.spec()))
    return found


def readable_tree(snapshots: Sequence[Snapshot], data_directory: Path | str) -> tuple[Path, dict[str, Path]]:
    """Where the data directory, and each tablespace (oid -> folder), are readable in ``snapshots``.

    Each tablespace is read from its own snapshot, never through the data directory snapshot's
    ``pg_tblspc`` link (which points at the LIVE tablespace).
    """
    where = {live: Path(p) for snap in snapshots for live, p in snap.sources.items()}
    data = where.get(os.path.realpath(data_directory))
    if data is None:
        raise SnapshotError(f"no snapshot holds the data directory {data_directory}")
    tablespaces: dict[str, Path] = {}
    for oid, link in tablespace_links(data).items():
        live = os.path.realpath(link)  # the name it was planned under (the snapshot holds what is there)
        if live not in where:
            raise SnapshotError(
                f"tablespace {oid} ({live}) has no snapshot: it was created after the snapshots were planned"
            )
        tablespaces[oid] = where[live]
    return data, tablespaces


#: A kept snapshot's record in its catalog entry folder: the live data directory and every snapshot
#: (:class:`Snapshot`), so that ``pg-safe-backup`` lists, proves, restores and removes it without Airflow.
RECORD_NAME = "snapshot.json"


@dataclass(frozen=True)
class KeptSnapshot:
    """A backup kept as snapshots: its catalog entry folder holds the label files, the manifest and this
    record; the data is in the snapshots.

    :param data_directory: the live data directory the snapshots were taken of.
    :param snapshots: the snapshots, in the order they were taken.
    """

    data_directory: str
    snapshots: tuple[Snapshot, ...]

    def to_json(self) -> bytes:
        return json.dumps(
            {"data_directory": self.data_directory, "snapshots": [s.to_dict() for s in self.snapshots]},
            indent=1,
        ).encode()

    @classmethod
    def read(cls, folder: Path) -> KeptSnapshot | None:
        """The record in ``folder``, None when it has none; :class:`SnapshotError` when it is unreadable, or
        names anything but the entry's own snapshots, ``<folder>-<n>`` beside it in the order taken: it is a
        file's word, and restore reads, retention deletes, what it names."""
        folder = Path(folder)
        path = folder / RECORD_NAME
        if not path.is_file():
            return None
        try:
            value = json.loads(path.read_text())
            kept = cls(str(value["data_directory"]), tuple(Snapshot.from_dict(s) for s in value["snapshots"]))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise SnapshotError(f"{path} is not a kept snapshot's record: {err}") from err
        for index, snap in enumerate(kept.snapshots):
            if Path(snap.path) != folder.parent / f"{folder.name}-{index}":
                raise SnapshotError(
                    f"{path} names {snap.path}, not one of its own snapshots"
                    f" ({folder.parent}/{folder.name}-<n>)"
                )
        return kept

    def tree(self) -> tuple[Path, dict[str, Path]]:
        """Where the data directory and each tablespace are readable (:func:`readable_tree`); SnapshotError
        when a snapshot is gone."""
        for snap in self.snapshots:
            if not Path(snap.path).is_dir():
                raise SnapshotError(f"snapshot {snap.path} is gone")
        return readable_tree(self.snapshots, self.data_directory)
