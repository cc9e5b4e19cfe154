"""A copy's global/pg_control and its pages' LSNs: does the copy belong to a backup label?

pg_control (``ControlFileData`` in src/include/catalog/pg_control.h) is a C struct written in the
server's byte order and padded to PG_CONTROL_FILE_SIZE (8192) bytes. Its last field, ``crc``, is the
CRC-32C of every byte before it (src/common/controldata_utils.c); the offsets below are those of
PostgreSQL 12 to 18 on 64-bit platforms (int64 and double aligned on 8 bytes):

=====================  ======  =============================================================
field                  offset  pg_control_version 1201 (12), 1300 (13-16), 1700 (17), 1800 (18)
=====================  ======  =============================================================
system_identifier           0  uint64
pg_control_version          8  uint32; PostgreSQL's byte-order test reads it (see below)
catalog_version_no         12  uint32; names a tablespace's PG_<major>_<catversion> folder
checkPoint                 32  LSN of the last checkpoint record
minRecoveryPoint          136  uint64, after checkPointCopy (88 bytes at 40) and unloggedLSN:
                               where recovery of a copy of a standby becomes consistent
minRecoveryPointTLI       144  uint32, its timeline
backupEndPoint            160  uint64, after backupStartPoint (152)
blcksz                    216  the data page size (after the WAL and compatibility fields)
crc                  288, 292  288 up to 17; 18 adds ``bool default_char_signedness`` before
                               the 32-byte mock_authentication_nonce, moving it to 292
=====================  ======  =============================================================

Every data page starts with ``pd_lsn`` (PageXLogRecPtr: uint32 xlogid, uint32 xrecoff, in the
same byte order): the end of the last WAL record that changed the page. :func:`newest_page` finds
the highest one among the files whose pages are WAL-logged, and :func:`check_page_lsns` compares it
with the backup's consistency point (:func:`consistency_point`) without restoring anything.
"""

from __future__ import annotations

import json
import os
import re
import struct
import sys
import time
from array import array
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from pg_safe_backup.errors import PermanentError
from pg_safe_backup.files.xlog import format_lsn, parse_backup_label, parse_lsn

#: pg_control_version -> offset of ``crc`` (= the number of bytes the CRC covers).
CRC_OFFSET = {1201: 288, 1300: 288, 1700: 288, 1800: 292}
PG_CONTROL_FILE_SIZE = 8192
_FIELDS = {
    "system_identifier": (0, "Q"),
    "pg_control_version": (8, "I"),
    "catalog_version_no": (12, "I"),
    "checkpoint": (32, "Q"),
    "min_recovery_point": (136, "Q"),
    "min_recovery_point_tli": (144, "I"),
    "backup_end_point": (160, "Q"),
    "blcksz": (216, "I"),
    "xlog_seg_size": (228, "I"),
}


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
        table.append(crc)
    return table


_CRC32C = _crc32c_table()


def crc32c(data: bytes, value: int = 0) -> int:
    """CRC-32C (Castagnoli, reflected), as PostgreSQL's INIT/COMP/FIN_CRC32C compute it.

    :param data: the bytes.
    :param value: the CRC of the bytes before ``data``, to continue it (like ``zlib.crc32``).
    """
    crc = value ^ 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


class CopyMismatch(PermanentError):
    """The copy cannot belong to this backup; storing its label would make a corrupt restore."""


class BadPgControl(CopyMismatch):
    """The copy's global/pg_control cannot be read as a valid control file."""


@dataclass(frozen=True)
class ControlFile:
    """What this project reads from a copy's global/pg_control."""

    byte_order: str  # struct prefix of the file's byte order: "<" or ">"
    system_identifier: int
    pg_control_version: int
    catalog_version_no: int
    checkpoint: int
    #: Where recovery of a copy made while the server was in recovery (a standby) becomes consistent;
    #: 0 (InvalidXLogRecPtr) once the server is out of recovery, as on a primary.
    min_recovery_point: int
    min_recovery_point_tli: int
    #: Set while a server restored from a standby's backup has not reached its end yet; else 0.
    backup_end_point: int
    blcksz: int
    xlog_seg_size: int  # bytes per WAL segment (initdb --wal-segsize)


def _byte_order(raw: bytes) -> str | None:
    """The file's byte order: the one in which pg_control_version reads as a version number.

    controldata_utils.c calls a version with ``% 65536 == 0 and / 65536 != 0`` a byte-order mismatch:
    a small number read in the other order."""
    for order in ("<", ">"):
        (version,) = struct.unpack_from(order + "I", raw, 8)
        if 0 < version < 65536:
            return order
    return None


def read_pg_control(datadir: Path) -> ControlFile:
    """Read and check ``datadir``/global/pg_control: size, byte order, known version, CRC.

    :param datadir: a data directory or a copy of one.
    :raises BadPgControl: the file is missing, unreadable, truncated, of an unknown version or fails its CRC.
    """
    path = Path(datadir) / "global" / "pg_control"
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise BadPgControl(f"cannot read {path}: {err}") from err
    if len(raw) != PG_CONTROL_FILE_SIZE:
        raise BadPgControl(f"{path} is {len(raw)} bytes, not {PG_CONTROL_FILE_SIZE}: not a whole pg_control")
    order = _byte_order(raw)
    if order is None:
        raise BadPgControl(f"{path} is not a pg_control file: no pg_control_version in either byte order")
    values = {
        name: struct.unpack_from(order + fmt, raw, offset)[0] for name, (offset, fmt) in _FIELDS.items()
    }
    version = values["pg_control_version"]
    if version not in CRC_OFFSET:
        raise BadPgControl(
            f"{path} has pg_control_version {version}; this release reads {sorted(CRC_OFFSET)}"
            " (PostgreSQL 12 to 18)"
        )
    end = CRC_OFFSET[version]
    (stored,) = struct.unpack_from(order + "I", raw, end)
    computed = crc32c(raw[:end])
    if stored != computed:
        raise BadPgControl(
            f"{path} fails its CRC check (stored {stored:08X}, computed {computed:08X}): the copy of it is"
            " torn or damaged (or it comes from a 32-bit server, whose layout this release does not read)"
        )
    return ControlFile(byte_order=order, **values)


def check_copy(
    datadir: Path, system_identifier: int | str | None, backup_label: str, stop_lsn: str | None = None
) -> ControlFile:
    """Raise CopyMismatch unless the copy in ``datadir`` can belong to this backup.

    The copy's pg_control must be valid and its system identifier the source cluster's; its
    checkpoint must not be older than the label's CHECKPOINT LOCATION (else it was copied before the
    backup started) and must be below the backup's stop LSN (else it was copied after the backup
    ended: a later backup's copy). A pg_control copied inside [start, stop] always has its
    checkpoint below the stop LSN: on a primary the backup's end record comes after it; on a standby
    the stop LSN is the minimum recovery point, which a restartpoint moves past its checkpoint.

    :param datadir: the copy of the data directory.
    :param system_identifier: the backed up cluster's, or None to not compare.
    :param backup_label: the label pg_backup_stop returned.
    :param stop_lsn: the backup's stop LSN, or None to not compare.
    :returns: the copy's control file.
    """
    control = read_pg_control(datadir)
    if system_identifier is not None and control.system_identifier != int(system_identifier) % (1 << 64):
        raise CopyMismatch(
            f"the copy in {datadir} is of another cluster: its system identifier is "
            f"{control.system_identifier},"
            f" the backed up cluster's is {int(system_identifier) % (1 << 64)}; refusing to store this "
            "backup_label there"
        )
    label_checkpoint = parse_backup_label(backup_label).get("CHECKPOINT LOCATION")
    if label_checkpoint and control.checkpoint < parse_lsn(label_checkpoint):
        raise CopyMismatch(
            f"the copy in {datadir} was taken before this backup started: its last checkpoint is"
            f" {format_lsn(control.checkpoint)}, older than the label's CHECKPOINT LOCATION "
            f"{label_checkpoint};"
            " refusing to store this backup_label there"
        )
    if stop_lsn and control.checkpoint >= parse_lsn(stop_lsn):
        raise CopyMismatch(
            f"the copy in {datadir} was taken after this backup ended: its last checkpoint is"
            f" {format_lsn(control.checkpoint)}, at or past this backup's stop LSN {stop_lsn} (a later "
            "backup's copy?); refusing to store this backup_label there"
        )
    return control


# ------------------------------------------------------------------------------------------ page LSNs
#: A relation file: relfilenode, fork (none = main), segment. Temporary relations (t<backend>_<node>)
#: and the other files of a database folder (PG_VERSION, pg_filenode.map, pg_internal.init) do not match.
_RELATION_FILE = re.compile(r"^(\d+)(?:_(fsm|vm|init))?(?:\.\d+)?$")
_CHUNK_BYTES = 1 << 20  # a multiple of every BLCKSZ PostgreSQL allows (1 to 32 kB)


@dataclass(frozen=True)
class PageLSN:
    """The LSN of one page, and where the page is."""

    lsn: int
    file: str  # relative to the data directory, e.g. base/5/16384 or pg_tblspc/16390/PG_15_.../5/16391
    block: int

    def __str__(self) -> str:
        return f"{self.file} block {self.block} (LSN {format_lsn(self.lsn)})"


def _wal_logged_files(folder: Path) -> Iterator[Path]:
    """The files of one database folder (or global/) whose pages carry WAL positions.

    Left out, after basebackup.c's sendDir() and the FSM's README: free space map forks (not
    WAL-logged, read with RBM_ZERO_ON_ERROR, their LSN means nothing to recovery), and every fork
    but the init fork of an unlogged relation (fake LSNs from GetFakeLSNForUnloggedRel(); the
    server rebuilds them from the init fork at the end of recovery; base backups leave them out).
    """
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return
    matched = {name: m for name in names if (m := _RELATION_FILE.match(name))}
    unlogged = {m.group(1) for m in matched.values() if m.group(2) == "init"}
    for name, m in sorted(matched.items()):
        fork = m.group(2)
        if fork == "fsm" or (m.group(1) in unlogged and fork != "init"):
            continue
        if (folder / name).is_file():
            yield folder / name


def _database_folders(
    datadir: Path, control: ControlFile, tablespaces: Mapping[str, Path]
) -> Iterator[tuple[str, Path]]:
    """(name relative to the data directory, folder) of global/, base/<db>/ and each tablespace's <db>/."""
    yield "global", datadir / "global"
    base = datadir / "base"
    for db in sorted(os.listdir(base)) if base.is_dir() else []:
        if db.isdigit():
            yield f"base/{db}", base / db
    major = (datadir / "PG_VERSION").read_text().strip()
    version_dir = f"PG_{major}_{control.catalog_version_no}"  # TABLESPACE_VERSION_DIRECTORY
    locations = {}
    spc = datadir / "pg_tblspc"
    for oid in sorted(os.listdir(spc)) if spc.is_dir() else []:
        locations[oid] = spc / oid
    locations.update({str(oid): Path(path) for oid, path in tablespaces.items()})
    for oid, location in sorted(locations.items()):
        folder = location / version_dir
        for db in sorted(os.listdir(folder)) if folder.is_dir() else []:
            if db.isdigit():
                yield f"pg_tblspc/{oid}/{version_dir}/{db}", folder / db


def page_files(
    datadir: Path, control: ControlFile, tablespaces: Mapping[str, Path] | None = None
) -> Iterator[tuple[str, Path]]:
    """(name relative to the data directory, path) of every file :func:`scan_pages` reads.

    :param datadir: the copy of a data directory.
    :param control: its pg_control.
    :param tablespaces: tablespace OID -> its copy, when not under ``pg_tblspc/``.
    """
    for name, folder in _database_folders(Path(datadir), control, tablespaces or {}):
        for path in _wal_logged_files(folder):
            yield f"{name}/{path.name}", path


@dataclass(frozen=True)
class PageScan:
    """What :func:`scan_pages` read: the newest page, and how much it read to find it."""

    newest: PageLSN | None
    bytes_scanned: int
    files: int


def _native_order(words: memoryview, swap: bool) -> memoryview | array:
    """uint32 words read in this machine's byte order, as the file's order has them."""
    if not swap:
        return words
    swapped = array("I", words)
    swapped.byteswap()
    return swapped


def scan_pages(
    datadir: Path, control: ControlFile | None = None, tablespaces: Mapping[str, Path] | None = None
) -> PageScan:
    """Read the pd_lsn of every page of every WAL-logged relation file in a copy of a data directory.

    Fast in plain Python: each file is read in 1 MB chunks (small enough to stay in the CPU cache)
    into one buffer, seen as uint32 words; a strided slice picks each page's two pd_lsn words and
    ``max(zip(xlogid, xrecoff))`` compares the pages in C. Only a chunk holding a new maximum is
    searched again for its block number. A partial page at the end of a file is not read.

    :param datadir: the copy; its ``pg_tblspc/<oid>`` links or folders are followed.
    :param control: its pg_control (default: read from ``datadir``), for byte order, page size and
        the tablespaces' PG_<major>_<catversion> folder name.
    :param tablespaces: tablespace OID -> the copy of that tablespace's location, when not under
        ``pg_tblspc/`` (e.g. the restore check's work dir before the server made the links).
    """
    control = control or read_pg_control(datadir)
    size = control.blcksz
    stride = size // 4  # pd_lsn is words 0 (xlogid) and 1 (xrecoff) of each page
    swap = control.byte_order != ("<" if sys.byteorder == "little" else ">")
    buffer = bytearray(max(size, _CHUNK_BYTES))
    words = memoryview(buffer).cast("I")
    best, where = (0, 0), ("", 0)
    scanned = files = 0
    for name, path in page_files(datadir, control, tablespaces):
        files += 1
        block = 0
        with open(path, "rb") as f:  # buffered: readinto fills the chunk up to the end of the file
            while got := f.readinto(buffer):
                end = got // size * stride
                xlogid = _native_order(words[0:end:stride], swap)
                xrecoff = _native_order(words[1:end:stride], swap)
                top = max(zip(xlogid, xrecoff, strict=True), default=best)
                if top > best:
                    best = top
                    where = (name, block + list(zip(xlogid, xrecoff, strict=True)).index(top))
                block += got // size
                scanned += got
    newest = PageLSN((best[0] << 32) | best[1], *where) if best != (0, 0) else None
    return PageScan(newest, scanned, files)


def newest_page(
    datadir: Path, control: ControlFile | None = None, tablespaces: Mapping[str, Path] | None = None
) -> PageLSN | None:
    """The page with the highest LSN in a copy of a data directory (None when no page has one).

    Recovery of a backup must replay WAL at least up to this LSN before the copy is consistent.
    The parameters are :func:`scan_pages`'s.
    """
    return scan_pages(datadir, control, tablespaces).newest


# ------------------------------------------------------------------------------- consistency point
class MissingStopLsn(PermanentError, ValueError):
    """A backup of a primary is consistent at its stop LSN, and none was given."""


#: Where recovery of a backup becomes consistent, by the label's BACKUP FROM.
PRIMARY_SOURCE = "the backup's stop LSN (a backup of a primary)"
STANDBY_SOURCE = "the minimum recovery point of the copy's global/pg_control (a backup of a standby)"
#: A standby's stop LSN below its copy's minimum recovery point: the copy is of a later backup.
STANDBY_STOP_SOURCE = (
    "the backup's stop LSN (a backup of a standby, whose copied global/pg_control has a later minimum"
    " recovery point)"
)


def consistency_point(
    datadir: Path, backup_label: str, stop_lsn: str | None, control: ControlFile | None = None
) -> tuple[int, str]:
    """The LSN where recovery of this copy becomes consistent, and where that LSN comes from.

    A backup of a primary ends at its stop LSN, where pg_backup_stop wrote the end-of-backup record.
    A standby writes no such record: recovery of its copy ends at the minimum recovery point of the
    copied global/pg_control (xlog.c, do_pg_backup_stop), which is right only when pg_control was
    copied last. A standby's stop LSN is its minimum recovery point when pg_backup_stop ran, which
    only moves forward: a copied one past it (given ``stop_lsn``) is of a copy taken after this backup
    ended, and the stop LSN is then the point.

    :param datadir: the copy of the data directory.
    :param backup_label: the backup's label; its ``BACKUP FROM`` says standby, or primary (master
        before PostgreSQL 13).
    :param stop_lsn: the backup's stop LSN (needed for a primary; see :func:`stop_lsn_from_manifest`),
        or None (a standby: the copy's minimum recovery point alone).
    :param control: the copy's pg_control (default: read from ``datadir``).
    :raises MissingStopLsn: a backup of a primary, and no stop LSN.
    :raises CopyMismatch: a backup of a standby whose copied pg_control has no minimum recovery point.
    """
    if parse_backup_label(backup_label).get("BACKUP FROM") == "standby":
        control = control or read_pg_control(datadir)
        if not control.min_recovery_point:
            raise CopyMismatch(
                f"the backup_label says this is a backup of a standby, but the global/pg_control in {datadir}"
                " has no minimum recovery point: it was copied from a server out of recovery (a primary, or"
                " the standby promoted during the backup), so nothing tells where recovery of this copy"
                " becomes consistent"
            )
        if stop_lsn and parse_lsn(stop_lsn) < control.min_recovery_point:
            return parse_lsn(stop_lsn), STANDBY_STOP_SOURCE
        return control.min_recovery_point, STANDBY_SOURCE
    if not stop_lsn:
        raise MissingStopLsn(
            f"checking the page LSNs of the copy in {datadir} (a backup of a primary) needs the backup's stop"
            " LSN, what pg_backup_stop returned: none was given (backup_info.json's stop_lsn, or the End-LSN"
            " of backup_manifest's WAL-Ranges, see stop_lsn_from_manifest)"
        )
    return parse_lsn(stop_lsn), PRIMARY_SOURCE


def stop_lsn_from_manifest(manifest: str) -> str:
    """The stop LSN of a backup, from its backup_manifest: the End-LSN of its newest WAL range.

    backup_manifest.c lists one range per timeline the backup's WAL spans, the backup's own (where
    it ended) first; the highest End-LSN is that one's.

    :param manifest: the text of a backup_manifest (JSON).
    :raises ValueError: not a manifest, or one without WAL-Ranges.
    """
    try:
        ranges = json.loads(manifest).get("WAL-Ranges") or []
        ends = [r["End-LSN"] for r in ranges]
    except (ValueError, AttributeError, TypeError, KeyError) as err:
        raise ValueError(f"not a backup_manifest with WAL-Ranges: {err}") from err
    if not ends:
        raise ValueError("the backup_manifest has no WAL-Ranges (a manifest of a backup without WAL?)")
    return max(ends, key=parse_lsn)


@dataclass(frozen=True)
class PageLsnResult:
    """The page-LSN check of a copy: is any page newer than the point where its recovery is consistent?"""

    ok: bool
    newest: PageLSN | None
    consistency_lsn: int
    source: str  # where consistency_lsn comes from: one of the *_SOURCE texts above
    bytes_scanned: int
    seconds: float
    files: int
    message: str

    @property
    def gb_per_s(self) -> float:
        """The scan's speed, GB (10^9 bytes) per second."""
        return self.bytes_scanned / 1e9 / self.seconds if self.seconds else 0.0


def check_page_lsns(
    datadir: Path,
    *,
    backup_label: str,
    stop_lsn: str | None,
    tablespaces: Mapping[str, Path] | None = None,
) -> PageLsnResult:
    """Scan every page of the copy: the newest must not pass the backup's consistency point.

    A page newer than that point was written after the backup ended, by WAL its recovery does not
    replay before the copy is declared consistent. This catches, without restoring anything, what
    a restore cannot: a label of an earlier backup than the copy, and a standby's pg_control copied
    before the rest of the data directory.

    :param datadir: the copy of the data directory (with its tablespaces under ``pg_tblspc/``).
    :param backup_label: the backup's label.
    :param stop_lsn: the backup's stop LSN; needed for a backup of a primary.
    :param tablespaces: tablespace OID -> its copy, when not under ``pg_tblspc/``.
    :raises MissingStopLsn, CopyMismatch: see :func:`consistency_point`; BadPgControl.
    """
    started = time.monotonic()
    control = read_pg_control(datadir)
    point, source = consistency_point(datadir, backup_label, stop_lsn, control)
    scan = scan_pages(datadir, control, tablespaces)
    seconds = time.monotonic() - started
    newest = scan.newest
    read = f"{scan.files} files, {scan.bytes_scanned / 1e9:.2f} GB read in {seconds:.1f} s"
    if newest is None or newest.lsn <= point:
        message = (
            f"no page of the copy in {datadir} is newer than {source}, {format_lsn(point)}"
            f" (the newest: {newest or 'none'}; {read})"
        )
        return PageLsnResult(True, newest, point, source, scan.bytes_scanned, seconds, scan.files, message)
    cause = (
        "Pages reached the standby's disk after its global/pg_control was copied: for a backup of a standby,"
        " global/pg_control must be copied last (its minimum recovery point is where recovery of the copy"
        " ends). Or the label is of an earlier backup than the copy."
        if source == STANDBY_SOURCE
        else "The copy is newer than its backup_label: the label (or the stop LSN) is of an earlier backup"
        " than the copy, whose recovery would be declared consistent before replaying the WAL that wrote"
        " this page."
    )
    message = (
        f"the copy in {datadir} holds a page newer than its backup's consistency point: {newest.file} block"
        f" {newest.block} has LSN {format_lsn(newest.lsn)}, {source} is {format_lsn(point)}. {cause} ({read})"
    )
    return PageLsnResult(False, newest, point, source, scan.bytes_scanned, seconds, scan.files, message)
