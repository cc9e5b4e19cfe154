"""After the copy, what goes where: the label files (checked against the copy), the backup's WAL
(``include_wal``), its ``backup_manifest``, and last its catalog entry, so that a backup is listed only once
everything else of it is stored.

Airflow-free: :class:`~pg_safe_backup.operators.backup.PostgresStoreBackupLabelOperator` renders its fields,
calls :func:`store_backup` and maps its errors by their branch of :mod:`pg_safe_backup.errors` (a
:class:`~pg_safe_backup.errors.PermanentError` is never retried; :class:`StoreFailed`, a retry may
succeed). A folder is a :class:`pathlib.Path` or an object-store path (``ObjectStoragePath``:
``protocol``, ``path``, ``/``).

:class:`CopyRecords` is what the copy tasks hand the store through XCom: every file's size, time and SHA-256,
from which the manifest is written without reading the copy again (and for an object store or tar copy,
which is not read back at all).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pg_safe_backup.catalog import info_for_backup, write_info
from pg_safe_backup.errors import PermanentError, TransientError
from pg_safe_backup.files.copier import CopyResult, file_sha256, is_local_path
from pg_safe_backup.files.crypt import SUFFIX, EncryptionKey, encrypt_bytes
from pg_safe_backup.files.label import LABEL_FILES, store_label
from pg_safe_backup.files.layout import walk
from pg_safe_backup.files.manifest import (
    MANIFEST_NAME,
    FileRecord,
    backup_manifest_of_records,
    manifest_checksum,
    write_atomically,
    write_backup_manifest,
    write_manifest_file,
)
from pg_safe_backup.files.pgcontrol import CopyMismatch, check_copy, read_pg_control
from pg_safe_backup.files.wal import WalMissing, include_wal
from pg_safe_backup.snapshots.base import RECORD_NAME, KeptSnapshot, SnapshotError

_log = logging.getLogger(__name__)

#: The finish's XCom keys of the timeline a backup stopped on (a standby may follow a promotion).
TIMELINE_KEYS = ("stop_timeline", "timeline_history")
#: What the store needs of the finish's result (its XCom keys).
BACKUP_KEYS = ("backup_label", "tablespace_map", "system_identifier", "stop_lsn", *TIMELINE_KEYS)
#: What of the backup's DAG run the catalog entry names.
RUN_KEYS = ("dag_id", "run_id", "task_id", "map_index", "attempt")
#: The manifest algorithms a copy not read back can have: its copier's SHA-256, or none (sizes only).
RECORDED_CHECKSUMS = ("SHA256", "NONE")


class StoreRefused(PermanentError):
    """The backup cannot be stored as asked (its WAL into an object store): storing it again would fail the
    same way. The copy's own refusals (:class:`~pg_safe_backup.files.pgcontrol.CopyMismatch`, a manifest
    that cannot be made, a tablespace without a copy) are permanent errors of their own."""


class StoreFailed(TransientError):
    """The destination could not be written, or the WAL the backup needs is not in the archive (yet): a
    retry may succeed."""


@dataclass(frozen=True)
class CopyRecords:
    """What the group's copy tasks recorded of the copy: the copied server's major, each file's record, the
    copy's format and compression. Both halves of its XCom codec (JSON): :meth:`to_xcom` and
    :meth:`from_xcom`."""

    major: int
    files: dict[str, FileRecord]
    format: str = "plain"
    compression: str = "none"
    #: The id of the key the copy was encrypted with (never the key); None: not encrypted.
    key_id: str | None = None

    @classmethod
    def of_copy(
        cls,
        result: CopyResult,
        major: int,
        format: str = "plain",
        compression: str = "none",
        key_id: str | None = None,
    ) -> CopyRecords:
        """The records of one copy.

        :param result: the copy's result.
        :param major: the copied server's major version.
        :param format: ``plain`` or ``tar``.
        :param compression: the tar archives' (``none`` for plain).
        :param key_id: the id of the key it was encrypted with, if it was.
        """
        files = {
            path: FileRecord(result.sizes[path], result.mtimes_ns[path], digest)
            for path, digest in result.checksums.items()
        }
        return cls(major, files, format, compression, key_id)

    def to_xcom(self) -> dict[str, Any]:
        """``{"major": N, "format": ..., "compression": ..., "key_id": ..., "files": {path: [size, mtime_ns,
        sha256]}}`` (``key_id`` only for an encrypted copy)."""
        return {
            "major": self.major,
            "format": self.format,
            "compression": self.compression,
            **({"key_id": self.key_id} if self.key_id else {}),
            "files": {path: list(record) for path, record in self.files.items()},
        }

    @classmethod
    def from_xcom(cls, pushed: Iterable[dict[str, Any] | None]) -> CopyRecords | None:
        """The records the copy tasks pushed (:meth:`to_xcom`), merged; None when none pushed any.

        :param pushed: each copy task's XCom ``files`` (None: it pushed none).
        """
        major, files, kind = None, {}, ("plain", "none", None)
        for value in pushed:
            if value:
                major = value["major"]
                kind = (value.get("format", "plain"), value.get("compression", "none"), value.get("key_id"))
                files.update({path: FileRecord(*record) for path, record in value["files"].items()})
        return cls(major, files, *kind) if major is not None else None

    def checksums(self) -> dict[str, str]:
        """Backup path -> SHA-256."""
        return {path: record.sha256 for path, record in self.files.items()}

    @classmethod
    def of_tree(cls, data: Path, tablespaces: Mapping[str, Path] | None = None) -> CopyRecords:
        """The records of the data directory ``data`` read where it is (a kept snapshot that no copy read),
        each tablespace from ``tablespaces`` (oid -> folder): what a copy of it would record."""
        files = {}
        for entry in walk(data, tablespaces=tablespaces):
            if not entry.is_dir:
                mtime_ns = entry.source.stat().st_mtime_ns
                digest, size = file_sha256(entry.source)
                files[entry.path] = FileRecord(size, mtime_ns, digest)
        return cls(int((data / "PG_VERSION").read_text().strip()), files)


def local_folder(folder: Any) -> Path | None:
    """``folder`` as a local path (a plain path, or an object-store path of the local file system), or
    None for an object store."""
    if is_local_path(folder):
        return folder
    return Path(folder.path) if folder.protocol in ("", "file") else None


def store_backup(
    folder: Any,
    backup: Mapping[str, Any],
    copied: CopyRecords | None = None,
    run: Mapping[str, Any] | None = None,
    *,
    manifest: bool = True,
    manifest_checksums: str = "SHA256",
    wal_archive: Path | None = None,
    where: str | None = None,
    key: EncryptionKey | None = None,
    log: logging.Logger | Any = _log,
) -> dict[str, Any]:
    """Write ``backup``'s label files into ``folder`` (checked against the copy there), then its WAL (with
    ``wal_archive``), its backup_manifest and its catalog entry, in that order.

    :param folder: the copy's folder: a path, or an object-store path.
    :param backup: the finish's result (:data:`BACKUP_KEYS`; the timeline keys absent: the backup stopped
        on its start's timeline).
    :param copied: the copy tasks' records: the manifest reads no file of them.
    :param run: the backup's DAG run (:data:`RUN_KEYS`), for the catalog entry.
    :param manifest: write a backup_manifest.
    :param manifest_checksums: its checksum algorithm (SHA256, SHA224, SHA384, SHA512, CRC32C, NONE).
    :param wal_archive: copy the WAL the backup needs from this archive into the copy (local folders only).
    :param where: how messages name the folder (default: the folder).
    :param key: the key the copy was encrypted with: the label files and the manifest are stored encrypted
        with it too (``backup_label.enc``, ...), the catalog entry names its id
        (:mod:`pg_safe_backup.encryption`).
    :param log: where to say what was written, checked and skipped.
    :returns: name -> location of each file written (backup_label, tablespace_map, backup_manifest,
        backup_info), and ``wal``: the WAL files copied.
    :raises PermanentError: the backup cannot be stored as it is (:class:`StoreRefused`, ``CopyMismatch``,
        ``ManifestError``, ``TablespaceNotCopied``): never retried.
    :raises StoreFailed: the folder cannot be written, or the WAL is not archived.
    """
    where = where if where is not None else str(folder)
    local_copy = local_folder(folder)
    if wal_archive is not None and local_copy is None:
        raise StoreRefused(f"include_wal needs a local or mounted destination; {where!r} is an object store")
    check_encryption(local_copy, copied, key, where, wal_archive is not None)
    files = {"backup_label": backup["backup_label"], "tablespace_map": backup.get("tablespace_map")}
    try:
        written: dict[str, Any] = store_label(
            folder,
            files,
            local_copy=local_copy,
            log=log,
            system_identifier=backup.get("system_identifier"),
            stop_lsn=backup.get("stop_lsn"),
            key=key,
        )
    except OSError as err:  # CopyMismatch, a PermanentError, goes up as it is
        raise StoreFailed(f"cannot write the backup label into destination {where!r}: {err}") from err
    log.info("stored %s", ", ".join(written.values()))
    try:
        if wal_archive is not None and local_copy is not None:
            written["wal"] = include_wal(
                local_copy,
                wal_archive,
                backup_label=backup["backup_label"],
                stop_lsn=backup["stop_lsn"],
                **_timelines(backup),
                log=log,
            )
        made = write_manifest(folder, backup, copied, manifest_checksums, log, key) if manifest else None
        if made:
            written["backup_manifest"] = made[0]
        written["backup_info"] = write_entry(
            folder, backup, copied, run or {}, made[1] if made else None, log, key.key_id if key else None
        )
    except (OSError, WalMissing) as err:  # ManifestError, TablespaceNotCopied: PermanentErrors, as they are
        raise StoreFailed(f"cannot complete the backup in destination {where!r}: {err}") from err
    return written


def check_encryption(
    local_copy: Path | None, copied: CopyRecords | None, key: EncryptionKey | None, where: str, with_wal: bool
) -> None:
    """Refuse to store a label and manifest whose encryption does not match the copy's: a plain local copy
    is never encrypted, a copy encrypted with one key gets no label encrypted with another (or none).

    :param local_copy: the destination as a local path (None: an object store).
    :param copied: the copy tasks' records (their ``key_id``).
    :param key: the store's key.
    :param where: how messages name the folder.
    :param with_wal: include_wal was asked for.
    :raises StoreRefused: the reason, naming the parameter.
    """
    copy_key = copied.key_id if copied else None
    given = key.key_id if key else None
    if key is not None and _copy_kind(local_copy, copied)[0]:
        raise StoreRefused(
            f"encryption_conn_id: {where!r} is a plain copy in a local folder, which is stored unencrypted"
            " (use format='tar' or an object store to encrypt, or an encrypted file system)"
        )
    if key is not None and with_wal:
        raise StoreRefused("encryption_conn_id with include_wal: the WAL would be stored unencrypted")
    if copied is not None and copy_key != given:
        copy_is = f"encrypted with key {copy_key}" if copy_key else "not encrypted"
        store_has = f"gives key {given}" if given else "is not set"
        raise StoreRefused(
            f"the copy in {where!r} is {copy_is}, the store's encryption_conn_id {store_has}: give the copy"
            " and store tasks the same encryption_conn_id"
        )


def write_manifest(
    folder: Any,
    backup: Mapping[str, Any],
    copied: CopyRecords | None,
    checksums: str = "SHA256",
    log: logging.Logger | Any = _log,
    key: EncryptionKey | None = None,
) -> tuple[str, str] | None:
    """Write the copy's backup_manifest: a local data directory's from the copy itself (its records' checksums
    spare a second read), any other's from the records alone. Which one, if any:

    * no manifest where the major is unknown (an object store or tar archives, and no records); a copy of
      PostgreSQL 12, which has no manifest of its own, gets version 1 (it proves itself from it);
    * a copy not read back gets one only with the records' algorithm, SHA256, or NONE.

    :param folder: the copy's folder: a path, or an object-store path.
    :param backup: the finish's result (:data:`BACKUP_KEYS`).
    :param copied: the copy tasks' records.
    :param checksums: the manifest's checksum algorithm.
    :param log: where to say what was written, or why nothing was.
    :param key: store it encrypted (``backup_manifest.enc``); its checksums and Manifest-Checksum are of the
        plaintext, which ``pg_verifybackup`` checks once decrypted.
    :returns: where it was written and its Manifest-Checksum; None (and a log line saying why) when there is
        none to write.
    """
    local_copy = local_folder(folder)
    plain_local, major = _copy_kind(local_copy, copied)
    if major is None:
        log.warning(
            "no backup_manifest: %s is an object store or tar archives, and no copy task of this group"
            " (PostgresCopyDataDirectoryOperator) handed over the records of its files",
            folder,
        )
        return None
    if not plain_local:
        if checksums not in RECORDED_CHECKSUMS:
            log.warning(
                "no backup_manifest: the copy in %s is not read back, and its copier's checksums are"
                " SHA256 (manifest_checksums=%s)",
                folder,
                checksums,
            )
            return None
        assert copied is not None  # the major came from the records
        content = backup_manifest_of_records(
            copied.files,
            label_files={name: backup.get(name) for name in LABEL_FILES},
            stop_lsn=backup["stop_lsn"],
            system_identifier=backup.get("system_identifier"),
            major=major,
            checksum_algorithm=checksums,
            **_timelines(backup),
        )
        if key is not None:
            name = MANIFEST_NAME + SUFFIX
            if local_copy is not None:
                write_atomically(local_copy / name, encrypt_bytes(content, key), f"{name}.tmp")
            else:
                (folder / name).write_bytes(encrypt_bytes(content, key))
            where = str((local_copy if local_copy is not None else folder) / name)
        elif local_copy is not None:
            where = str(write_manifest_file(local_copy, content))
        else:
            (folder / MANIFEST_NAME).write_bytes(content)
            where = str(folder / MANIFEST_NAME)
        log.info(
            "wrote %s: %d files, from the copy's records; check it with pg_verifybackup",
            where,
            len(copied.files),
        )
        return where, manifest_checksum(content)
    assert local_copy is not None  # a plain local copy
    summary = write_backup_manifest(
        local_copy,
        backup_label=backup["backup_label"],
        stop_lsn=backup["stop_lsn"],
        system_identifier=backup.get("system_identifier"),
        checksum_algorithm=checksums,
        checksums=copied.checksums() if copied and checksums == "SHA256" else None,
        **_timelines(backup),
    )
    log.info(
        "wrote %s: %d files, %.1f MB, %s checksums (%.1f MB read here, the rest from the copy's"
        " checksums), in %.1f s; check it with: pg_verifybackup %s",
        summary.path,
        summary.files,
        summary.bytes / 1e6,
        summary.checksum_algorithm,
        summary.hashed_bytes / 1e6,
        summary.seconds,
        local_copy,
    )
    return str(summary.path), summary.checksum


def write_entry(
    folder: Any,
    backup: Mapping[str, Any],
    copied: CopyRecords | None,
    run: Mapping[str, Any],
    manifest_sum: str | None,
    log: logging.Logger | Any = _log,
    key_id: str | None = None,
) -> str:
    """Write the backup's catalog entry (``backup_info.json``, :mod:`pg_safe_backup.catalog`), last: a backup
    is listed once everything else of it is stored.

    :param folder: the copy's folder: a path, or an object-store path.
    :param backup: the finish's result (:data:`BACKUP_KEYS`).
    :param copied: the copy tasks' records (format, compression, files and bytes).
    :param run: the backup's DAG run (:data:`RUN_KEYS`).
    :param manifest_sum: the manifest's Manifest-Checksum, when one was written.
    :param log: where to say where it was written.
    :param key_id: the id of the key the backup is encrypted with (never the key).
    :returns: where it was written.
    """
    local_copy = local_folder(folder)
    plain_local, major = _copy_kind(local_copy, copied)
    segment_size = None  # names the stop WAL file: 16 MB unless the copy's pg_control says otherwise
    if plain_local:
        try:
            segment_size = read_pg_control(local_copy).xlog_seg_size
        except (CopyMismatch, OSError):
            pass  # the label was checked against it already, or there is none to check
    info = info_for_backup(
        backup_label=backup["backup_label"],
        stop_lsn=backup["stop_lsn"],
        tablespace_map=backup.get("tablespace_map"),
        system_identifier=backup.get("system_identifier"),
        pg_major=major,
        wal_segment_size=segment_size,
        stop_timeline=backup.get("stop_timeline"),
        format=copied.format if copied else ("plain" if major else "unknown"),
        compression=copied.compression if copied and copied.compression != "none" else None,
        bytes=sum(r.size for r in copied.files.values()) if copied else None,
        files=len(copied.files) if copied else None,
        manifest_checksum=manifest_sum,
        encryption_key_id=key_id,
        **{key: run.get(key) for key in RUN_KEYS},
    )
    written = write_info(local_copy if local_copy is not None else folder, info)
    log.info("catalogued the backup in %s (list them with: pg-safe-backup list ROOT)", written)
    return written


def _timelines(backup: Mapping[str, Any]) -> dict[str, Any]:
    """The stop's timeline and its history, as the manifest and include_wal take them."""
    return {key: backup.get(key) for key in TIMELINE_KEYS}


def _copy_kind(local_copy: Path | None, copied: CopyRecords | None) -> tuple[bool, int | None]:
    """Whether the copy is a local data directory tree, and the copied server's major: its PG_VERSION,
    else the copy task's records (None: unknown)."""
    if local_copy is not None and (local_copy / "PG_VERSION").is_file():
        return True, int((local_copy / "PG_VERSION").read_text().strip())
    return False, copied.major if copied else None


def catalog_kept_snapshot(
    entry: Path,
    kept: KeptSnapshot,
    backup: Mapping[str, Any],
    copied: CopyRecords | None,
    run: Mapping[str, Any] | None = None,
    log: logging.Logger | Any = _log,
) -> dict[str, Any]:
    """Catalogue the snapshots ``kept`` as a backup in the new folder ``entry``: its record
    (:data:`~pg_safe_backup.snapshots.base.RECORD_NAME`), label files, backup_manifest and catalog entry, in
    that order, each synced; the data stays in the snapshots (``pg-safe-backup restore`` reads them).

    The snapshot of the data directory must belong to the backup, as a copy must (its pg_control: system
    identifier, checkpoint from the backup's start, before its stop).

    :param entry: the entry folder (absent: one folder per backup attempt).
    :param kept: the snapshots and the live data directory they are of.
    :param backup: the finish's result (:data:`BACKUP_KEYS`).
    :param copied: the copy-out's records of the same files (read from the same snapshots); None: the
        snapshots are read here, once, for the manifest's checksums.
    :param run: the backup's DAG run (:data:`RUN_KEYS`), for the catalog entry.
    :returns: name -> location of each file written.
    :raises StoreRefused: ``entry`` exists, a snapshot is gone, or the snapshot does not belong to the backup.
    """
    try:
        data, tablespaces = kept.tree()
        check_copy(data, backup.get("system_identifier"), backup["backup_label"], backup.get("stop_lsn"))
    except (SnapshotError, CopyMismatch) as err:
        raise StoreRefused(f"the snapshots cannot be kept as this backup: {err}") from err
    try:
        entry.mkdir()
    except FileExistsError:
        raise StoreRefused(f"{entry} already exists: another attempt's kept snapshot, or left over") from None
    try:
        write_atomically(entry / RECORD_NAME, kept.to_json(), f".{RECORD_NAME}.tmp")
        files = {"backup_label": backup["backup_label"], "tablespace_map": backup.get("tablespace_map")}
        written: dict[str, Any] = {
            "snapshot": str(entry / RECORD_NAME),
            **store_label(entry, files, local_copy=None, system_identifier=None, stop_lsn=None, log=_quiet),
        }
        records = copied if copied is not None else CopyRecords.of_tree(data, tablespaces)
        records = CopyRecords(records.major, records.files, "snapshot")
        made = write_manifest(entry, backup, records, "SHA256", log)
        assert made is not None  # the records name the major and have SHA256 checksums
        written["backup_manifest"] = made[0]
        written["backup_info"] = write_entry(entry, backup, records, run or {}, made[1], log)
    except OSError as err:
        raise StoreFailed(f"cannot catalogue the kept snapshot in {entry}: {err}") from err
    return written


class _Quiet:
    """A logger that says nothing: the label's own check of a copy does not apply to a kept snapshot's entry
    (:func:`catalog_kept_snapshot` checks the snapshot itself)."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


_quiet = _Quiet()
