"""The backups as their destination holds them: a catalog entry beside each, a listing of a root, and
the retention plan.

Every stored backup gets a catalog entry ``<folder>.backup_info.json`` BESIDE its top folder (never inside
it: the bare ``pg_verifybackup BACKUP`` would report a file the manifest does not list): what the backup
is (label, DAG run and attempt, system identifier, PostgreSQL major, start and stop LSN, times), what it
holds (format, bytes, files, the manifest's checksum) and how every later check of it went. A backup of
an earlier release keeps it inside its folder as ``backup_info.json``: it is read there too, and moved
beside the folder when a check is recorded.

The entry is a cache, never the authority: :func:`list_backups` finds backups by what is on disk and
proves each one from its own label and manifest (:mod:`pg_safe_backup.proof`); ordering, retention
(:func:`plan_retention`), ``--latest-before`` and the drill (:func:`choose_backup`) decide from the proof.
A malformed entry is named, never fatal. Nothing here deletes: the retention operator and the CLI carry a
plan out.

Nothing of Airflow is imported: the ``pg-safe-backup`` command uses this module on a machine with only
the backups.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Protocol

from pg_safe_backup.errors import PermanentError
from pg_safe_backup.files.copier import is_local_path
from pg_safe_backup.files.crypt import SUFFIX, EncryptionKey
from pg_safe_backup.files.layout import BACKUP_INFO
from pg_safe_backup.files.manifest import write_atomically
from pg_safe_backup.files.walarchive import parse_stored_name
from pg_safe_backup.files.xlog import (
    WAL_FILE,
    backup_start,
    label_start_time,
    parse_backup_label,
    start_wal_location,
    wal_file_holding,
    wal_file_position,
    wal_segment_name,
)
from pg_safe_backup.proof import LABEL_NAME, MANIFEST_NAME, Proof, prove_backup

#: The catalog entry of an earlier release, inside a backup's top folder (still read; moved on a write).
INFO_NAME = BACKUP_INFO
#: The catalog entry beside a backup's top folder: ``<folder name>.backup_info.json``.
ENTRY_SUFFIX = "." + BACKUP_INFO
#: Written first, then renamed to INFO_NAME (the earlier release's local folders; a restore skips it).
INFO_TMP = "backup_info.json.tmp"
#: What marks a folder as a backup on disk (a tar backup's base.tar has a compression suffix or none; an
#: encrypted backup's files end in .enc).
BACKUP_MARKS = (LABEL_NAME, MANIFEST_NAME, INFO_NAME, LABEL_NAME + SUFFIX, MANIFEST_NAME + SUFFIX)
#: The version of backup_info.json's layout; a reader refuses a newer one.
INFO_VERSION = 1
#: The WAL segment size when none is known (PostgreSQL's default).
DEFAULT_WAL_SEGMENT_SIZE = 16 << 20
#: Folders below a root searched for backups (root/cluster/date/backup is 3).
MAX_DEPTH = 4
#: The digits of a system identifier ``list`` shows as the cluster (two clusters told apart at a glance).
CLUSTER_DIGITS = 6
#: How a restore drill's check record's ``by`` begins (``drill DAG/RUN``): the page finds drills by it.
DRILL_BY = "drill "


#: The JSON type of each of BackupInfo's field types (checked when read).
_TYPES: dict[str, type] = {"str": str, "int": int, "bool": bool}


class CatalogError(PermanentError, ValueError):
    """A backup_info.json cannot be read or written (the message names it and says why)."""


class Folder(Protocol):
    """A folder, local or in an object store: ``pathlib.Path`` and ``ObjectStoragePath`` both are one."""

    name: str

    def __truediv__(self, name: str) -> Folder: ...
    def exists(self) -> bool: ...
    def is_dir(self) -> bool: ...
    def iterdir(self) -> Iterator[Folder]: ...
    def read_text(self) -> str: ...
    def write_bytes(self, data: bytes) -> Any: ...


@dataclass
class BackupInfo:
    """One stored backup: the contents of its backup_info.json.

    Times are ISO 8601 in UTC. ``stop_time`` is when the store task recorded the backup, at or after
    pg_backup_stop returned: a restore target later than it is always past the backup's end.
    """

    label: str
    start_lsn: str
    stop_lsn: str
    timeline: int
    start_wal: str
    stop_wal: str
    start_time: str | None
    stop_time: str
    system_identifier: str | None = None
    pg_major: int | None = None
    dag_id: str | None = None
    run_id: str | None = None
    task_id: str | None = None  # the store task
    map_index: int | None = None
    attempt: str | None = None  # the hold task's try (its UUID)
    format: str = "plain"
    compression: str | None = None
    bytes: int | None = None
    files: int | None = None
    manifest_checksum: str | None = None
    #: The id of the key the backup is encrypted with (never the key; each encrypted file's header names
    #: it too, and is what a reader trusts); None: not encrypted.
    encryption_key_id: str | None = None
    has_tablespace_map: bool = False
    #: An incremental backup's parent (the folder it was taken against) and that backup's Manifest-Checksum
    #: when it was taken: where to look first, and which one it was. The label's INCREMENTAL FROM lines,
    #: proven by the manifest, decide (:func:`pg_safe_backup.incremental.chain_of`).
    parent: str | None = None
    parent_manifest_checksum: str | None = None
    verifications: list[dict[str, Any]] = field(default_factory=list)
    version: int = INFO_VERSION

    @property
    def verified(self) -> bool:
        """The newest check of it passed."""
        return bool(self.verifications) and bool(self.verifications[-1].get("ok"))

    @property
    def stopped(self) -> datetime:
        """``stop_time`` as an aware datetime.

        :raises CatalogError: it is not an ISO 8601 time with a zone.
        """
        return aware_time(self.stop_time, "stop_time")

    def to_json(self) -> bytes:
        return (json.dumps(asdict(self), indent=1, sort_keys=True) + "\n").encode("utf-8")

    @classmethod
    def from_json(cls, text: str, where: str = "backup_info.json") -> BackupInfo:
        """Parse a backup_info.json.

        :param text: its contents.
        :param where: what to name in an error.
        :raises CatalogError: not JSON, a newer version, or a required field missing.
        """
        try:
            data = json.loads(text)
        except ValueError as err:
            raise CatalogError(f"{where} is not JSON: {err}") from err
        if not isinstance(data, dict):
            raise CatalogError(f"{where} is not a JSON object")
        if not isinstance(data.get("version", 0), int):
            raise CatalogError(f"{where}: version is {data['version']!r}, not a number")
        if data.get("version", 0) > INFO_VERSION:
            raise CatalogError(
                f"{where} has version {data['version']}, newer than this pg-safe-backup reads"
                f" ({INFO_VERSION})"
            )
        known = {f.name for f in fields(cls)}
        try:
            info = cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as err:
            raise CatalogError(f"{where} lacks a field: {err}") from err
        for f in fields(cls):  # a crafted or damaged type is named here, never a crash further on
            value, kind = getattr(info, f.name), str(f.type)
            wanted = _TYPES.get(kind.removesuffix(" | None"))
            if value is None and kind.endswith(" | None"):
                continue
            if wanted and (not isinstance(value, wanted) or (wanted is int and isinstance(value, bool))):
                raise CatalogError(f"{where}: {f.name} is {value!r}, not {kind}")
        if not isinstance(info.verifications, list) or not all(
            isinstance(v, dict) for v in info.verifications
        ):
            raise CatalogError(f"{where}: verifications is not a list of objects")
        try:
            info.stopped  # noqa: B018 - a naive or unparsable time is named here, not deep in a listing
        except CatalogError as err:
            raise CatalogError(f"{where}: {err}") from None
        return info


def label_time(backup_label: str) -> str | None:
    """The label's START TIME as ISO 8601 UTC, or None when it has none or a zone named only by an
    abbreviation (:func:`~pg_safe_backup.files.xlog.label_start_time`)."""
    when = label_start_time(parse_backup_label(backup_label).get("START TIME"))
    return when.astimezone(timezone.utc).isoformat() if when else None


def info_for_backup(
    *,
    backup_label: str,
    stop_lsn: str,
    tablespace_map: str | None = None,
    system_identifier: int | str | None = None,
    pg_major: int | None = None,
    wal_segment_size: int | None = None,
    stop_time: datetime | None = None,
    stop_timeline: int | None = None,
    **extra: Any,
) -> BackupInfo:
    """The BackupInfo of a backup pg_backup_stop ended: what its label and stop LSN say, plus ``extra``
    (dag_id, run_id, format, bytes, ...: the fields of :class:`BackupInfo`).

    :param backup_label: the label pg_backup_stop returned.
    :param stop_lsn: its stop LSN.
    :param tablespace_map: the tablespace_map returned (None or empty: none).
    :param system_identifier: the backed up cluster's.
    :param pg_major: the server's major version.
    :param wal_segment_size: the cluster's (default 16 MB): names the stop WAL file.
    :param stop_time: when the backup was recorded (default: now).
    :param stop_timeline: the timeline it stopped on, when not its start's (a standby that followed a
        promotion during the backup): names the stop WAL file.
    :raises ValueError: the label has no START WAL LOCATION.
    """
    start_lsn, timeline = backup_start(backup_label)
    label = parse_backup_label(backup_label)
    size = wal_segment_size or DEFAULT_WAL_SEGMENT_SIZE
    named = start_wal_location(label["START WAL LOCATION"])
    return BackupInfo(
        label=label.get("LABEL", ""),
        start_lsn=start_lsn,
        stop_lsn=stop_lsn,
        timeline=timeline,
        start_wal=named[1] if named else wal_file_holding(start_lsn, timeline, size),
        stop_wal=wal_segment_name(stop_lsn, stop_timeline or timeline, size),
        start_time=label_time(backup_label),
        stop_time=(stop_time or datetime.now(timezone.utc)).astimezone(timezone.utc).isoformat(),
        system_identifier=None if system_identifier is None else str(system_identifier),
        pg_major=pg_major,
        has_tablespace_map=bool(tablespace_map),
        **extra,
    )


def entry_path(folder: Folder) -> Folder:
    """Where the catalog entry of the backup in ``folder`` lives: ``<folder name>.backup_info.json`` beside
    it (local or object store).

    :param folder: the backup's top folder.
    """
    return folder.parent / f"{folder.name}{ENTRY_SUFFIX}"


def has_info(folder: Folder) -> bool:
    """Whether the backup in ``folder`` has a catalog entry (beside it, or inside it as before).

    :param folder: the backup's top folder.
    """
    return entry_path(folder).exists() or (folder / INFO_NAME).exists()


def write_info(folder: Folder, info: BackupInfo) -> str:
    """Write the catalog entry of the backup in ``folder``, beside it: a local one through a temporary
    file, synced and renamed, the parent folder synced (a reader sees the old or the whole new file); an
    object in one put, which is atomic. An entry of an earlier release inside ``folder`` is then removed:
    the bare ``pg_verifybackup`` passes on the backup from then on.

    :param folder: the backup's top folder.
    :param info: what to write.
    :returns: where it was written.
    """
    target = entry_path(folder)
    if is_local_path(folder):
        write_atomically(Path(target), info.to_json(), f".{target.name}.tmp")
    else:
        target.write_bytes(info.to_json())
    legacy = folder / INFO_NAME
    if legacy.exists():
        # Only after the new entry is durable; a removal a crash undoes leaves a stale copy that
        # read_info never prefers, and the next write removes it again.
        legacy.unlink()
    return str(target)


def read_info(folder: Folder) -> BackupInfo:
    """The catalog entry of the backup in ``folder``: beside it, else inside it (an earlier release's).

    :raises CatalogError: there is none, or it cannot be read.
    """
    for target in (entry_path(folder), folder / INFO_NAME):
        if target.exists():
            try:
                text = target.read_text()
            except (OSError, UnicodeDecodeError) as err:
                raise CatalogError(f"cannot read {target}: {err}") from err
            return BackupInfo.from_json(text, str(target))
    raise CatalogError(
        f"{folder} has no catalog entry ({entry_path(folder).name} beside it): not a backup stored by"
        " pg-safe-backup"
    )


def append_verification(
    folder: Folder, record: dict[str, Any], key: EncryptionKey | None = None
) -> BackupInfo:
    """Add the result of a check of the backup in ``folder`` to its catalog entry, with the manifest
    checksum the backup proves now: "the newest verified" honours a record only for that manifest.

    :param folder: the backup's top folder.
    :param record: JSON-able: at least ``ok`` (bool); ``at`` (ISO UTC) is added when missing.
    :param key: the key of an encrypted backup (without it its manifest proves nothing: no checksum).
    :returns: the updated info.
    :raises CatalogError: the backup has no catalog entry.
    """
    info = read_info(folder)
    proof = prove_backup(folder, key)
    info.verifications.append(
        {
            "at": datetime.now(timezone.utc).isoformat(),
            "manifest_checksum": proof.manifest_checksum,
            **record,
        }
    )
    write_info(folder, info)
    return info


@dataclass(frozen=True)
class CatalogEntry:
    """A backup found under a root: its folder, what it proves (:func:`~pg_safe_backup.proof.prove_backup`)
    and its catalog entry when it has a readable one (``info_error`` says why not)."""

    folder: Any  # Path or ObjectStoragePath
    info: BackupInfo | None
    proof: Proof = field(default_factory=lambda: Proof(ok=False, why="not proven"))
    info_error: str | None = None

    @property
    def name(self) -> str:
        return str(self.folder)

    @property
    def verified(self) -> bool:
        """Its newest check passed AND was of the manifest it proves now (a record of another manifest, or
        one without a checksum, proves nothing about this one)."""
        if not self.proof.ok or self.info is None or not self.info.verifications:
            return False
        last = self.info.verifications[-1]
        return bool(last.get("ok")) and last.get("manifest_checksum") == self.proof.manifest_checksum

    @property
    def failed(self) -> bool:
        """Its newest check failed."""
        return bool(self.info and self.info.verifications and not self.info.verifications[-1].get("ok"))

    @property
    def cluster(self) -> str | None:
        """Its cluster in short: the proven system identifier's last :data:`CLUSTER_DIGITS` digits (the end
        of what ``pg_controldata`` prints, to match by eye); None when nothing proves one."""
        sysid = self.proof.system_identifier
        return sysid[-CLUSTER_DIGITS:] if sysid else None

    @property
    def stopped(self) -> datetime | None:
        """When the store recorded it (its catalog entry's ``stop_time``, a cache: shown, never decided on);
        None without a readable entry."""
        try:
            return self.info.stopped if self.info else None
        except CatalogError:
            return None

    @property
    def duration(self) -> float | None:
        """Seconds from its start (the label's START TIME) to :attr:`stopped`; None when either is unknown."""
        if self.proof.start_time is None or self.stopped is None:
            return None
        return max(0.0, (self.stopped - self.proof.start_time).total_seconds())

    def age(self, now: datetime) -> float | None:
        """Seconds since it stopped (:attr:`stopped`), else since it started; None when neither is known.

        :param now: an aware time (a test may fix it).
        """
        since = self.stopped or self.proof.start_time
        return None if since is None else max(0.0, (now - since).total_seconds())

    def as_dict(self, now: datetime | None = None) -> dict[str, Any]:
        """JSON for ``list --json``: folder, status, proof, info (or its error); the short cluster id, the age
        and duration in seconds (None: unknown).

        :param now: the time the age is counted to (default: now).
        """
        age = self.age(now or datetime.now(timezone.utc))
        duration = self.duration
        return {
            "folder": self.name,
            "status": self.proof.status,
            "verified": _verified(self),
            "proof": self.proof.as_dict(),
            "info": asdict(self.info) if self.info else None,
            "info_error": self.info_error,
            "cluster": self.cluster,
            "age_seconds": None if age is None else round(age, 1),
            "duration_seconds": None if duration is None else round(duration, 1),
        }


def _is_link(place: Any) -> bool:
    """A local symbolic link (an object store has none)."""
    return is_local_path(place) and Path(place).is_symlink()


def _odd_name(name: str) -> bool:
    """A name no backup has: empty, ``.``, ``..`` or holding a separator (an object key can)."""
    return name in ("", ".", "..") or "/" in name or "\\" in name


def _looks_like_backup(names: set[str]) -> bool:
    return bool(names & set(BACKUP_MARKS)) or any(n.startswith("base.tar") for n in names)


def list_backups(
    root: Folder,
    max_depth: int = MAX_DEPTH,
    key: EncryptionKey | None = None,
    prove: Callable[[Folder, EncryptionKey | None], Proof] = prove_backup,
) -> list[CatalogEntry]:
    """Every backup under ``root`` (``root`` itself included), found by what is on disk: a folder holding
    backup_label, backup_manifest, base.tar* or a catalog entry, or with a catalog entry beside it. Each is
    proven from its own files; its catalog entry is read when it has one, and a malformed one is named in
    ``info_error``, never fatal. A symbolic link is never followed: it is listed as unverifiable. A catalog
    entry whose folder is gone is listed as incomplete. A backup's folder is not searched further, nor a
    data directory.

    Order: unproven first (by name), then proven by stop LSN and timeline (what the backup proves, never a
    clock in the JSON).

    :param root: a local folder or an ObjectStoragePath.
    :param max_depth: folders below ``root`` to search.
    :param key: the key of encrypted backups (one encrypted with another key, or without one given, is
        listed unproven, its key id named).
    :param prove: what proves each backup (default :func:`~pg_safe_backup.proof.prove_backup`; the Backups
        page passes one that remembers the proofs of folders unchanged since its last listing).
    """
    found: list[CatalogEntry] = []

    def backup(folder: Folder) -> None:
        info, error = None, None
        if has_info(folder):
            try:
                info = read_info(folder)
            except CatalogError as err:
                error = " ".join(str(err).split())
        found.append(CatalogEntry(folder, info, prove(folder, key), error))

    def visit(folder: Folder, depth: int) -> None:
        children = sorted(folder.iterdir(), key=lambda c: c.name)
        names = {c.name for c in children}
        folders = set()
        for child in children:
            if _odd_name(child.name):
                continue
            if _is_link(child):
                if child.is_dir():
                    target = os.readlink(child)
                    found.append(
                        CatalogEntry(child, None, Proof(ok=False, why=f"a link to {target}: never followed"))
                    )
                continue
            if not child.is_dir():
                continue
            folders.add(child.name)
            try:
                inside = {c.name for c in child.iterdir()}
            except OSError as err:  # one unreadable folder is named, never the end of the listing
                why = f"cannot read it: {' '.join(str(err).split())}"
                found.append(CatalogEntry(child, None, Proof(ok=False, why=why)))
                continue
            if _looks_like_backup(inside) or f"{child.name}{ENTRY_SUFFIX}" in names:
                backup(child)
            elif depth + 1 < max_depth and "PG_VERSION" not in inside:
                visit(child, depth + 1)
        for name in sorted(names):
            if name.endswith(ENTRY_SUFFIX) and name[: -len(ENTRY_SUFFIX)] not in folders:
                gone = name[: -len(ENTRY_SUFFIX)]
                if gone and not _odd_name(gone) and not _is_link(folder / gone):
                    found.append(
                        CatalogEntry(
                            folder / gone,
                            None,
                            Proof(
                                ok=False, why=f"a catalog entry ({name}) without its backup", incomplete=True
                            ),
                        )
                    )

    if root.exists() and root.is_dir():
        if _looks_like_backup({c.name for c in root.iterdir()}) or entry_path(root).exists():
            backup(root)
        elif max_depth > 0:
            visit(root, 0)
    found.sort(key=_order)
    return found


def _order(entry: CatalogEntry) -> tuple[tuple[int, int], str]:
    """Unproven first, then by the proven stop LSN (as a number: as text, 0/A000000 sorts after
    0/10000000) and timeline."""
    return entry.proof.position, entry.name


def proven(entries: Sequence[CatalogEntry]) -> list[CatalogEntry]:
    """The entries that prove themselves, oldest first (by stop LSN and timeline).

    :param entries: :func:`list_backups` of a root.
    """
    return sorted((e for e in entries if e.proof.ok), key=_order)


def one_cluster(entries: Sequence[CatalogEntry], root: Any) -> None:
    """Refuse a root that holds backups of more than one cluster, as their own files prove them: "the
    newest", a retention policy and a WAL cut-off are each a cluster's own.

    :param entries: :func:`list_backups` of ``root``.
    :param root: what to name in the error.
    :raises CatalogError: more than one proven system identifier among ``entries``.
    """
    clusters = sorted({e.proof.system_identifier for e in proven(entries) if e.proof.system_identifier})
    if len(clusters) > 1:
        raise CatalogError(
            f"{root} holds backups of {len(clusters)} clusters (system identifiers {', '.join(clusters)}):"
            " name the folder of one cluster's backups"
        )


def against_server(
    entries: Sequence[CatalogEntry], system_identifier: str, wal_position: int
) -> list[CatalogEntry]:
    """``entries`` with those the live cluster disowns made unverifiable: a backup proving another system
    identifier, or a stop LSN beyond the cluster's current WAL position (no backup of it can end where its
    WAL has not been yet: a crafted or foreign one).

    :param entries: :func:`list_backups` of a root.
    :param system_identifier: the live cluster's.
    :param wal_position: its current WAL position (an integer LSN).
    """
    checked = []
    for e in entries:
        p, why = e.proof, None
        if p.ok and p.system_identifier and p.system_identifier != system_identifier:
            why = f"of another cluster ({p.system_identifier}; the server is {system_identifier})"
        elif p.ok and p.position[0] > wal_position:
            why = f"its stop LSN {p.stop_lsn} is beyond the server's current WAL position"
        checked.append(replace(e, proof=replace(p, ok=False, why=why)) if why else e)
    return checked


@dataclass(frozen=True)
class RetentionPlan:
    """What a retention run keeps and deletes, and the WAL it lets go."""

    keep: list[CatalogEntry]
    delete: list[CatalogEntry]
    #: The first WAL file to keep (the oldest kept backup's proven START WAL file); None: remove no WAL.
    wal_cutoff: str | None
    #: Why each kept backup is kept: folder -> reasons.
    reasons: dict[str, list[str]]
    #: What is kept, in words ("the newest 2 and those within 7 days"): why the others go.
    policy: str = ""
    #: Backups neither kept nor deleted nor counted (unverifiable, incomplete), for a person: folder -> why.
    skipped: dict[str, str] = field(default_factory=dict)


def plan_retention(
    entries: Sequence[CatalogEntry],
    *,
    keep_last: int | None = None,
    keep_days: float | None = None,
    now: datetime | None = None,
) -> RetentionPlan:
    """Which backups to keep, among those that prove themselves: the newest ``keep_last`` (by proven stop
    LSN and timeline) and/or those whose label's START TIME is within ``keep_days`` days (an unknown age
    is kept), and always the newest verified one (a passed check recorded for the manifest it proves; the
    newest one if none): at least one proven backup stays, and each backup a kept incremental needs (its chain
    to its full, :func:`parent_finder`). The other proven ones go, and the WAL archive
    keeps files from the oldest kept backup's proven START WAL file on (pg_archivecleanup's rule).

    Unverifiable and incomplete backups are never counted, kept, deleted, nor move the cut-off: they are
    in ``skipped``, named. Two folders proving the same backup (same start and stop) are both skipped:
    a copy must not stand in for the backup. With no proven backup, nothing goes.

    :param entries: :func:`list_backups` of the root.
    :param keep_last: how many of the newest to keep (None: not by count).
    :param keep_days: keep those started within this many days of ``now`` (None: not by age).
    :param now: the time to count days from (default: now; a test may fix it).
    :raises ValueError: neither ``keep_last`` nor ``keep_days`` is given, or one is negative.
    """
    if keep_last is None and keep_days is None:
        raise ValueError("retention needs keep_last and/or keep_days")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be at least 1, got {keep_last}")
    if keep_days is not None and keep_days < 0:
        raise ValueError(f"keep_days must not be negative, got {keep_days}")
    now = now or datetime.now(timezone.utc)
    skipped = {e.name: _why_skipped(e) for e in entries if not e.proof.ok}
    twins: dict[tuple[Any, ...], list[CatalogEntry]] = {}
    for e in proven(entries):
        twins.setdefault(
            (e.proof.start_lsn, e.proof.start_tli, e.proof.stop_lsn, e.proof.stop_tli), []
        ).append(e)
    for same in (group for group in twins.values() if len(group) > 1):
        for e in same:
            others = ", ".join(o.name for o in same if o is not e)
            skipped[e.name] = f"UNVERIFIABLE: proves the same backup as {others}; left alone, check by hand"
    ordered = [e for e in proven(entries) if e.name not in skipped]
    reasons: dict[str, list[str]] = {}
    if keep_last is not None:
        for entry in ordered[-keep_last:]:
            reasons.setdefault(entry.name, []).append(f"one of the newest {keep_last}")
    if keep_days is not None:
        since = now - timedelta(days=keep_days)
        for entry in ordered:
            if entry.proof.start_time is None:
                reasons.setdefault(entry.name, []).append(
                    "age unknown (its label's START TIME has no offset)"
                )
            elif entry.proof.start_time >= since:
                reasons.setdefault(entry.name, []).append(f"within {keep_days:g} days")
    verified = [e for e in ordered if e.verified]
    if verified:
        reasons.setdefault(verified[-1].name, []).append("the newest verified backup")
    elif ordered:
        reasons.setdefault(ordered[-1].name, []).append("the newest backup (none was verified)")
    _keep_chains(ordered, reasons)
    keep = [e for e in ordered if e.name in reasons]
    delete = [e for e in ordered if e.name not in reasons]
    cutoff = min((str(e.proof.start_wal) for e in keep), key=wal_file_position) if keep else None
    rules = ([f"the newest {keep_last}"] if keep_last is not None else []) + (
        [f"those within {keep_days:g} days"] if keep_days is not None else []
    )
    return RetentionPlan(keep, delete, cutoff, reasons, policy=" and ".join(rules), skipped=skipped)


def parent_finder(entries: Sequence[CatalogEntry]) -> Callable[[CatalogEntry], CatalogEntry | None]:
    """A look-up of an incremental's parent among ``entries``: the backup whose proven start its label names
    (:attr:`~pg_safe_backup.proof.Proof.parent_key`); of two, the one its catalog entry names by
    Manifest-Checksum, else the last. It gives None for a full, or when the parent is not among them.
    ``entries`` are indexed once (a listing or a retention plan asks for each of thousands)."""
    starts: dict[tuple[int, int, str], list[CatalogEntry]] = {}
    for entry in entries:
        if (key := entry.proof.start_key) is not None:
            starts.setdefault(key, []).append(entry)

    def parent_of(child: CatalogEntry) -> CatalogEntry | None:
        key = child.proof.parent_key
        found = starts.get(key, []) if key is not None else []
        recorded = child.info.parent_manifest_checksum if child.info else None
        named = [e for e in found if e.proof.manifest_checksum == recorded]
        return (named or found or [None])[-1]

    return parent_of


def _keep_chains(ordered: Sequence[CatalogEntry], reasons: dict[str, list[str]]) -> None:
    """Keep every backup a kept incremental needs to restore: its parent, the parent's parent, to the full."""
    parent_of = parent_finder(ordered)
    for kept in [e for e in ordered if e.name in reasons]:
        child, seen = kept, set()
        while child.proof.incremental and child.name not in seen:
            seen.add(child.name)
            parent = parent_of(child)
            if parent is None:
                break
            reasons.setdefault(parent.name, [])
            why = f"in the chain of {kept.name}"
            if why not in reasons[parent.name]:
                reasons[parent.name].append(why)
            child = parent


def _why_skipped(entry: CatalogEntry) -> str:
    return f"{entry.proof.status}; left alone, check or delete it by hand"


def wal_to_remove(names: Iterable[str], cutoff: str | None) -> list[str]:
    """The archive files older than ``cutoff``: WAL segments and partial segments, as ``cp`` leaves them or
    compressed and/or encrypted as ``wal-push`` stores them (:mod:`pg_safe_backup.files.walarchive`), whose
    position (the name without its timeline) sorts before the cut-off's, as pg_archivecleanup decides.
    Timeline history files and backup history files are never removed, nor is anything else: a managed
    archive's identity file, a push's temporary file.

    :param names: the names in the WAL archive.
    :param cutoff: the first WAL file to keep (:attr:`RetentionPlan.wal_cutoff`); None: nothing.
    """
    if cutoff is None:
        return []
    if not WAL_FILE.match(cutoff):
        raise ValueError(f"{cutoff!r} is not a WAL file name")
    keep_from = wal_file_position(cutoff)
    return sorted(n for n in names if (wal := _archived_wal(n)) and wal_file_position(wal) < keep_from)


def _archived_wal(stored: str) -> str | None:
    """The WAL segment a stored file holds (whole or ``.partial``), None for any other file."""
    if m := WAL_FILE.match(stored):  # cp's, maybe with a compression of the user's own (.bz2, .xz ...)
        return m.group(1)
    parsed = parse_stored_name(stored)  # wal-push's: .gz / .lz4 / .zst, then .enc
    return m.group(1) if parsed is not None and (m := WAL_FILE.match(parsed.name)) else None


def aware_time(text: Any, what: str) -> datetime:
    """A time this package wrote into a catalog entry (``datetime.isoformat()`` of an aware time).

    :param text: the entry's value.
    :param what: its field, for the message.
    :raises CatalogError: it is not an ISO 8601 time with a zone.
    """
    try:
        when = datetime.fromisoformat(text)
    except (TypeError, ValueError):
        raise CatalogError(f"{what} {text!r} is not an ISO 8601 time") from None
    if when.tzinfo is None:
        raise CatalogError(f"{what} {text!r} has no time zone")
    return when


def parse_when(text: str) -> datetime:
    """A time from the command line, in the ISO 8601 forms PostgreSQL's timestamptz input also reads
    (``2026-11-26T06:00Z``, ``2026-11-26 06:00:00.25+05:30``, ``... +00``, ``... -0800``, ``... UTC``),
    parsed alike on every Python from 3.10; one without a zone is UTC.

    :raises ValueError: not such a time (the message shows the accepted forms).
    """
    # Parsed here, not by datetime.fromisoformat: before 3.11 it reads neither Z, +00, +0530 nor 1 to 5
    # fractional digits, and no version reads "UTC".
    m = re.fullmatch(
        r"(\d{4})-(\d\d)-(\d\d)(?:[Tt ](\d\d):(\d\d)(?::(\d\d)(?:[.,](\d{1,6}))?)?)?"
        r"(?: ?(?:Z|UTC|GMT)| ?(?P<sign>[+-])(?P<hh>\d\d)(?::?(?P<mm>\d\d))?)?",
        text.strip(),
        re.IGNORECASE,
    )
    try:
        if m is None:
            raise ValueError
        year, month, day, hour, minute, second = (int(part or 0) for part in m.groups()[:6])
        micro = int((m.group(7) or "").ljust(6, "0"))
        zone = timezone.utc
        if m.group("sign"):
            offset = timedelta(hours=int(m.group("hh")), minutes=int(m.group("mm") or 0))
            zone = timezone(-offset if m.group("sign") == "-" else offset)
        return datetime(year, month, day, hour, minute, second, micro, tzinfo=zone)
    except ValueError:
        raise ValueError(
            f"{text!r} is not a time: use ISO 8601, e.g. 2026-11-26T09:30:00Z, 2026-11-26 09:30:00.5+05:30,"
            " 2026-11-26 09:30+00, 2026-11-26 09:30:00-0800 or 2026-11-26 09:30:00 UTC (no zone: UTC)"
        ) from None


@dataclass(frozen=True)
class Choice:
    """The backup :func:`choose_backup` picked (None: none fits), and each newer one it passed over, why."""

    picked: CatalogEntry | None
    skipped: list[tuple[str, str]]


def choose_backup(
    entries: Sequence[CatalogEntry], *, before: datetime | None = None, allow_failed: bool = False
) -> Choice:
    """The newest backup to restore (``restore --latest-before``, the drill): by proven stop LSN and
    timeline, passing over incomplete and unverifiable backups, and those whose newest check failed
    (unless ``allow_failed``); with ``before``, also those that started at or after it (the label's START
    TIME) or whose catalog entry says they stopped at or after it (recovery cannot stop before the
    backup's end, so such a choice would fail). Each one passed over is named in ``skipped``, and every
    unproven one (it has no place in WAL to say whether it is newer).

    :param entries: :func:`list_backups` of a root.
    :param before: the restore target's time (None: the newest).
    :param allow_failed: take a backup whose newest check failed.
    """
    skipped: list[tuple[str, str]] = []
    picked = None
    for entry in sorted(entries, key=_order, reverse=True):
        why = _unfit(entry, before, allow_failed)
        if why is None and picked is None:
            picked = entry
        elif why is not None and (picked is None or not entry.proof.ok):
            skipped.append((entry.name, why))  # an unproven one has no place in WAL: named wherever it is
    return Choice(picked, skipped)


def _unfit(entry: CatalogEntry, before: datetime | None, allow_failed: bool) -> str | None:
    """Why ``entry`` cannot be chosen, or None."""
    if not entry.proof.ok:
        return entry.proof.status
    if entry.failed and not allow_failed:
        return "its newest check FAILED (--allow-failed / allow_failed takes it)"
    if before is None:
        return None
    if entry.proof.start_time is None and entry.info is None:
        return "its label's START TIME has no UTC offset and it has no catalog entry: no time to compare"
    if entry.proof.start_time is not None and entry.proof.start_time >= before:
        return f"started {entry.proof.start_time.isoformat()}, not before the target"
    # The entry's clock only narrows the choice among proven backups: a wrong pick is refused by recovery.
    if entry.info is not None and entry.info.stopped >= before:
        return f"stopped {entry.info.stop_time} (its catalog entry), not before the target"
    return None


def latest_before(entries: Sequence[CatalogEntry], when: datetime) -> CatalogEntry | None:
    """The newest backup fit to restore before ``when``: :func:`choose_backup`'s pick.

    :param entries: :func:`list_backups` of a root.
    :param when: the restore target's time.
    """
    return choose_backup(entries, before=when).picked


def human_bytes(size: float | None) -> str:
    """A size as a table shows it: ``12.3 GB``; ``?`` when unknown."""
    if size is None:
        return "?"
    for unit, scale in (("TB", 1 << 40), ("GB", 1 << 30), ("MB", 1 << 20), ("kB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{int(size)} B"


def _size(info: BackupInfo | None) -> str:
    return human_bytes(info.bytes if info is not None and isinstance(info.bytes, int) else None)


def verdict(entry: CatalogEntry) -> tuple[str, str | None]:
    """The newest check of a backup, as ``list`` and the Backups page show it: ``yes``, ``FAILED``, ``not of
    this manifest`` (it passed, but of another manifest than the backup proves now) or ``never``; and the
    time it records (None: never checked)."""
    if entry.info is None or not entry.info.verifications:
        return "never", None
    last = entry.info.verifications[-1]
    at = str(last.get("at", ""))
    if not last.get("ok"):
        return "FAILED", at
    return ("yes" if entry.verified else "not of this manifest"), at


def _verified(entry: CatalogEntry) -> str:
    """:func:`verdict` with its time to the minute: ``yes 2026-12-08 04:45``, ``FAILED ...``, ``never``,
    ``yes ... (not of this manifest)``."""
    word, at = verdict(entry)
    if at is None:
        return word
    at = to_the_minute(at)
    return f"yes {at} (not of this manifest)" if word == "not of this manifest" else f"{word} {at}"


def to_the_minute(at: str) -> str:
    """A check record's ISO time as the tables show it: ``2026-12-08 04:45``."""
    return at[:16].replace("T", " ")


def span(seconds: float | None) -> str:
    """A time span in at most two units, as a table shows it: ``0.7s``, ``45s``, ``4m12s``, ``3h05m``,
    ``2d03h`` (tenths below 10 s: a drill's restore of a small cluster is not "0s"); ``?`` when unknown."""
    if seconds is None:
        return "?"
    if round(seconds, 1) < 10:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    for unit, scale, smaller, next_scale in (("d", 86400, "h", 3600), ("h", 3600, "m", 60)):
        if whole >= scale:
            return f"{whole // scale}{unit}{whole % scale // next_scale:02d}{smaller}"
    return f"{whole // 60}m{whole % 60:02d}s" if whole >= 60 else f"{whole}s"


def format_listing(entries: Sequence[CatalogEntry], now: datetime | None = None) -> str:
    """The table ``pg-safe-backup list`` prints: a line per backup, unproven first, then oldest first;
    then each unproven backup's status and each unreadable catalog entry, named.

    :param entries: :func:`list_backups` of a root.
    :param now: the time ages are counted to (default: now).
    """
    now = now or datetime.now(timezone.utc)
    head = (
        "started",
        "age",
        "took",
        "size",
        "cluster",
        "start LSN",
        "stop LSN",
        "TLI",
        "format",
        "status",
        "verified",
        "folder",
    )
    rows = []
    for e in entries:
        p = e.proof
        rows.append(
            (
                p.start_time.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M UTC") if p.start_time else "?",
                span(e.age(now)),
                span(e.duration),
                _size(e.info),
                e.cluster or "?",
                p.start_lsn or "?",
                p.stop_lsn or "?",
                str(p.stop_tli) if p.stop_tli is not None else "?",
                ("incremental" if p.incremental else p.format)
                + (f"+{e.info.compression}" if e.info and e.info.compression else ""),
                "proven" if p.ok else ("incomplete" if p.incomplete else "UNVERIFIABLE"),
                _verified(e),
                e.name,
            )
        )
    widths = [max(len(row[i]) for row in [head, *rows]) for i in range(len(head))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [head, *rows]
    ]
    notes = [f"{e.name}: {e.proof.status}" for e in entries if not e.proof.ok]
    parent_of = parent_finder(entries)
    notes += [
        f"{e.name}: incremental; its parent starts at {e.proof.incremental_from_lsn} on timeline"
        f" {e.proof.incremental_from_tli}"
        + (f" ({parent.name})" if (parent := parent_of(e)) else ", NOT HERE")
        for e in entries
        if e.proof.ok and e.proof.incremental
    ]
    notes += [f"{e.name}: catalog entry ignored: {e.info_error}" for e in entries if e.info_error]
    count = f"{len(rows)} backup{'s' if len(rows) != 1 else ''}"
    return "\n".join([*lines, *notes, count])


__all__ = [
    "ENTRY_SUFFIX",
    "INFO_NAME",
    "BackupInfo",
    "CatalogEntry",
    "CatalogError",
    "Choice",
    "RetentionPlan",
    "against_server",
    "append_verification",
    "choose_backup",
    "entry_path",
    "format_listing",
    "has_info",
    "info_for_backup",
    "label_time",
    "latest_before",
    "list_backups",
    "one_cluster",
    "parse_when",
    "plan_retention",
    "proven",
    "read_info",
    "span",
    "wal_to_remove",
    "write_info",
]
