"""Operators: start-and-hold the backup, finish it, store its label."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow.providers.common.compat.sdk import AirflowFailException, AirflowSkipException
from airflow.sdk import BaseOperator, ObjectStoragePath, TaskGroup, TriggerRule

from pg_safe_backup.errors import PgSafeBackupError
from pg_safe_backup.files.manifest import DIGEST_SIZES
from pg_safe_backup.files.xlog import label_start_time, parse_backup_label
from pg_safe_backup.links import BackupsPageLink
from pg_safe_backup.operators.copy import PostgresCopyDataDirectoryOperator
from pg_safe_backup.params import (
    check_flag,
    check_label,
    check_number,
    check_seconds,
    check_text,
    optional_unless_rendered_later,
    unless_rendered_later,
)
from pg_safe_backup.session import COMPLETE, ONE_DAY_S, HoldRequest
from pg_safe_backup.store import (
    BACKUP_KEYS,  # noqa: F401 - importable from here, as before
    TIMELINE_KEYS,  # noqa: F401 - importable from here, as before
    CopyRecords,
    store_backup,
)
from pg_safe_backup.triggers.backup import (
    ATTEMPT_XCOM,
    RESULT_KEYS,  # noqa: F401 - importable from here, as before
    PostgresFinishBackupTrigger,
    PostgresHoldBackupTrigger,
    public,
    run_states,
    task_states,
)
from pg_safe_backup.utils import metrics
from pg_safe_backup.utils.mixins import (
    PostgresBackupBaseOperator,
    backup_template_fields,
    catalog_asset,
    catalog_root_of,
    check_storage_url,
    copied_records,
    encryption_key,
    fail_on,
    finished_backup,
    rendered,
    same_map_index_xcom,
    storage_path,
    task_error,
)

if TYPE_CHECKING:
    from airflow.sdk import Context

DEFAULT_LABEL = "airflow {{ dag.dag_id }} {{ run_id }}"


class PostgresStartBackupOperator(PostgresBackupBaseOperator):
    """
    The hold task (``hold_backup_session`` in a ``PostgresOnlineBackup``): start a non-exclusive backup and
    hold its session until the finish ends it. Its trigger, the holder (``PostgresHoldBackupTrigger``),
    holds that session; the gate names this task ``holder_task_id``.

    The task stays deferred for the whole backup (its trigger holds the session, which PostgreSQL
    requires); it runs beside the copy tasks, which wait on a ``PostgresBackupStartedSensor``.
    It succeeds once pg_backup_stop has returned and the label is stored, and is never retried:
    a second backup for the same run would not match a copy already taken.

    Each try is an attempt of its own (its task-instance UUID), published as XCom
    ``backup_attempt`` before it defers: gate and finish act on that attempt's backup only. The
    backup is not started, or is failed and backup mode ended within seconds, once the run's finish
    (``finish_task_id``) or the DAG run itself has ended: nothing else would end it.

    Templated: ``label``, ``fast_checkpoint``, ``wait_for_archive``, ``backup_timeout`` and the
    connection fields. A template rendering to text is read as the bool or number it spells
    (``"true"``, ``"3600"``); a value that is not fails the task, naming the parameter, before
    backup mode.

    :param label: backup label (templated); the default names the DAG run.
    :param fast_checkpoint: ask for an immediate checkpoint (default: spread, as PostgreSQL does).
    :param wait_for_archive: the backup is complete only once the WAL it needs is archived
        (pg_backup_stop waits; for a standby, the holder switches WAL on the primary, the state
        connection, and waits for the archiver). A server whose WAL nothing archives is then refused
        before backup mode. False: you make sure the WAL is there another way (pg_wal copied after
        the stop, pg_receivewal).
    :param backup_timeout: seconds from the start after which the backup is failed and backup mode
        ended (0 = no limit; default one day).
    :param terminate_live: end a live backup of another owner instead of refusing to start.
    :param finish_task_id: the ``PostgresFinishBackupOperator`` that ends this backup.
    """

    # ``label`` is BaseOperator's display name, hence the attribute name pg_label.
    template_fields: Sequence[str] = backup_template_fields(
        "pg_label", "fast_checkpoint", "wait_for_archive", "backup_timeout"
    )
    ui_color = "#d8e8f8"

    def __init__(
        self,
        *,
        label: str = DEFAULT_LABEL,
        fast_checkpoint: bool = False,
        wait_for_archive: bool = True,
        backup_timeout: float = ONE_DAY_S,
        terminate_live: bool = False,
        finish_task_id: str | None = None,
        deferrable: bool = True,
        **kwargs: Any,
    ) -> None:
        kwargs["retries"] = 0
        super().__init__(deferrable=deferrable, **kwargs)
        self.pg_label = unless_rendered_later(check_label, label, "label")
        self.fast_checkpoint = unless_rendered_later(check_flag, fast_checkpoint, "fast_checkpoint")
        self.wait_for_archive = unless_rendered_later(check_flag, wait_for_archive, "wait_for_archive")
        self.backup_timeout = unless_rendered_later(check_seconds, backup_timeout, "backup_timeout")
        if not isinstance(terminate_live, bool):
            raise ValueError(f"terminate_live must be True or False, got {terminate_live!r}")
        self.terminate_live = terminate_live
        self.finish_task_id = (
            finish_task_id if finish_task_id is None else check_text(finish_task_id, "finish_task_id")
        )
        #: Set by a ``PostgresOnlineBackup(snapshot=...)``: ``snapshot``, the metrics' ``mode`` tag.
        self.backup_mode = "full"

    def hold_trigger(self, context: Context, checked_at: float | None = None) -> PostgresHoldBackupTrigger:
        """The trigger that takes and holds this try's backup, from the fields as rendered for this run.
        Each is checked first: a bad one fails the task (``AirflowFailException``) before backup mode.

        :param checked_at: when this task found its run going and its finish not ended (see
            ``HoldRequest.checked_at``).
        """
        ti = context["ti"]
        target = self.backup_target
        ref = self.backup_ref(context, finish_task_id=self.finish_task_id)
        request = HoldRequest(
            owner=ref.owner,
            attempt=str(ti.id),
            holder_try=ti.try_number,
            label=rendered(check_label, self.pg_label, "label"),
            fast_checkpoint=rendered(check_flag, self.fast_checkpoint, "fast_checkpoint"),
            wait_for_archive=rendered(check_flag, self.wait_for_archive, "wait_for_archive"),
            backup_timeout=rendered(check_seconds, self.backup_timeout, "backup_timeout"),
            poll_interval=self.poll_interval,
            terminate_live=self.terminate_live,
            checked_at=checked_at,
        )
        return PostgresHoldBackupTrigger(
            target.hook_kwargs, request=asdict(request), ref=asdict(ref), mode=self.backup_mode
        )

    def execute(self, context: Context) -> Any:
        ti = context["ti"]
        ref = self.hold_trigger(context).ref  # the rendered fields, checked before anything else
        # Nobody would end a backup of a run that ended, or whose finish did (only the hold was cleared).
        if problem := run_states(ref.dag_id, ref.run_id, ref.finish_task_id).problem(
            ref.run_id, ref.finish_task_id, ref.map_index
        ):
            raise AirflowFailException(f"backup not started: {problem}")
        trigger = self.hold_trigger(context, checked_at=time.time())
        request, ref = trigger.kwargs["request"], trigger.ref
        # Before deferring: the gate takes this as the attempt to open on (see triggers.backup.hold_view).
        ti.xcom_push(
            key=ATTEMPT_XCOM,
            value={
                "attempt": request["attempt"],
                "try_number": ti.try_number,
                "owner": ref.owner,
                "inline": not self.deferrable,
                "fast_checkpoint": request["fast_checkpoint"],  # the gate's advice while it waits
            },
        )
        self.log.info("backup of %s, attempt %s (try %s)", ref.owner, request["attempt"], ti.try_number)
        metrics.incr("backup.started", mode=self.backup_mode)
        return self.wait_on(context, trigger)

    def execute_complete(self, context: Context, event: dict[str, Any]) -> dict[str, Any]:
        """The result of an inline hold (deferrable=False); deferred, the trigger ends the task itself."""
        if event["status"] != COMPLETE:
            raise fail_on(event, f"backup not taken: {event['message']}")
        self.log.info("%s", event["message"])
        return public(event["backup"])


class PostgresFinishBackupOperator(PostgresBackupBaseOperator):
    """
    End this run's backup: mark it done (or failed when a copy task did not succeed), wait for
    pg_backup_stop, and push backup_label, tablespace_map, start/stop LSN, timeline (the start's),
    stop_timeline and timeline_history (a standby that followed a promotion during the backup stops on
    a newer timeline: its history file), label and warnings (what PostgreSQL warned about during the
    backup, e.g. that WAL archiving is not enabled).

    Meant as the teardown of the gate, so it runs even when a copy fails. It acts only on the
    backup attempt the gate opened on, and only while it still has the start LSN the gate opened
    with; a copy that did not succeed never yields a label, whatever the table says.

    A backup that failed (or a copy that did not succeed) fails the task without a retry
    (``AirflowFailException``): the hold is never retried, so a retry could only fail again. Only a
    server that cannot be reached or followed is retried (``AirflowException``); the backup stays
    held meanwhile.

    :param gate_task_id: the ``PostgresBackupStartedSensor`` whose copy tasks this finishes.
    """

    ui_color = "#d8f0d8"

    def __init__(self, *, gate_task_id: str, **kwargs: Any) -> None:
        kwargs.setdefault("trigger_rule", TriggerRule.ALL_DONE)
        super().__init__(**kwargs)
        self.gate_task_id = check_text(gate_task_id, "gate_task_id")

    def _copy_problem(self, context: Context) -> str | None:
        """Why the copy cannot be trusted (a task upstream did not succeed), or None."""
        states = task_states(self.backup_ref(context), sorted(self.upstream_task_ids))
        bad = {t: s for t, s in states.items() if s != "success"}
        if not bad:
            return None
        return "the copy did not succeed: " + ", ".join(f"{t} is {s}" for t, s in bad.items())

    def execute(self, context: Context) -> Any:
        target = self.backup_target  # the rendered connection fields, checked first
        problem = self._copy_problem(context)
        start_lsn = same_map_index_xcom(context, self.gate_task_id, "start_lsn")
        attempt = same_map_index_xcom(context, self.gate_task_id, "attempt")
        if not start_lsn or not attempt:
            gate_state = task_states(self.backup_ref(context), [self.gate_task_id])[self.gate_task_id]
            if gate_state == "skipped":  # an incremental day of the group's branch: no backup mode, no copy
                raise AirflowSkipException(f"the gate {self.gate_task_id} was skipped: no backup to finish")
            if gate_state == "success":
                raise AirflowFailException(
                    f"gate_task_id={self.gate_task_id!r} succeeded but published no start_lsn and attempt: "
                    "it must be this backup's PostgresBackupStartedSensor, or the finish cannot tell which "
                    "backup the copy ran under"
                )
            raise AirflowFailException(
                f"backup not usable: the gate {self.gate_task_id} did not open ({gate_state}), so no copy "
                "ran under a backup of this run" + (f"; {problem}" if problem else "")
            )
        if problem:
            self.log.error("%s; failing the backup", problem)
        trigger = PostgresFinishBackupTrigger(
            target.hook_kwargs,
            attempt=attempt,
            start_lsn=start_lsn,
            copy_problem=problem,
            poll_interval=self.poll_interval,
        )
        return self.wait_on(context, trigger, patience=self.inline_wait)

    def execute_complete(self, context: Context, event: dict[str, Any]) -> dict[str, Any]:
        if event["status"] != COMPLETE:
            raise fail_on(event, f"backup not usable: {event['message']}")
        return self.ended_well(context, PostgresFinishBackupTrigger, event)


class PostgresStoreBackupLabelOperator(BaseOperator):
    """
    Write backup_label (and tablespace_map, when the backup has one) into the backup destination, then,
    into a local or mounted copy, the backup's WAL (``include_wal``) and its ``backup_manifest``.

    Without the label files in place a restored copy can start and silently lose data, so they must
    be stored with every backup. Where the destination is a local (or mounted) copy of the data
    directory, the label is refused unless the copy's pg_control is valid, its system identifier is
    the backed up cluster's and its checkpoint lies between the label's CHECKPOINT LOCATION and the
    backup's stop LSN; elsewhere the task log says the check was skipped, and why. A
    ``backup_label`` or ``tablespace_map`` an earlier attempt left in the destination is removed
    (and logged) before this backup's are written (see :func:`pg_safe_backup.files.label.store_label`).

    The ``backup_manifest`` (a copy of PostgreSQL 12 gets version 1, the first format) lists every file of
    the copy with its size and checksum and the WAL the backup needs, as pg_basebackup writes it:
    ``pg_verifybackup`` then checks the backup at rest, in seconds. The copy's ``pg_tblspc/<oid>`` links
    are pointed at the tablespaces' copies first (``<destination>_tablespaces/<oid>``, ...: see
    :mod:`pg_safe_backup.files.tablespaces`), never at the live tablespaces. The checksums, sizes and
    times come from the group's ``PostgresCopyDataDirectoryOperator`` (XCom ``files``), so the copy is not
    read again; a copy in an object store, or as tar archives, gets its manifest from them alone (SHA256
    or NONE), beside the archives as pg_basebackup ``-Ft`` puts it. Without them, such a copy gets no
    manifest (the log says why).

    The server's configuration files that live outside the data directory (a Debian/Ubuntu cluster's
    ``/etc/postgresql/<major>/<name>/``) are part of the backup: a ``PostgresCopyDataDirectoryOperator``
    copies them into ``pg_safe_backup_config/`` (:mod:`pg_safe_backup.files.extconfig`). A copy of your own
    (rsync in a BashOperator) must put them there itself, before this task, for the manifest to list them
    and ``pg-safe-backup restore`` to put them back: each file under ``pg_safe_backup_config/<setting>``
    followed by its absolute path (``config_file``, ``hba_file``, ``ident_file``; ``include`` for an
    included file, ``include_dir`` for an included folder; rsync ``-R`` keeps the path), e.g.
    ``mkdir -p DEST/pg_safe_backup_config/config_file`` then
    ``rsync -aR /etc/postgresql/15/main/postgresql.conf DEST/pg_safe_backup_config/config_file/``, and
    ``mkdir -p DEST/pg_safe_backup_config/include_dir/etc/postgresql/15/main/conf.d``.

    A copy that does not match its label, or a backup without one, fails the task without a retry
    (``AirflowFailException``); a destination that cannot be written to is retried.

    :param backup: the ``PostgresOnlineBackup`` group (or the finish task's id) whose label to store.
    :param destination: folder or URL of the copy (templated); any ObjectStoragePath location.
    :param manifest: write ``backup_manifest`` into a local or mounted copy.
    :param manifest_checksums: the manifest's checksum algorithm: SHA256 (default), SHA224, SHA384,
        SHA512, CRC32C, or NONE (sizes only: for huge copies checked some other way).
    :param include_wal: copy the WAL the backup needs from ``wal_archive`` into the copy's pg_wal/, so it
        restores with no archive at all (as pg_basebackup ``-X fetch`` backups do).
    :param wal_archive: the folder archive_command copies WAL into (templated); needed by ``include_wal``.
    :param encryption_conn_id: the copy task's ``encryption_conn_id`` (templated): backup_label,
        tablespace_map and backup_manifest are stored encrypted with the key in its password (``.enc``), and
        the catalog entry records the key's id (``encryption_key_id``), never the key. The manifest's
        checksums are of the plaintext: ``pg_verifybackup`` checks the copy once decrypted. Refused when the
        copy was encrypted with another key or not at all.
    :param catalog_root: the folder (or URL) whose catalog this backup joins, for the Airflow Asset the task
        updates when it succeeds (:func:`~pg_safe_backup.utils.mixins.catalog_asset`: ``file:///backups``,
        ``s3://bucket/prefix``), on which a DAG can be scheduled (the restore drill). Default: the
        destination's parent folder, when no template makes it (``/backups/{{ ts_nodash }}``: ``/backups``);
        give it when one does. An Asset is known when the DAG is parsed, never rendered; with neither, the
        task updates none.
    """

    template_fields: Sequence[str] = ("destination", "wal_archive", "encryption_conn_id")
    #: The stored backup on the Backups page (its URL kept in XCom when the try ends).
    operator_extra_links = (BackupsPageLink(),)

    def __init__(
        self,
        *,
        backup: TaskGroup | str,
        destination: str,
        manifest: bool = True,
        manifest_checksums: str = "SHA256",
        include_wal: bool = False,
        wal_archive: str | None = None,
        encryption_conn_id: str | None = None,
        catalog_root: str | None = None,
        **kwargs: Any,
    ) -> None:
        derived = catalog_root_of(destination)
        if catalog_root is not None:
            check_text(catalog_root, "catalog_root")
            if derived is not None and catalog_asset(catalog_root) != catalog_asset(derived):
                raise ValueError(
                    f"catalog_root {catalog_root!r} is not the folder destination {destination!r} is in"
                )
        root = catalog_root if catalog_root is not None else derived
        #: The Asset this task updates (None: none), from the root known at parse time.
        self.catalog_asset = catalog_asset(root) if root is not None else None
        if self.catalog_asset is not None:
            kwargs["outlets"] = [*(kwargs.get("outlets") or []), self.catalog_asset]
        super().__init__(**kwargs)
        self.encryption_conn_id = encryption_conn_id
        self.destination = unless_rendered_later(check_text, destination, "destination")
        self.manifest = check_flag(manifest, "manifest")
        if str(manifest_checksums).upper() not in DIGEST_SIZES:
            raise ValueError(
                f"manifest_checksums must be one of {', '.join(DIGEST_SIZES)}, got {manifest_checksums!r}"
            )
        self.manifest_checksums = str(manifest_checksums).upper()
        self.include_wal = check_flag(include_wal, "include_wal")
        if self.include_wal and not wal_archive:
            raise ValueError("include_wal=True needs wal_archive: the folder the WAL is copied from")
        self.wal_archive = wal_archive
        finish = getattr(backup, "finish", None)
        if isinstance(backup, str):
            self.finish_task_id = check_text(backup, "backup")
        elif isinstance(backup, TaskGroup) and isinstance(finish, PostgresFinishBackupOperator):
            self.finish_task_id = finish.task_id
            # After the finish, and with snapshots after the copy-outs too (they run after the finish): a
            # label is stored only into a copy that succeeded, never before it exists.
            for leaf in {t.task_id: t for t in (finish, *backup.get_leaves())}.values():
                leaf >> self
        else:
            raise ValueError(f"backup must be a PostgresOnlineBackup or a finish task id, got {backup!r}")
        #: The metrics' ``mode`` tag: a group's snapshots, else a full backup.
        self.backup_mode = "snapshot" if getattr(backup, "snapshot", None) is not None else "full"
        #: The group's copy operators: their records spare the manifest a second read of the copy.
        self.copy_task_ids = (
            [t.task_id for t in backup.iter_tasks() if isinstance(t, PostgresCopyDataDirectoryOperator)]
            if isinstance(backup, TaskGroup)
            else []
        )

    def execute(self, context: Context) -> dict[str, Any]:
        destination = rendered(check_storage_url, self.destination, "destination")
        backup, run = finished_backup(context, self.finish_task_id)
        return self.store(destination, backup, copied_records(context, self.copy_task_ids), run)

    def store(
        self,
        destination: str,
        backup: dict[str, Any],
        copied: CopyRecords | None = None,
        run: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Store ``backup`` into ``destination`` (see :func:`pg_safe_backup.store.store_backup`): its label
        files, checked against the copy there, then its WAL (``include_wal``), its backup_manifest and its
        catalog entry.

        :param destination: the rendered destination.
        :param backup: the finish's XCom (:data:`~pg_safe_backup.store.BACKUP_KEYS`).
        :param copied: the copy tasks' records (:func:`copied_records`): the manifest reads no file of them.
        :param run: the backup's DAG run: dag_id, run_id, task_id, map_index, attempt (for backup_info.json).
        :returns: name -> location of each file written (backup_label, tablespace_map, backup_manifest,
            backup_info), and ``wal``: the WAL files copied.
        """
        if not backup.get("backup_label"):
            raise AirflowFailException(
                f"no backup_label from {self.finish_task_id}: the backup did not complete"
            )
        wal_archive = rendered(check_text, self.wal_archive, "wal_archive") if self.wal_archive else None
        key = encryption_key(self.encryption_conn_id)
        try:
            written = store_backup(
                ObjectStoragePath(destination),
                backup,
                copied,
                run,
                manifest=self.manifest,
                manifest_checksums=self.manifest_checksums,
                wal_archive=Path(wal_archive) if self.include_wal and wal_archive else None,
                where=destination,
                key=key,
                log=self.log,
            )
        except PgSafeBackupError as err:
            metrics.incr("backup.failed", mode=self.backup_mode, stage="store")
            raise task_error(err) from err
        self._count_completed(backup, copied)
        return written

    def _count_completed(self, backup: dict[str, Any], copied: CopyRecords | None) -> None:
        """The metrics of a stored backup: one more completed, its bytes when known, and how long it took
        from pg_backup_start (its label's START TIME) until now, stored."""
        started = label_start_time(parse_backup_label(backup["backup_label"]).get("START TIME"))
        metrics.completed(
            self.backup_mode,
            copied.format if copied else None,
            sum(record.size for record in copied.files.values()) if copied else None,
            (datetime.now(timezone.utc) - started).total_seconds() if started is not None else None,
        )


class PostgresVerifyBackupOperator(BaseOperator):
    """
    Prove a stored backup sound, cheapest check first (see :func:`pg_safe_backup.verify.check_backup`):

    1. the page-LSN check: no page of the copy is newer than the point where its recovery becomes
       consistent (catches a label older than the copy, a standby's pg_control copied too early);
    2. ``pg_verifybackup`` against the copy's backup_manifest (every file's presence, size and
       checksum, and the WAL the backup needs), when the copy has one;
    3. the restore check: recover the copy on a temporary server from the WAL archive, then run amcheck
       and an optional data invariant.

    Each result goes to the task log and to XCom (``checks``: status, summary, details). Needs PostgreSQL
    binaries of the backup's major version on the worker for 2 and 3. A failed check fails the task
    without a retry (``AirflowFailException``): the same backup would fail it again. A check that could
    not run (the WAL archive missing or another cluster's, no binaries) is no verdict: nothing is recorded
    and the task fails with a plain ``AirflowException``, which Airflow retries. Recording the verdict in
    the catalog is best-effort (read-only storage: a warning).

    :param backup_dir: the copy with its backup_label (templated).
    :param wal_archive: the folder archive_command copies WAL into (templated); None for a self-contained
        backup (stored with ``include_wal=True``).
    :param stop_lsn: the backup's stop LSN (templated), for the page-LSN check of a backup of a primary;
        default: from the copy's backup_manifest, else the backup history file in the archive.
    :param invariant_sql: query returning rows ``(ok boolean, detail text)``; all must be ok.
    :param invariant_db: database the invariant runs in.
    :param to_end_of_archive: replay the whole archive instead of stopping at the consistent point.
    :param timeout: seconds for the temporary server to start and recover.
    :param page_lsn_check: run check 1.
    :param verify_manifest: run check 2 (when the copy has a backup_manifest).
    :param restore: run check 3, the slow one.
    :param encryption_conn_id: for an encrypted backup, an Airflow connection whose password is its key
        (templated): the backup is decrypted into a temporary folder and checked there; without it an
        encrypted backup cannot be checked (no verdict). The same key reads a WAL archive ``wal-push``
        encrypted.
    """

    template_fields: Sequence[str] = (
        "backup_dir",
        "wal_archive",
        "stop_lsn",
        "invariant_sql",
        "encryption_conn_id",
    )

    def __init__(
        self,
        *,
        backup_dir: str,
        wal_archive: str | None,
        stop_lsn: str | None = None,
        invariant_sql: str | None = None,
        invariant_db: str = "postgres",
        to_end_of_archive: bool = False,
        timeout: float = 600,
        page_lsn_check: bool = True,
        verify_manifest: bool = True,
        restore: bool = True,
        encryption_conn_id: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.encryption_conn_id = encryption_conn_id
        self.backup_dir = unless_rendered_later(check_text, backup_dir, "backup_dir")
        self.wal_archive = optional_unless_rendered_later(check_text, wal_archive, "wal_archive")
        self.stop_lsn = stop_lsn
        self.invariant_sql = invariant_sql
        self.invariant_db = check_text(invariant_db, "invariant_db")
        self.to_end_of_archive = to_end_of_archive
        self.restore_timeout = check_number(timeout, "timeout", 0, allow_min=False)
        self.page_lsn_check = check_flag(page_lsn_check, "page_lsn_check")
        self.verify_manifest = check_flag(verify_manifest, "verify_manifest")
        self.restore = check_flag(restore, "restore")

    def execute(self, context: Context) -> dict[str, Any]:
        from pg_safe_backup.verify import check_backup, record_check

        began = time.monotonic()
        backup_dir = rendered(check_storage_url, self.backup_dir, "backup_dir")
        backup = storage_path(backup_dir)
        wal_archive = rendered(check_text, self.wal_archive, "wal_archive") if self.wal_archive else None
        key = encryption_key(self.encryption_conn_id)
        try:
            report = check_backup(
                backup,
                wal_archive,
                stop_lsn=self.stop_lsn or None,
                page_lsns=self.page_lsn_check,
                manifest=self.verify_manifest,
                restore=self.restore,
                invariant_sql=self.invariant_sql,
                invariant_db=self.invariant_db,
                recovery_target_immediate=not self.to_end_of_archive,
                timeout=self.restore_timeout,
                encryption_key=key,
                archive_key=key,  # one key: the backup's and the WAL archive's (wal-push --encryption-key-*)
            )
        except PgSafeBackupError as err:  # CheckNotRun, no verdict: a retry may find the archive mounted
            raise task_error(err, f"the checks of {backup_dir} could not run: {err}") from err
        for step in report.steps:
            (self.log.error if step.status == "FAIL" else self.log.info)(
                "%s of %s: %s", step.name, backup_dir, step.line()
            )
        ti = context["ti"]
        if record_check(
            backup,
            report,
            time.monotonic() - began,
            f"{ti.dag_id}/{ti.run_id}/{ti.task_id}",
            self.log.warning,
            key,
        ):
            self.log.info("recorded the checks in the catalog (%s/backup_info.json)", backup_dir)
        if not report.ok:
            raise AirflowFailException(f"checks failed for {backup_dir}: {report.summary().splitlines()[0]}")
        return report.as_dict()


#: Old name -> new name, each importable from this module.
_RENAMED = {
    "PostgresBackupHoldOperator": "PostgresStartBackupOperator",
    "Copied": "CopyRecords",  # of pg_safe_backup.store (files.copier has a Copied of its own: one file)
}


def __getattr__(name: str) -> Any:
    """The names before the renames (to Postgres<Verb><Object>Operator; the copy's records to
    :class:`~pg_safe_backup.store.CopyRecords`), with a deprecation warning."""
    if name in _RENAMED:
        import warnings

        from airflow.exceptions import AirflowProviderDeprecationWarning

        new = _RENAMED[name]
        warnings.warn(
            f"{name} is deprecated; use {new} (same module).", AirflowProviderDeprecationWarning, stacklevel=2
        )
        return globals()[new]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
