"""A WAL archive managed by ``pg-safe-backup wal-push``: its names and its identity file.

The archive is a flat folder (a local one, or a prefix in an object store), as ``cp %p ARCHIVE/%f``
leaves it, so an archive written by ``cp`` and one written by ``wal-push`` read the same:

- every file PostgreSQL archives (a segment, ``.partial``, ``.history``, ``.backup``) is stored under its
  own name, then the compression's suffix (:data:`COMPRESSIONS`), then :data:`crypt.SUFFIX` when
  encrypted: ``000000010000000000000003.zst.enc``; one stored file per name;
- :data:`IDENTITY_FILE` at the top, written once by the first push, names the cluster whose WAL this is
  (system identifier, major, segment size): a push from another cluster is refused.

Imports nothing of the package outside ``files/`` (a leaf family).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from pg_safe_backup.errors import PermanentError
from pg_safe_backup.files.crypt import SUFFIX as ENCRYPTED_SUFFIX

#: The archive's identity, at its top.
IDENTITY_FILE = "pg_safe_backup_archive.json"
#: The identity file's format.
IDENTITY_FORMAT = 1
#: Compression name -> file-name suffix ("none": stored as PostgreSQL wrote it).
COMPRESSIONS = {"none": "", "gzip": ".gz", "lz4": ".lz4", "zstd": ".zst"}
_BY_SUFFIX = {suffix: name for name, suffix in COMPRESSIONS.items() if suffix}
#: What PostgreSQL archives: a segment (maybe .partial), a timeline history, a backup history file.
ARCHIVED_NAME = re.compile(
    r"^(?:[0-9A-F]{24}(?:\.partial)?|[0-9A-F]{8}\.history|[0-9A-F]{24}\.[0-9A-F]{8}\.backup)$"
)


class ArchiveFormatError(PermanentError, ValueError):
    """An archive's identity file or a stored name that this module cannot read."""


@dataclass(frozen=True)
class StoredName:
    """What a stored file's name says.

    :param name: the name PostgreSQL gave the file (``%f``).
    :param compression: a key of :data:`COMPRESSIONS`.
    :param encrypted: whether the stored bytes are in :mod:`pg_safe_backup.files.crypt`'s format.
    """

    name: str
    compression: str = "none"
    encrypted: bool = False

    @property
    def stored(self) -> str:
        """The stored file's name."""
        return self.name + COMPRESSIONS[self.compression] + (ENCRYPTED_SUFFIX if self.encrypted else "")


def parse_stored_name(stored: str) -> StoredName | None:
    """What ``stored`` (a file name in the archive) holds, or None when it is not an archived file (the
    identity file, a temporary file of a push in progress, anything else).

    :param stored: a file name, without its folder.
    """
    name, encrypted = stored, False
    if name.endswith(ENCRYPTED_SUFFIX):
        name, encrypted = name[: -len(ENCRYPTED_SUFFIX)], True
    compression = "none"
    for suffix, codec in _BY_SUFFIX.items():
        if name.endswith(suffix):
            name, compression = name[: -len(suffix)], codec
            break
    if not ARCHIVED_NAME.match(name):
        return None
    return StoredName(name, compression, encrypted)


@dataclass(frozen=True)
class ArchiveIdentity:
    """The cluster an archive belongs to.

    :param system_identifier: pg_control's (and every segment's long page header's) system identifier.
    :param major: the PostgreSQL major that wrote the WAL.
    :param wal_segment_size: bytes per segment.
    """

    system_identifier: int
    major: int
    wal_segment_size: int

    def to_json(self) -> bytes:
        """The identity file's bytes (the identifier as a string: JSON readers lose 64-bit integers)."""
        body = {
            "format": IDENTITY_FORMAT,
            "system_identifier": str(self.system_identifier),
            "major": self.major,
            "wal_segment_size": self.wal_segment_size,
        }
        return (json.dumps(body, indent=2) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> ArchiveIdentity:
        """Read an identity file.

        :param data: its bytes.
        :param where: its path or URL, for the error.
        :raises ArchiveFormatError: not an identity file of a format this version reads.
        """
        try:
            body = json.loads(data)
            if body.get("format") != IDENTITY_FORMAT:
                raise ArchiveFormatError(
                    f"{where}: archive identity format {body.get('format')!r}; this version reads"
                    f" {IDENTITY_FORMAT}"
                )
            return cls(int(body["system_identifier"]), int(body["major"]), int(body["wal_segment_size"]))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            if isinstance(err, ArchiveFormatError):
                raise
            raise ArchiveFormatError(
                f"{where}: not an archive identity file ({err.__class__.__name__})"
            ) from None
