"""A WAL segment's long page header (which cluster wrote it), and fsync by path: what every
``archive_command`` call needs of the WAL format, in a module that imports only ``os`` and ``struct``
(``wal-push`` runs once per segment; :mod:`pg_safe_backup.files.wal` re-exports these).
"""

from __future__ import annotations

import os
import struct

from pg_safe_backup.errors import PermanentError

#: XLogLongPageHeaderData (access/xlog_internal.h): xlp_magic u16, xlp_info u16, xlp_tli u32, xlp_pageaddr
#: u64, xlp_rem_len u32, padding to 24, xlp_sysid u64, xlp_seg_size u32, xlp_xlog_blcksz u32.
LONG_HEADER = struct.Struct("<HHIQI4xQII")
#: xlp_info's XLP_LONG_HEADER bit: set on the first page of every segment.
XLP_LONG_HEADER = 0x0002


class NotWal(PermanentError, ValueError):
    """A file is not a WAL segment with a long page header (the message names it)."""


def header_system_identifier(head: bytes, what: str) -> int:
    """The system identifier in a WAL segment's first bytes (its long page header).

    :param head: the segment's first bytes (at least the long page header's 40).
    :param what: the segment's name or path, for the error.
    :raises NotWal: too short, or no long header.
    """
    if len(head) < LONG_HEADER.size:
        raise NotWal(f"{what} is not a WAL segment: {len(head)} bytes")
    _magic, info, _tli, _addr, _rem, sysid, _seg, _blck = LONG_HEADER.unpack(head[: LONG_HEADER.size])
    if not info & XLP_LONG_HEADER:
        raise NotWal(f"{what} is not a WAL segment: its first page has no long header")
    return sysid


def file_system_identifier(path: str | os.PathLike[str]) -> int:
    """The system identifier of the plain WAL segment ``path`` (as PostgreSQL wrote it; a stored,
    compressed or encrypted one: :func:`pg_safe_backup.files.wal.segment_system_identifier`).

    :raises NotWal: too short, or no long header.
    :raises OSError: it cannot be read.
    """
    with open(path, "rb") as f:
        return header_system_identifier(f.read(LONG_HEADER.size), os.fspath(path))


def fsync_path(path: str | os.PathLike[str]) -> None:
    """fsync a file or a folder by its path (a folder: its entries, after a rename or a link into it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
