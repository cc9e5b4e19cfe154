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
blcksz                    216  the data page size (after checkPointCopy, 88 bytes at 40, and
                               the recovery, WAL and compatibility fields)
crc                  288, 292  288 up to 17; 18 adds ``bool default_char_signedness`` before
                               the 32-byte mock_authentication_nonce, moving it to 292
=====================  ======  =============================================================

Every data page starts with ``pd_lsn`` (PageXLogRecPtr: uint32 xlogid, uint32 xrecoff, in the
same byte order): the end of the last WAL record that changed the page. :func:`newest_page` finds
the highest one among the files whose pages are WAL-logged.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from pg_safe_backup.state import format_lsn, parse_backup_label, parse_lsn

#: pg_control_version -> offset of ``crc`` (= the number of bytes the CRC covers).
CRC_OFFSET = {1201: 288, 1300: 288, 1700: 288, 1800: 292}
PG_CONTROL_FILE_SIZE = 8192
_FIELDS = {
    "system_identifier": (0, "Q"),
    "pg_control_version": (8, "I"),
    "catalog_version_no": (12, "I"),
    "checkpoint": (32, "Q"),
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


class CopyMismatch(Exception):
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
_CHUNK_PAGES = 128


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


def newest_page(
    datadir: Path, control: ControlFile | None = None, tablespaces: Mapping[str, Path] | None = None
) -> PageLSN | None:
    """The page with the highest LSN in a copy of a data directory (None when no page has one).

    Recovery of a backup must replay WAL at least up to this LSN before the copy is consistent.

    :param datadir: the copy; its ``pg_tblspc/<oid>`` links or folders are followed.
    :param control: its pg_control (default: read from ``datadir``), for byte order, page size and
        the tablespaces' PG_<major>_<catversion> folder name.
    :param tablespaces: tablespace OID -> the copy of that tablespace's location, when not under
        ``pg_tblspc/`` (e.g. the restore check's work dir before the server made the links).
    """
    control = control or read_pg_control(datadir)
    size = control.blcksz
    lsn_at = struct.Struct(control.byte_order + "II")
    newest: PageLSN | None = None
    buffer = bytearray(size * _CHUNK_PAGES)
    for name, folder in _database_folders(Path(datadir), control, tablespaces or {}):
        for path in _wal_logged_files(folder):
            block = 0
            with open(path, "rb") as f:  # buffered: readinto fills the chunk up to the end of the file
                while got := f.readinto(buffer):
                    for offset in range(0, got - size + 1, size):
                        hi, lo = lsn_at.unpack_from(buffer, offset)
                        lsn = (hi << 32) | lo
                        if newest is None or lsn > newest.lsn:
                            newest = PageLSN(lsn, f"{name}/{path.name}", block + offset // size)
                    block += got // size
    return newest if newest is not None and newest.lsn else None
