"""Does a copied data directory belong to a backup label? Read from the copy's global/pg_control.

ControlFileData (src/include/catalog/pg_control.h) starts, in every release since 9.x, with
``uint64 system_identifier; uint32 pg_control_version; uint32 catalog_version_no; DBState state;
pg_time_t time; XLogRecPtr checkPoint`` in native byte order: 8 + 4 + 4 + 4 (+4 padding) + 8, so
the last checkpoint's LSN sits at offset 32.
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

from pg_safe_backup.state import format_lsn, parse_backup_label, parse_lsn

_HEADER = struct.Struct("=QIIi4xqQ")


class CopyMismatch(Exception):
    """The copy cannot belong to this backup; storing its label would make a corrupt restore."""


def read_pg_control(datadir: Path) -> tuple[int, int]:
    """(system identifier, last checkpoint LSN) of the data directory's global/pg_control."""
    raw = (datadir / "global" / "pg_control").read_bytes()[: _HEADER.size]
    system_identifier, _version, _catalog, _state, _time, checkpoint = _HEADER.unpack(raw)
    if sys.byteorder != "little":  # pragma: no cover - documentation of the assumption
        raise CopyMismatch("pg_control can only be read on the byte order it was written with")
    return system_identifier, checkpoint


def check_copy(datadir: Path, system_identifier: int | str | None, backup_label: str) -> None:
    """Raise CopyMismatch unless the copy in ``datadir`` can belong to this backup.

    The copy's system identifier must be the source cluster's, and its checkpoint must not be
    older than the label's CHECKPOINT LOCATION (else it was copied before the backup started).
    """
    copy_id, copy_checkpoint = read_pg_control(datadir)
    if system_identifier is not None and copy_id != int(system_identifier) % (1 << 64):
        raise CopyMismatch(
            f"the copy in {datadir} is of another cluster: its system identifier is {copy_id}, the backed up"
            f" cluster's is {int(system_identifier) % (1 << 64)}; refusing to store this backup_label there"
        )
    label_checkpoint = parse_backup_label(backup_label).get("CHECKPOINT LOCATION")
    if label_checkpoint and copy_checkpoint < parse_lsn(label_checkpoint):
        raise CopyMismatch(
            f"the copy in {datadir} was taken before this backup started: its last checkpoint is"
            f" {format_lsn(copy_checkpoint)}, older than the label's CHECKPOINT LOCATION {label_checkpoint};"
            " refusing to store this backup_label there"
        )
