"""The backups as their destination holds them: ``backup_info.json`` beside each, a listing of a root, and
the retention plan.

Every stored backup gets a sidecar :data:`INFO_NAME` in its top folder (never inside backup_manifest,
which pg_verifybackup would then have to list): what the backup is (label, DAG run and attempt, the
cluster's system identifier, PostgreSQL major, timeline, start and stop LSN and WAL file, start and stop
time), what it holds (format, bytes, files, the manifest's checksum) and how every later check of it
went. The destination tree is the catalog: :func:`list_backups` needs nothing else, local folder or
object store (``ObjectStoragePath``).

:func:`plan_retention` is a pure function over that listing: which backups to keep and delete, and the
first WAL file of the archive to keep (pg_archivecleanup's cut-off); :func:`wal_to_remove` applies the
cut-off to a list of archive file names. Nothing here deletes: the retention operator and the CLI carry
a plan out.

Nothing of Airflow is imported: the ``pg-safe-backup`` command uses this module on a machine with only
the backups.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Protocol

from pg_safe_backup.files.copier import is_local_path
from pg_safe_backup.files.layout import BACKUP_INFO
from pg_safe_backup.files.manifest import write_atomically
from pg_safe_backup.state import (
    backup_start,
    format_lsn,
    parse_backup_label,
    parse_lsn,
    wal_segment_name,
)

#: The sidecar in a backup's top folder.
INFO_NAME = BACKUP_INFO
#: What pg_backup_stop returned, stored in the backup's top folder: a backup without it is incomplete.
LABEL_NAME = "backup_label"
#: Written first, then renamed to INFO_NAME (local folders).
INFO_TMP = "backup_info.json.tmp"
#: The version of backup_info.json's layout; a reader refuses a newer one.
INFO_VERSION = 1
#: The WAL segment size when none is known (PostgreSQL's default).
DEFAULT_WAL_SEGMENT_SIZE = 16 << 20
#: Folders below a root searched for backups (root/cluster/date/backup is 3).
MAX_DEPTH = 4
#: A WAL segment, or a partial one, as archived, with an optional compression suffix (pg_archivecleanup's
#: IsXLogFileName / IsPartialXLogFileName, plus what archive_command may add).
_WAL_FILE = re.compile(r"^([0-9A-F]{24})(\.partial)?(\.(?:gz|zst|lz4|bz2|xz|br))?$")
#: backup_label's START TIME: '2026-11-26 06:14:54 UTC'.
_LABEL_TIME = "%Y-%m-%d %H:%M:%S %Z"


class CatalogError(ValueError):
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
    has_tablespace_map: bool = False
    verifications: list[dict[str, Any]] = field(default_factory=list)
    version: int = INFO_VERSION

    @property
    def verified(self) -> bool:
        """The newest check of it passed."""
        return bool(self.verifications) and bool(self.verifications[-1].get("ok"))

    @property
    def stopped(self) -> datetime:
        """``stop_time`` as a datetime."""
        return datetime.fromisoformat(self.stop_time)

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
        if int(data.get("version", 0)) > INFO_VERSION:
            raise CatalogError(
                f"{where} has version {data['version']}, newer than this pg-safe-backup reads"
                f" ({INFO_VERSION})"
            )
        known = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as err:
            raise CatalogError(f"{where} lacks a field: {err}") from err


def label_time(backup_label: str) -> str | None:
    """The label's START TIME as ISO 8601 UTC, or None when it has none or another zone than UTC/GMT."""
    text = parse_backup_label(backup_label).get("START TIME")
    if not text:
        return None
    try:
        parsed = datetime.strptime(text, _LABEL_TIME)
    except ValueError:
        return None
    if not text.endswith(("UTC", "GMT")):
        return None  # the server's log_timezone: an offset we cannot know from its abbreviation
    return parsed.replace(tzinfo=timezone.utc).isoformat()


def info_for_backup(
    *,
    backup_label: str,
    stop_lsn: str,
    tablespace_map: str | None = None,
    system_identifier: int | str | None = None,
    pg_major: int | None = None,
    wal_segment_size: int | None = None,
    stop_time: datetime | None = None,
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
    :raises ValueError: the label has no START WAL LOCATION.
    """
    start_lsn, timeline = backup_start(backup_label)
    label = parse_backup_label(backup_label)
    size = wal_segment_size or DEFAULT_WAL_SEGMENT_SIZE
    # 'START WAL LOCATION: 0/2000028 (file 000000010000000000000002)'
    named = label["START WAL LOCATION"].partition("(file ")[2].rstrip(")")
    return BackupInfo(
        label=label.get("LABEL", ""),
        start_lsn=start_lsn,
        stop_lsn=stop_lsn,
        timeline=timeline,
        # The segment holding start_lsn: the one before start_lsn + 1.
        start_wal=named or wal_segment_name(format_lsn(parse_lsn(start_lsn) + 1), timeline, size),
        stop_wal=wal_segment_name(stop_lsn, timeline, size),
        start_time=label_time(backup_label),
        stop_time=(stop_time or datetime.now(timezone.utc)).astimezone(timezone.utc).isoformat(),
        system_identifier=None if system_identifier is None else str(system_identifier),
        pg_major=pg_major,
        has_tablespace_map=bool(tablespace_map),
        **extra,
    )


def write_info(folder: Folder, info: BackupInfo) -> str:
    """Write ``folder/backup_info.json``: a local one through a temporary file, synced and renamed (a
    reader sees the old or the whole new file); an object in one put, which is atomic.

    :param folder: the backup's top folder.
    :param info: what to write.
    :returns: where it was written.
    """
    target = folder / INFO_NAME
    if is_local_path(folder):
        write_atomically(target, info.to_json(), INFO_TMP)
    else:
        target.write_bytes(info.to_json())
    return str(target)


def read_info(folder: Folder) -> BackupInfo:
    """The backup_info.json of the backup in ``folder``.

    :raises CatalogError: there is none, or it cannot be read.
    """
    target = folder / INFO_NAME
    if not target.exists():
        raise CatalogError(f"{folder} has no {INFO_NAME}: not a backup stored by pg-safe-backup")
    return BackupInfo.from_json(target.read_text(), str(target))


def append_verification(folder: Folder, record: dict[str, Any]) -> BackupInfo:
    """Add the result of a check of the backup in ``folder`` to its backup_info.json.

    :param folder: the backup's top folder.
    :param record: JSON-able: at least ``ok`` (bool); ``at`` (ISO UTC) is added when missing.
    :returns: the updated info.
    :raises CatalogError: the backup has no backup_info.json.
    """
    info = read_info(folder)
    info.verifications.append({"at": datetime.now(timezone.utc).isoformat(), **record})
    write_info(folder, info)
    return info


@dataclass(frozen=True)
class CatalogEntry:
    """A backup found under a root: its folder and its info."""

    folder: Any  # Path or ObjectStoragePath
    info: BackupInfo

    @property
    def name(self) -> str:
        return str(self.folder)


def list_backups(root: Folder, max_depth: int = MAX_DEPTH) -> list[CatalogEntry]:
    """Every backup under ``root`` (a folder holding backup_info.json, ``root`` itself included), oldest
    first (by stop time). A folder holding one is not searched further, nor a data directory.

    :param root: a local folder or an ObjectStoragePath.
    :param max_depth: folders below ``root`` to search.
    :raises CatalogError: a backup_info.json cannot be read (named).
    """
    found: list[CatalogEntry] = []

    def visit(folder: Folder, depth: int) -> None:
        info = folder / INFO_NAME
        if info.exists():  # one look (a request, in an object store), then the read
            found.append(CatalogEntry(folder, BackupInfo.from_json(info.read_text(), str(info))))
            return
        if depth >= max_depth or (folder / "PG_VERSION").exists():
            return
        for child in sorted(folder.iterdir(), key=lambda c: c.name):
            if child.is_dir():
                visit(child, depth + 1)

    if root.exists():
        visit(root, 0)
    found.sort(key=_age)
    return found


def _age(entry: CatalogEntry) -> tuple[datetime, int]:
    """Oldest first: by stop time, then by stop LSN as a number (as text, 0/A000000 sorts after
    0/10000000)."""
    return entry.info.stopped, parse_lsn(entry.info.stop_lsn)


def one_cluster(entries: Sequence[CatalogEntry], root: Any) -> None:
    """Refuse a root that holds backups of more than one cluster: "the newest", a retention policy and a
    WAL cut-off are each a cluster's own (another cluster's backup would be restored, or kept instead).

    :param entries: :func:`list_backups` of ``root``.
    :param root: what to name in the error.
    :raises CatalogError: more than one system identifier among ``entries``.
    """
    clusters = sorted({e.info.system_identifier for e in entries if e.info.system_identifier})
    if len(clusters) > 1:
        raise CatalogError(
            f"{root} holds backups of {len(clusters)} clusters (system identifiers {', '.join(clusters)}):"
            " name the folder of one cluster's backups"
        )


def is_complete(folder: Folder) -> bool:
    """Whether the backup in ``folder`` can be restored as far as the catalog can tell: it has its
    backup_info.json AND its backup_label (without the label, recovery would start from the copy's
    pg_control checkpoint, not the backup's start: a restore and the checks refuse it).

    :param folder: the backup's top folder, local or an ObjectStoragePath.
    """
    return (folder / INFO_NAME).exists() and (folder / LABEL_NAME).exists()


@dataclass(frozen=True)
class RetentionPlan:
    """What a retention run keeps and deletes, and the WAL it lets go."""

    keep: list[CatalogEntry]
    delete: list[CatalogEntry]
    #: The first WAL file to keep (the oldest kept backup's START WAL file); None: remove no WAL.
    wal_cutoff: str | None
    #: Why each kept backup is kept: folder -> reasons.
    reasons: dict[str, list[str]]
    #: What is kept, in words ("the newest 2 and those within 7 days"): why the others go.
    policy: str = ""
    #: Backups neither kept nor deleted, left for a person to look at: folder -> why.
    skipped: dict[str, str] = field(default_factory=dict)


def plan_retention(
    entries: Sequence[CatalogEntry],
    *,
    keep_last: int | None = None,
    keep_days: float | None = None,
    now: datetime | None = None,
) -> RetentionPlan:
    """Which backups to keep: the newest ``keep_last`` and/or those stopped within ``keep_days`` days,
    and always the newest verified one (the newest one, if none was ever verified): at least one complete
    backup stays. The rest go, and the WAL archive keeps files from the oldest kept backup's START WAL
    file on (pg_archivecleanup's rule). With no backup at all, nothing goes.

    :param entries: :func:`list_backups` of the root.
    :param keep_last: how many of the newest to keep (None: not by count).
    :param keep_days: keep those stopped within this many days of ``now`` (None: not by age).
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
    ordered = sorted(entries, key=_age)
    reasons: dict[str, list[str]] = {}
    if keep_last is not None:
        for entry in ordered[-keep_last:]:
            reasons.setdefault(entry.name, []).append(f"one of the newest {keep_last}")
    if keep_days is not None:
        since = now - timedelta(days=keep_days)
        for entry in ordered:
            if entry.info.stopped >= since:
                reasons.setdefault(entry.name, []).append(f"within {keep_days:g} days")
    verified = [e for e in ordered if e.info.verified]
    if verified:
        reasons.setdefault(verified[-1].name, []).append("the newest verified backup")
    elif ordered:
        reasons.setdefault(ordered[-1].name, []).append("the newest backup (none was verified)")
    keep = [e for e in ordered if e.name in reasons]
    delete = [e for e in ordered if e.name not in reasons]
    cutoff = min((e.info.start_wal for e in keep), key=lambda name: name[8:]) if keep else None
    rules = ([f"the newest {keep_last}"] if keep_last is not None else []) + (
        [f"those within {keep_days:g} days"] if keep_days is not None else []
    )
    return RetentionPlan(keep, delete, cutoff, reasons, policy=" and ".join(rules))


def wal_to_remove(names: Iterable[str], cutoff: str | None) -> list[str]:
    """The archive files older than ``cutoff``: WAL segments and partial segments (compressed or not) whose
    position (the name without its timeline) sorts before the cut-off's, as pg_archivecleanup decides.
    Timeline history files and backup history files are never removed.

    :param names: the names in the WAL archive.
    :param cutoff: the first WAL file to keep (:attr:`RetentionPlan.wal_cutoff`); None: nothing.
    """
    if cutoff is None:
        return []
    if not _WAL_FILE.match(cutoff):
        raise ValueError(f"{cutoff!r} is not a WAL file name")
    return sorted(n for n in names if (m := _WAL_FILE.match(n)) and m.group(1)[8:] < cutoff[8:])


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


def latest_before(entries: Sequence[CatalogEntry], when: datetime) -> CatalogEntry | None:
    """The newest backup that stopped before ``when``: the one a point-in-time restore to ``when`` starts
    from (recovery cannot stop before the backup's end).

    :param entries: :func:`list_backups` of a root.
    :param when: the restore target's time.
    """
    before = [e for e in entries if e.info.stopped < when]
    return max(before, key=lambda e: (e.info.stopped, parse_lsn(e.info.stop_lsn)), default=None)


def _size(info: BackupInfo) -> str:
    if info.bytes is None:
        return "?"
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("kB", 1 << 10)):
        if info.bytes >= scale:
            return f"{info.bytes / scale:.1f} {unit}"
    return f"{info.bytes} B"


def _verified(info: BackupInfo) -> str:
    """``yes`` / ``FAILED`` (the newest check) with its time, or ``never``."""
    if not info.verifications:
        return "never"
    last = info.verifications[-1]
    return f"{'yes' if last.get('ok') else 'FAILED'} {str(last.get('at', ''))[:16].replace('T', ' ')}"


def format_listing(entries: Sequence[CatalogEntry]) -> str:
    """The table ``pg-safe-backup list`` prints: a line per backup, oldest first.

    :param entries: :func:`list_backups` of a root.
    """
    head = ("stopped (UTC)", "size", "start LSN", "stop LSN", "TLI", "format", "verified", "label", "folder")
    rows = [
        (
            e.info.stop_time[:19].replace("T", " "),
            _size(e.info),
            e.info.start_lsn,
            e.info.stop_lsn,
            str(e.info.timeline),
            e.info.format + (f"+{e.info.compression}" if e.info.compression else ""),
            _verified(e.info),
            e.info.label,
            e.name,
        )
        for e in entries
    ]
    widths = [max(len(row[i]) for row in [head, *rows]) for i in range(len(head))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [head, *rows]
    ]
    return "\n".join(lines) + f"\n{len(rows)} backup{'s' if len(rows) != 1 else ''}"


LIST_DESCRIPTION = """List the backups under ROOT (each folder holding a backup_info.json), oldest first:
when each stopped, its size, start and stop LSN, timeline, format, and whether its newest check passed."""
LIST_EPILOG = """example:
  pg-safe-backup list /backups/main
  pg-safe-backup list /backups/main --json | jq '.[-1].info.stop_lsn'"""


def add_list_arguments(p: argparse.ArgumentParser) -> None:
    """The ``pg-safe-backup list`` command's arguments (the CLI and ``python -m pg_safe_backup``).

    :param p: the subcommand's parser.
    """
    p.add_argument("root", type=Path, help="the folder the backups are stored under")
    p.add_argument("--json", action="store_true", help="print JSON: a list of {folder, info}")
    p.set_defaults(run=_list)


def _list(args: argparse.Namespace) -> int:
    if not args.root.is_dir():
        print(f"pg-safe-backup list: ROOT {args.root} is not a folder", file=sys.stderr)
        return 2
    try:
        entries = list_backups(args.root)
    except CatalogError as err:
        print(f"pg-safe-backup list: {err}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps([{"folder": e.name, "info": asdict(e.info)} for e in entries], indent=1))
    else:
        print(format_listing(entries))
    return 0


__all__ = [
    "INFO_NAME",
    "BackupInfo",
    "CatalogEntry",
    "CatalogError",
    "RetentionPlan",
    "add_list_arguments",
    "append_verification",
    "format_listing",
    "info_for_backup",
    "is_complete",
    "label_time",
    "latest_before",
    "list_backups",
    "one_cluster",
    "parse_when",
    "plan_retention",
    "read_info",
    "wal_to_remove",
    "write_info",
]
