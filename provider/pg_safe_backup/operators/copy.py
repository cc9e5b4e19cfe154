"""The copy of the data directory, as pg_basebackup makes it, inside a ``PostgresOnlineBackup``."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow.providers.common.compat.sdk import AirflowFailException
from airflow.sdk import BaseOperator, ObjectStoragePath

from pg_safe_backup.errors import PgSafeBackupError
from pg_safe_backup.files.copier import CopyResult, Progress, copy_data_directory
from pg_safe_backup.files.extconfig import CONFIG_DIR, ServerConfig, capture_entries
from pg_safe_backup.files.layout import Entry, walk
from pg_safe_backup.files.objects import upload_tree
from pg_safe_backup.files.tarball import check_compression, write_tar_backup
from pg_safe_backup.operators.snapshot import snapshots_of
from pg_safe_backup.params import check_flag, check_number, check_text, unless_rendered_later
from pg_safe_backup.session import CONFIG_FILES
from pg_safe_backup.snapshots import read_tree
from pg_safe_backup.store import CopyRecords
from pg_safe_backup.utils import metrics
from pg_safe_backup.utils.mixins import (
    FILES_XCOM,
    check_storage_url,
    encryption_key,
    rendered,
    same_map_index_xcom,
    task_error,
)

if TYPE_CHECKING:
    from airflow.sdk import Context

MAX_XCOM_FILES = 50_000
FORMATS = ("plain", "tar")


class PostgresCopyDataDirectoryOperator(BaseOperator):
    """
    Copy a PostgreSQL data directory into a backup destination, as pg_basebackup would, while the
    ``PostgresOnlineBackup`` it is placed in holds backup mode.

    Run it on a worker that sees the data directory (a Celery queue on the database host, or a pod with
    the volume mounted): ``queue=`` pins it.

    * Leaves out exactly what pg_basebackup leaves out (:mod:`pg_safe_backup.files.layout`), and copies
      ``global/pg_control`` last (a backup of a standby needs it).
    * Tablespaces (``pg_tblspc`` links) go into the copy as ``pg_tblspc/<oid>/`` folders: one destination
      holds the whole backup; a restore uses the stored tablespace_map.
    * A file that vanishes during the copy (the server dropped it) is skipped and counted; one that
      shrinks or grows is copied as read: WAL replay repairs it. Any other I/O error fails the task,
      naming the file.
    * SHA-256 of every file as it is copied, handed with its size and time to the store task's
      backup_manifest (XCom ``files``), so nothing is read twice, and an object store or tar copy gets
      its manifest too.
    * The server's configuration files that live outside the data directory (a Debian/Ubuntu cluster's
      ``/etc/postgresql/<major>/<name>/``: ``config_file``, ``hba_file``, ``ident_file`` and what the
      configuration includes), as the group's gate names them, go into the copy under
      ``pg_safe_backup_config/`` (:mod:`pg_safe_backup.files.extconfig`): the manifest lists them and
      ``pg-safe-backup restore`` puts them back. One the worker cannot read fails the task, naming it.
    * A local copy is fsynced, files and folders. A destination that already holds anything is refused
      unless ``overwrite=True``, which empties it first.
    * The task log shows done/total bytes, MB/s and ETA every ``progress_interval`` seconds, then a
      summary: files, bytes, vanished files, time.

    :param source: the data directory (templated).
    :param destination: a local folder or any ``ObjectStoragePath`` URL: s3://, gs://, abfs://, file://
        (templated); ``conn_id@`` in the URL names the connection of an object store, used through the
        store's Airflow provider (extras ``[s3]``, ``[gcs]``, ``[azure]``; refused without it).
    :param format: ``plain`` (the tree as files or objects) or ``tar`` (``base.tar`` and one
        ``<oid>.tar`` per tablespace, like pg_basebackup ``-Ft``).
    :param compression: with ``tar``: None, ``gzip`` or ``zstd`` (``pip install
        airflow-provider-pg-safe-backup[zstd]``).
    :param parallel: files copied side by side (default: the worker's CPU count).
    :param overwrite: empty a destination that is not empty instead of refusing it.
    :param progress_interval: seconds between progress lines.
    :param config_files: capture the server's configuration files that live outside the data directory
        (False: you back them up another way).
    :param encryption_conn_id: an Airflow connection whose password is the key (64 hex digits or base64 of
        32 bytes: ``openssl rand -hex 32``) to encrypt the copy with at rest (templated): each tar archive,
        or each file of an object-store copy, is stored as ``<name>.enc`` (AES-256-GCM,
        :mod:`pg_safe_backup.encryption`). Give the store task the same connection. A plain copy into a
        local folder is not encrypted (refused: use an encrypted file system). The key is read on the worker
        and goes nowhere else; the records name only its id.
    """

    template_fields: Sequence[str] = ("source", "destination", "encryption_conn_id")

    def __init__(
        self,
        *,
        source: str,
        destination: str,
        format: str = "plain",
        compression: str | None = None,
        parallel: int | None = None,
        overwrite: bool = False,
        progress_interval: float = 10.0,
        config_files: bool = True,
        encryption_conn_id: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.encryption_conn_id = encryption_conn_id
        self.source = unless_rendered_later(check_text, source, "source")
        self.destination = unless_rendered_later(check_text, destination, "destination")
        if format not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
        self.format = format
        if compression is not None:
            if format != "tar":
                raise ValueError(f"compression={compression!r} needs format='tar'")
            try:
                check_compression(compression)
            except ValueError as err:
                raise ValueError(f"compression: {err}") from err
        self.compression = compression or "none"
        self.parallel = int(check_number(parallel, "parallel", 1)) if parallel is not None else None
        self.overwrite = check_flag(overwrite, "overwrite")
        self.progress_interval = check_number(progress_interval, "progress_interval", 0, allow_min=False)
        self.config_files = check_flag(config_files, "config_files")
        #: Set by a ``PostgresOnlineBackup(snapshot=...)``: this copy runs after backup mode ended and reads
        #: that task's snapshots of ``source`` (a copy-out).
        self.snapshot_task_id: str | None = None

    def execute(self, context: Context) -> dict[str, Any]:
        destination = rendered(check_storage_url, self.destination, "destination")
        live = source = Path(rendered(check_text, self.source, "source"))
        tablespaces = None
        if self.snapshot_task_id:  # a copy-out: read the snapshots, never the live files
            source, tablespaces = self._snapshot_source(context, live)
        if not (source / "PG_VERSION").is_file():
            raise AirflowFailException(
                f"source {str(source)!r} is not a PostgreSQL data directory (no PG_VERSION): is this task"
                " on a worker that sees it (queue=)?"
            )
        extra = self._configuration(context, live) if self.config_files else []
        summary, records = self.copy(source, destination, extra, tablespaces)
        if records is not None:
            context["ti"].xcom_push(key=FILES_XCOM, value=records.to_xcom())
        return summary

    def copy(
        self,
        source: Path,
        destination: str,
        extra: Sequence[Entry] = (),
        tablespaces: Mapping[str, Path] | None = None,
    ) -> tuple[dict[str, Any], CopyRecords | None]:
        """Copy ``source`` into ``destination`` as this task is set to (format, compression, encryption).

        :param source: the data directory.
        :param destination: the rendered destination.
        :param extra: the configuration files from outside the data directory to take too.
        :param tablespaces: oid -> the folder to read each tablespace from (its snapshot), instead of where
            the data directory's ``pg_tblspc`` link points.
        :returns: the task's summary (its return value) and the copy's records for the store task (None
            over :data:`MAX_XCOM_FILES` files).
        """
        target = ObjectStoragePath(destination)
        local = Path(target.path) if target.protocol in ("", "file") else None
        key = encryption_key(self.encryption_conn_id)
        if key is not None and self.format == "plain" and local is not None:
            raise AirflowFailException(
                f"encryption_conn_id: destination {destination!r} is a local folder, where a plain copy is"
                " stored unencrypted: use format='tar', an object store, or an encrypted file system"
            )
        special: list[str] = []  # left out by the walk when it is ours (with the configuration files)
        options: dict[str, Any] = {
            "entries": (
                walk(source, special=special, extra=list(extra), tablespaces=tablespaces)
                if extra or tablespaces
                else None
            ),
            "overwrite": self.overwrite,
            "progress": self._progress,
            "progress_interval": self.progress_interval,
        }
        if key is not None:
            options["key"] = key
        self.log.info(
            "copying %s into %s (%s%s%s, %s workers)",
            source,
            destination,
            self.format,
            f", {self.compression}" if self.format == "tar" else "",
            f", encrypted with key {key.key_id}" if key else "",
            self.parallel or os.cpu_count(),
        )
        try:
            if self.format == "tar":
                result = write_tar_backup(
                    source, local or target, compression=self.compression, threads=self.parallel, **options
                )
            elif local is not None:
                result = copy_data_directory(source, local, workers=self.parallel, **options)
            else:
                result = upload_tree(source, target, workers=self.parallel, **options)
        except PgSafeBackupError as err:  # a destination not empty is refused for good; the rest retried
            raise task_error(err, f"the copy into {destination!r} failed: {err}") from err
        result.special.extend(special)
        self.log.info("%s", result.summary())
        metrics.timing("copy.duration", result.seconds, format=self.format)
        metrics.incr("copy.bytes", result.bytes, format=self.format)
        records = None
        if len(result.checksums) <= MAX_XCOM_FILES:
            major = int((source / "PG_VERSION").read_text().strip())
            records = CopyRecords.of_copy(
                result, major, self.format, self.compression, key.key_id if key else None
            )
        else:
            self.log.warning(
                "not handing the records of %d files (over %d) to the manifest through XCom: a local plain"
                " copy's manifest reads the copy again; other copies get none",
                len(result.checksums),
                MAX_XCOM_FILES,
            )
        summary = {
            "destination": destination,
            "format": self.format,
            "files": result.files,
            "bytes": result.bytes,
            "vanished": len(result.vanished),
            "seconds": round(result.seconds, 2),
            **({"encryption_key_id": key.key_id} if key else {}),
        }
        return summary, records

    def _snapshot_source(self, context: Context, live: Path) -> tuple[Path, dict[str, Path]]:
        """Where the group's snapshot step left the data directory ``live`` and each of its tablespaces
        readable (each tablespace from its own snapshot), each snapshot mounted first where its driver
        mounts."""
        assert self.snapshot_task_id
        snapshots = snapshots_of(context, self.snapshot_task_id)
        if not snapshots:
            raise AirflowFailException(f"{self.snapshot_task_id} took no snapshot: nothing to copy out")
        try:
            data, tablespaces = read_tree(snapshots, live)
        except PgSafeBackupError as err:
            raise task_error(err, f"cannot read the snapshots: {err}") from err
        self.log.info(
            "copying out of the snapshots: the data directory from %s%s",
            data,
            "".join(f", tablespace {oid} from {path}" for oid, path in tablespaces.items()),
        )
        return data, tablespaces

    def _configuration(self, context: Context, source: Path) -> list[Entry]:
        """The server's configuration files outside the data directory, as the copy takes them; the gate
        upstream (``PostgresBackupStartedSensor``) pushed where they are."""
        pushed = (same_map_index_xcom(context, task, CONFIG_FILES) for task in sorted(self.upstream_task_ids))
        server = next((value for value in pushed if value), None)
        if server is None:
            self.log.info(
                "no gate upstream named the server's configuration files: the copy holds the data directory"
                " alone"
            )
            return []
        config = ServerConfig.from_dict(server)
        if config.unreadable:
            self.log.warning(
                "configuration files outside the data directory may be missed: %s", config.unreadable
            )
        try:
            entries = capture_entries(config, source)
        except PgSafeBackupError as err:
            raise task_error(err, f"{err} (config_files=False leaves them out)") from err
        files = [entry.source for entry in entries if not entry.is_dir]
        if files:
            self.log.info(
                "capturing %d configuration files from outside the data directory into %s/: %s",
                len(files),
                CONFIG_DIR,
                ", ".join(map(str, files)),
            )
        return entries

    def _progress(self, progress: Progress) -> None:
        self.log.info("copy: %s", progress.line())


def files_xcom(
    result: CopyResult, major: int, format: str = "plain", compression: str = "none"
) -> dict[str, Any]:
    """The XCom ``files`` of a copy (:meth:`CopyRecords.to_xcom <pg_safe_backup.store.CopyRecords.to_xcom>`
    of :meth:`~pg_safe_backup.store.CopyRecords.of_copy`).

    :param result: the copy's result.
    :param major: the copied server's major version.
    :param format: ``plain`` or ``tar``.
    :param compression: the tar archives' (``none`` for plain).
    """
    return CopyRecords.of_copy(result, major, format, compression).to_xcom()
