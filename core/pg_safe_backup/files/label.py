"""Store a backup's backup_label and tablespace_map into its copy: a local folder or any object store."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from pg_safe_backup.files.copier import is_local_path
from pg_safe_backup.files.crypt import SUFFIX, EncryptionKey, encrypt_bytes
from pg_safe_backup.files.manifest import write_atomically
from pg_safe_backup.files.pgcontrol import check_copy
from pg_safe_backup.files.xlog import parse_backup_label

#: The files pg_backup_stop() returns, which a restore needs in the copy's top folder.
LABEL_FILES = ("backup_label", "tablespace_map")
_log = logging.getLogger(__name__)


class Destination(Protocol):
    """What the store needs of a destination: ``pathlib.Path`` and Airflow's ``ObjectStoragePath`` both are
    one."""

    def __truediv__(self, name: str) -> Destination: ...
    def exists(self) -> bool: ...
    def read_text(self) -> str: ...
    def write_bytes(self, data: bytes) -> Any: ...
    def unlink(self) -> None: ...
    def mkdir(self, parents: bool = ..., exist_ok: bool = ...) -> None: ...


def store_label(
    destination: Destination,
    files: Mapping[str, str | None],
    *,
    local_copy: Path | None,
    system_identifier: int | str | None,
    stop_lsn: str | None,
    key: EncryptionKey | None = None,
    log: logging.Logger | Any = _log,
) -> dict[str, str]:
    """Check the copy against the label, remove label files an earlier attempt left, write this backup's.

    A copy gets its label only when it can belong to this backup (:func:`check_copy`: system
    identifier, checkpoint not before the label's CHECKPOINT LOCATION nor at or past the stop LSN),
    as far as its global/pg_control can be read here: when it cannot, the log says why. A
    ``backup_label`` or ``tablespace_map`` already in the destination is an earlier attempt's (a run
    cleared and copied again into the same folder): it is removed, and logged, before the new ones
    are written, so a tablespace_map this backup does not have never stays beside its label. In a
    local folder each file is written whole and synced with its folder before this returns.

    :param destination: the folder (or object store prefix) of the copy.
    :param files: ``backup_label`` (required) and ``tablespace_map`` (None or empty when the backup has none).
    :param local_copy: the destination as a local path, or None for an object store.
    :param system_identifier: the backed up cluster's, or None to not compare.
    :param stop_lsn: the backup's stop LSN, or None to not compare.
    :param key: store them encrypted with it, as ``backup_label.enc`` and ``tablespace_map.enc``.
    :param log: where to say what was checked, skipped and removed.
    :returns: name -> location of each file written.
    :raises CopyMismatch: the copy cannot belong to this backup; nothing was removed or written.
    :raises OSError: the destination cannot be written.
    """
    label = files["backup_label"]
    if not label:
        raise ValueError("store_label needs the backup_label text")
    if local_copy is None:
        log.warning(
            "not checking that the copy in %s belongs to this backup: it is in an object store, whose"
            " global/pg_control is not read here",
            destination,
        )
    elif not (local_copy / "global" / "pg_control").is_file():
        log.warning(
            "not checking that the copy in %s belongs to this backup: it has no global/pg_control (is the"
            " data directory copied somewhere else?)",
            local_copy,
        )
    else:
        check_copy(local_copy, system_identifier, label, stop_lsn)
        log.info(
            "the copy in %s belongs to this backup (system identifier; checkpoint from its start, before its"
            " stop LSN %s)",
            local_copy,
            stop_lsn,
        )
    destination.mkdir(parents=True, exist_ok=True)
    for name in [n + suffix for n in LABEL_FILES for suffix in ("", SUFFIX)]:
        stale = destination / name
        if stale.exists():
            fields = parse_backup_label(stale.read_text()) if name == "backup_label" else {}
            stale.unlink()
            log.warning(
                "removed the %s an earlier attempt left in %s%s",
                name,
                destination,
                f" (START WAL LOCATION {fields.get('START WAL LOCATION')}, LABEL {fields.get('LABEL')})"
                if fields
                else "",
            )
    folder = local_copy if local_copy is not None else destination
    written = {}
    for name in LABEL_FILES:
        if files.get(name):
            # UTF-8 whatever the locale: the manifest's checksum of it is of these bytes.
            content = files[name].encode("utf-8")
            stored = name
            if key is not None:
                content, stored = encrypt_bytes(content, key), name + SUFFIX
            if is_local_path(folder):
                # Synced under a temporary name, renamed, its folder synced (with the removals above): on
                # disk before the manifest and the catalog say the backup exists.
                write_atomically(folder / stored, content, f"{stored}.tmp")
            else:
                (destination / stored).write_bytes(content)  # an object exists whole once its put returned
            written[name] = str(destination / stored)
    return written
