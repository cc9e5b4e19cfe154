"""What a stored backup proves about itself, from its own files: the catalog's JSON is never asked.

A backup *proves itself* when its ``backup_label`` parses, is the very file its ``backup_manifest`` lists
(same size, same checksum), the manifest's own ``Manifest-Checksum`` holds (SHA-256 of every byte before
its line, as src/common/parse_manifest.c checks it), its WAL-Ranges agree with the label (the range of
the label's START TIMELINE starts at its START WAL LOCATION) and its system identifiers agree (a version
2 manifest's ``System-Identifier`` and, for a local plain copy, global/pg_control's, CRC-checked).
Its place in WAL (start and stop LSN, timelines), its cluster and its start time then come from those
files, never from ``backup_info.json``.

Anything else is *unverifiable* (the reason named) or *incomplete* (no label, an empty or truncated one):
retention neither counts nor deletes it, a restore does not choose it.

Works on a local ``Path`` and on an ``ObjectStoragePath`` alike (``/``, ``exists()``, ``read_bytes()``);
a tar backup keeps backup_label, tablespace_map and backup_manifest beside ``base.tar``. An encrypted
backup (:mod:`pg_safe_backup.encryption`) proves itself the same way from its files decrypted with its
key; without the key, or with another one, it is unverifiable, its key id named: nothing was proven,
nothing disproven. Nothing of Airflow is imported.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from pg_safe_backup.encryption import KEY_FLAGS, read_file, sealed
from pg_safe_backup.files.copier import is_local_path
from pg_safe_backup.files.crypt import CryptError, EncryptionKey
from pg_safe_backup.files.pgcontrol import BadPgControl, crc32c, read_pg_control
from pg_safe_backup.files.xlog import (
    LABEL_KEYS,
    SEGMENT_SIZES,
    format_lsn,
    incremental_from,
    label_start_time,
    parse_backup_label,
    parse_lsn,
    start_wal_location,
    wal_file_holding,
)
from pg_safe_backup.snapshots.base import RECORD_NAME, KeptSnapshot, SnapshotError

LABEL_NAME = "backup_label"
MAP_NAME = "tablespace_map"
MANIFEST_NAME = "backup_manifest"
CONTROL = "global/pg_control"
#: A tar backup's data directory archive, by compression (files/tarball.py's archive_name).
BASE_TARS = ("base.tar", "base.tar.gz", "base.tar.zst")
_CHECKSUM_LINE = b'\n"Manifest-Checksum": "'
_DIGESTS = {"SHA224": "sha224", "SHA256": "sha256", "SHA384": "sha384", "SHA512": "sha512"}


@dataclass(frozen=True)
class Proof:
    """What a backup's own files prove about it; the positions are None unless ``ok``."""

    ok: bool
    #: Why it does not prove itself (one line); None when it does.
    why: str | None = None
    #: No label, an empty or truncated one, or missing files: it cannot restore as it is.
    incomplete: bool = False
    format: str = "unknown"  # plain, tar, snapshot (a kept snapshot) or unknown
    label: str | None = None  # the label's LABEL
    start_lsn: str | None = None
    start_tli: int | None = None
    start_wal: str | None = None  # the label's START WAL file: the first WAL the backup needs
    stop_lsn: str | None = None  # the newest WAL-Range's End-LSN
    stop_tli: int | None = None  # and its Timeline
    system_identifier: str | None = None  # None when nothing proves one (a version 1 manifest, not local)
    start_time: datetime | None = None  # the label's START TIME; None when its zone is not known
    manifest_checksum: str | None = None
    #: An incremental backup's parent, as its label names it (PostgreSQL 17+): the start LSN and timeline
    #: of the backup it was taken against; None for a full backup.
    incremental_from_lsn: str | None = None
    incremental_from_tli: int | None = None

    @property
    def incremental(self) -> bool:
        """An incremental backup: restored only with its chain (see :mod:`pg_safe_backup.incremental`)."""
        return self.incremental_from_lsn is not None

    @property
    def start_key(self) -> tuple[int, int, str] | None:
        """What an incremental's label names of its parent: (start LSN, start timeline, cluster); None
        unless proven with a cluster."""
        if not self.ok or self.start_lsn is None or self.start_tli is None or self.system_identifier is None:
            return None
        return parse_lsn(self.start_lsn), self.start_tli, self.system_identifier

    @property
    def parent_key(self) -> tuple[int, int, str] | None:
        """The :attr:`start_key` of the backup this incremental was taken against, as its label says; None
        for a full (or unless proven with a cluster)."""
        if not self.ok or self.incremental_from_lsn is None or self.system_identifier is None:
            return None
        return (
            parse_lsn(self.incremental_from_lsn),
            int(self.incremental_from_tli or 0),
            self.system_identifier,
        )

    def follows(self, parent: Proof) -> bool:
        """Whether ``parent`` is the backup this incremental was taken against, as both prove it: the parent
        starts where this one's label says, on that timeline, and both are of one cluster."""
        return self.parent_key is not None and self.parent_key == parent.start_key

    @property
    def status(self) -> str:
        """``proven``, ``incomplete: why`` or ``UNVERIFIABLE: why``."""
        if self.ok:
            return "proven"
        return f"{'incomplete' if self.incomplete else 'UNVERIFIABLE'}: {self.why}"

    @property
    def position(self) -> tuple[int, int]:
        """Where the backup ends in WAL, to order backups by: (stop LSN, stop timeline); (-1, -1) unproven."""
        if not self.ok or self.stop_lsn is None or self.stop_tli is None:
            return (-1, -1)
        return parse_lsn(self.stop_lsn), self.stop_tli

    def as_dict(self) -> dict[str, Any]:
        """JSON-able, with ``status``."""
        out = asdict(self)
        out["start_time"] = self.start_time.isoformat() if self.start_time else None
        return {"status": self.status, **out}


class _Unproven(Exception):
    def __init__(self, why: str, incomplete: bool = False) -> None:
        super().__init__(why)
        self.why, self.incomplete = why, incomplete


def _read(folder: Any, name: str, key: EncryptionKey | None = None) -> bytes | None:
    try:
        return read_file(folder, name, key, KEY_FLAGS)
    except CryptError as err:  # no key, another key, changed or cut: named, with the key id
        raise _Unproven(" ".join(str(err).split())) from None


def _format(folder: Any) -> str:
    if is_local_path(folder) and (Path(folder) / RECORD_NAME).is_file():
        return "snapshot"  # a kept snapshot: the entry holds the label files and manifest, the data is there
    if any((folder / tar).exists() or (folder / sealed(tar)).exists() for tar in BASE_TARS):
        return "tar"
    plain = any((folder / name).exists() for name in ("PG_VERSION", sealed("PG_VERSION")))
    return "plain" if plain else "unknown"


def _kept_data(folder: Any) -> Path:
    """The data directory of the kept snapshot catalogued in ``folder``."""
    try:
        kept = KeptSnapshot.read(Path(folder))
        assert kept is not None  # _format found its record
        return kept.tree()[0]
    except SnapshotError as err:
        raise _Unproven(" ".join(str(err).split()), incomplete=True) from None


def _label(raw: bytes | None) -> tuple[dict[str, str], str, int, str]:
    """The label's fields, start LSN, start timeline and start WAL file."""
    if raw is None:
        raise _Unproven(f"no {LABEL_NAME}", incomplete=True)
    if not raw.strip():
        raise _Unproven(f"{LABEL_NAME} is empty", incomplete=True)
    try:
        fields = parse_backup_label(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise _Unproven(f"{LABEL_NAME} is not text", incomplete=True) from None
    missing = [key for key in LABEL_KEYS if not fields.get(key)]
    if missing:
        raise _Unproven(f"{LABEL_NAME} is truncated or damaged: no {', '.join(missing)}", incomplete=True)
    start = start_wal_location(fields["START WAL LOCATION"])
    if not start or not fields["START TIMELINE"].isdigit():
        raise _Unproven(f"{LABEL_NAME} is damaged: cannot read its START WAL LOCATION / START TIMELINE")
    (lsn, wal), tli = start, int(fields["START TIMELINE"])
    # The file must hold the LSN on the label's timeline, for some segment size (it moves the WAL cut-off).
    if not any(wal == wal_file_holding(lsn, tli, size) for size in SEGMENT_SIZES):
        raise _Unproven(f"{LABEL_NAME}'s START WAL file {wal} does not hold {lsn} on timeline {tli}")
    return fields, lsn, tli, wal


def _manifest(raw: bytes | None, plain_major: int | None) -> tuple[dict[str, Any], str]:
    """The manifest, parsed, and its checksum, once its own checksum holds."""
    if raw is None:
        pg12 = (
            " (an earlier release wrote none for PostgreSQL 12: nothing proves its label)"
            if plain_major == 12
            else ""
        )
        raise _Unproven(f"no {MANIFEST_NAME}{pg12}")
    at = raw.rfind(_CHECKSUM_LINE)
    found = re.fullmatch(rb'"Manifest-Checksum": "([0-9a-f]{64})"\}\n?', raw[at + 1 :]) if at >= 0 else None
    if not found:
        raise _Unproven(f"{MANIFEST_NAME} has no Manifest-Checksum line at its end (truncated?)")
    checksum = found.group(1).decode()
    if hashlib.sha256(raw[: at + 1]).hexdigest() != checksum:
        raise _Unproven(f"{MANIFEST_NAME} fails its own Manifest-Checksum: changed after it was written")
    try:
        manifest = json.loads(raw)
    except ValueError as err:
        raise _Unproven(f"{MANIFEST_NAME} is not JSON: {err}") from None
    if not isinstance(manifest, dict) or manifest.get("PostgreSQL-Backup-Manifest-Version") not in (1, 2):
        raise _Unproven(f"{MANIFEST_NAME} is not a version 1 or 2 backup manifest")
    if not isinstance(manifest.get("Files"), list) or not isinstance(manifest.get("WAL-Ranges"), list):
        raise _Unproven(f"{MANIFEST_NAME} lacks its Files or WAL-Ranges")
    return manifest, checksum


def _listed(manifest: dict[str, Any], name: str) -> dict[str, Any] | None:
    for entry in manifest["Files"]:
        if isinstance(entry, dict) and (
            entry.get("Path") == name or entry.get("Encoded-Path") == name.encode().hex()
        ):
            return entry
    return None


def _check_listed(manifest: dict[str, Any], name: str, raw: bytes) -> None:
    """``raw`` is the file ``name`` the manifest lists: same size and checksum."""
    entry = _listed(manifest, name)
    if entry is None:
        raise _Unproven(f"{MANIFEST_NAME} does not list {name}")
    size = entry.get("Size")
    if isinstance(size, int) and len(raw) < size:
        raise _Unproven(
            f"{name} is {len(raw)} bytes, {MANIFEST_NAME} lists {size}: truncated", incomplete=True
        )
    if size != len(raw):
        raise _Unproven(f"{name} is {len(raw)} bytes, {MANIFEST_NAME} lists {size}")
    algorithm = str(entry.get("Checksum-Algorithm", "NONE")).upper()
    if algorithm == "CRC32C":
        computed = struct.pack("=I", crc32c(raw)).hex()  # host byte order, as pg_checksum_final()
    elif algorithm in _DIGESTS:
        computed = hashlib.new(_DIGESTS[algorithm], raw).hexdigest()
    else:
        raise _Unproven(f"{MANIFEST_NAME} gives {name} no checksum ({algorithm}): nothing proves it")
    if str(entry.get("Checksum", "")).lower() != computed:
        raise _Unproven(f"{name} does not match its {algorithm} checksum in {MANIFEST_NAME}")


def _wal_ranges(manifest: dict[str, Any], start_lsn: str, start_tli: int) -> tuple[str, int]:
    """The stop LSN and timeline (the newest range's), once the label's timeline range starts at its start."""
    ranges = manifest["WAL-Ranges"]
    try:
        parsed = [(int(r["Timeline"]), parse_lsn(r["Start-LSN"]), parse_lsn(r["End-LSN"]), r) for r in ranges]
    except (KeyError, TypeError, ValueError):
        raise _Unproven(f"{MANIFEST_NAME} has a malformed WAL-Range") from None
    if not parsed:
        raise _Unproven(f"{MANIFEST_NAME} has no WAL-Ranges")
    own = [p for p in parsed if p[0] == start_tli]
    if len(own) != 1 or own[0][1] != parse_lsn(start_lsn):
        raise _Unproven(
            f"{MANIFEST_NAME}'s WAL-Ranges do not start at the label's {start_lsn} on timeline {start_tli}"
        )
    stop_tli, _, stop, _ = max(parsed, key=lambda p: p[0])
    if stop < parse_lsn(start_lsn) or any(p[2] < p[1] for p in parsed):
        raise _Unproven(f"{MANIFEST_NAME}'s WAL-Ranges end before they start")
    return format_lsn(stop), stop_tli  # as the label and pg_backup_stop print it, whatever the major


def _system_identifier(folder: Any, manifest: dict[str, Any], fmt: str) -> str | None:
    """The cluster's system identifier as the manifest (version 2) and a local plain copy's pg_control
    prove it; they must agree. None when neither says."""
    said = manifest.get("System-Identifier") if manifest["PostgreSQL-Backup-Manifest-Version"] == 2 else None
    if said is not None and not isinstance(said, int):
        raise _Unproven(f"{MANIFEST_NAME}'s System-Identifier is not a number")
    control = None
    # An encrypted copy's pg_control is not read here (its manifest's System-Identifier names the cluster).
    if fmt == "plain" and is_local_path(folder) and not (folder / sealed(CONTROL)).exists():
        try:
            # The file read must be the one listed, or a copied-in pg_control would name the cluster;
            # listed without a checksum (manifest_checksums=NONE before this release), it names none.
            entry = _listed(manifest, CONTROL)
            if entry is not None and entry.get("Checksum-Algorithm", "NONE") != "NONE":
                _check_listed(manifest, CONTROL, (Path(folder) / CONTROL).read_bytes())
                control = read_pg_control(Path(folder)).system_identifier
            elif entry is None:
                raise _Unproven(f"{MANIFEST_NAME} does not list {CONTROL}")
        except BadPgControl as err:
            raise _Unproven(" ".join(str(err).split())) from None
        except FileNotFoundError:
            raise _Unproven(f"no {CONTROL}", incomplete=True) from None
    if said is not None and control is not None and said != control:
        raise _Unproven(f"{MANIFEST_NAME}'s System-Identifier {said} is not global/pg_control's {control}")
    found = said if said is not None else control
    return None if found is None else str(found)


def prove_backup(folder: Any, key: EncryptionKey | None = None) -> Proof:
    """What the backup in ``folder`` proves about itself (see the module docstring); never raises for
    what is on disk, only names it.

    :param folder: the backup's top folder: a local ``Path`` or an ``ObjectStoragePath``.
    :param key: the key of an encrypted backup.
    """
    fmt = "unknown"
    try:
        fmt = _format(folder)
        raw_label = _read(folder, LABEL_NAME, key)
        fields, start_lsn, start_tli, start_wal = _label(raw_label)
        try:
            parent = incremental_from(fields)
        except ValueError as err:
            raise _Unproven(f"{LABEL_NAME}: {err}") from None
        if fmt == "unknown":
            raise _Unproven("neither PG_VERSION nor base.tar: no data directory copy", incomplete=True)
        major, copy = None, folder  # copy: where the data directory is (a kept snapshot's own)
        if fmt == "snapshot":
            copy = _kept_data(folder)
        if fmt in ("plain", "snapshot") and (version := _read(copy, "PG_VERSION", key)) is not None:
            major = int(version.strip()) if version.strip().isdigit() else None
        manifest, checksum = _manifest(_read(folder, MANIFEST_NAME, key), major)
        assert raw_label is not None  # _label raised otherwise
        _check_listed(manifest, LABEL_NAME, raw_label)
        raw_map = _read(folder, MAP_NAME, key)
        if raw_map is not None:
            _check_listed(manifest, MAP_NAME, raw_map)
        elif _listed(manifest, MAP_NAME) is not None:
            raise _Unproven(f"{MAP_NAME} is listed in {MANIFEST_NAME} but missing", incomplete=True)
        stop_lsn, stop_tli = _wal_ranges(manifest, start_lsn, start_tli)
        system_identifier = _system_identifier(copy, manifest, "plain" if fmt == "snapshot" else fmt)
    except _Unproven as err:
        return Proof(ok=False, why=err.why, incomplete=err.incomplete, format=fmt)
    except OSError as err:
        return Proof(ok=False, why=f"cannot read it: {' '.join(str(err).split())}", format=fmt)
    return Proof(
        ok=True,
        format=fmt,
        label=fields.get("LABEL"),
        start_lsn=start_lsn,
        start_tli=start_tli,
        start_wal=start_wal,
        stop_lsn=stop_lsn,
        stop_tli=stop_tli,
        system_identifier=system_identifier,
        start_time=label_start_time(fields.get("START TIME")),
        manifest_checksum=checksum,
        incremental_from_lsn=parent[0] if parent else None,
        incremental_from_tli=parent[1] if parent else None,
    )


__all__ = ["LABEL_NAME", "Proof", "label_start_time", "prove_backup"]
