"""Day two of the backups a destination holds: restored on a schedule to prove they still restore
(the drill), and kept to a policy with the WAL they need (retention)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from airflow.providers.common.compat.sdk import AirflowFailException
from airflow.sdk import BaseOperator

from pg_safe_backup.catalog import DRILL_BY, choose_backup, list_backups, one_cluster
from pg_safe_backup.errors import PgSafeBackupError
from pg_safe_backup.hooks.server import ServerPosition, server_position
from pg_safe_backup.params import (
    check_flag,
    check_number,
    check_seconds,
    check_text,
    optional_unless_rendered_later,
    renders_later,
    unless_rendered_later,
)
from pg_safe_backup.retention import carry_out_retention, plan_root
from pg_safe_backup.utils.mixins import (
    check_storage_url,
    encryption_key,
    rendered,
    server_dsn,
    storage_path,
    task_error,
)

if TYPE_CHECKING:
    from airflow.sdk import Context

#: What a template renders an unset value to (``{{ params.keep_days }}`` of None): not given.
_UNSET_TEXT = ("", "none", "null")


class PostgresRestoreDrillOperator(BaseOperator):
    """
    A restore drill: take the newest backup under ``root`` that proves itself (by stop LSN; incomplete,
    unverifiable and, unless ``allow_failed``, failed backups are passed over, each named), restore it on
    a temporary server in a scratch folder and check it (:func:`pg_safe_backup.verify.check_backup`: the
    page-LSN check, ``pg_verifybackup``, recovery, amcheck, and ``invariant_sql`` when given), and record
    how long the restore took: the recovery time objective a real incident would meet.

    Fails, naming the age, when the newest backup started (its label's START TIME) more than ``max_age``
    ago (or there is none, or its age is unknown):
    a drill that passes on an old backup hides that the nightly backups stopped. Fails when a check fails.
    The outcome is appended to the backup's catalog entry (``pg-safe-backup list`` shows it).

    XCom: ``backup`` (its folder), ``age_s``, ``restore_s`` (the restore check: copy, recovery, amcheck),
    ``checks_s`` (the checks before it), ``rto_s`` (both), ``ok`` and each check's result.

    :param root: the folder the backups are stored under (templated); a local or mounted path.
    :param wal_archive: the WAL archive (templated); None for self-contained backups.
    :param max_age: the oldest the newest backup may be (templated): a ``timedelta`` or seconds; None: any.
    :param invariant_sql: a query the restored server must answer with true in every row (templated).
    :param invariant_db: the database ``invariant_sql`` runs in.
    :param restore_timeout: seconds the restore's recovery may take.
    :param work_dir: the scratch folder (default: a temporary folder, removed afterwards).
    :param allow_failed: also take a backup whose newest check failed.
    :param encryption_conn_id: an Airflow connection whose password is the key of encrypted backups
        (templated): they prove themselves and are checked decrypted with it (as
        ``PostgresVerifyBackupOperator`` does); without it an encrypted backup is passed over, named in the
        log. The same key reads a WAL archive ``wal-push`` encrypted.
    """

    template_fields: Sequence[str] = (
        "root",
        "wal_archive",
        "max_age",
        "invariant_sql",
        "work_dir",
        "encryption_conn_id",
    )
    ui_color = "#d6eaf8"

    def __init__(
        self,
        *,
        root: str,
        wal_archive: str | None = None,
        max_age: timedelta | float | str | None = timedelta(days=1, hours=6),
        invariant_sql: str | None = None,
        invariant_db: str = "postgres",
        restore_timeout: float = 3600,
        work_dir: str | None = None,
        allow_failed: bool = False,
        encryption_conn_id: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.encryption_conn_id = encryption_conn_id
        self.root = unless_rendered_later(check_text, root, "root")
        self.allow_failed = check_flag(allow_failed, "allow_failed")
        self.wal_archive = wal_archive
        self.max_age = max_age if max_age is None else unless_rendered_later(_seconds, max_age, "max_age")
        self.invariant_sql = invariant_sql
        self.invariant_db = check_text(invariant_db, "invariant_db")
        self.restore_timeout = check_number(restore_timeout, "restore_timeout", 0, allow_min=False)
        self.work_dir = work_dir

    def execute(self, context: Context) -> dict[str, Any]:
        from pg_safe_backup.verify import BackupCheck, check_backup, record_check

        root = storage_path(rendered(check_storage_url, self.root, "root"))
        wal_archive = rendered(check_text, self.wal_archive, "wal_archive") if self.wal_archive else None
        max_age = None if self.max_age in (None, "", "None") else rendered(_seconds, self.max_age, "max_age")
        key = encryption_key(self.encryption_conn_id)
        try:
            entries = list_backups(root, key=key)
            one_cluster(entries, root)  # "the newest" is a cluster's own
        except PgSafeBackupError as err:
            raise task_error(err, f"root {str(root)!r}: {err}") from err
        choice = choose_backup(entries, allow_failed=self.allow_failed)
        for name, why in choice.skipped:
            self.log.warning("drill: passing over %s: %s", name, why)
        if choice.picked is None:
            raise AirflowFailException(
                f"root {str(root)!r} holds no backup that proves itself"
                + (f" ({len(choice.skipped)} passed over, named in the log)" if choice.skipped else "")
            )
        newest = choice.picked
        started = newest.proof.start_time
        if started is None and newest.info is not None:
            # An age, not a deletion: the store's clock serves when the label's zone is an abbreviation.
            self.log.warning(
                "%s: its label's START TIME has no UTC offset; age from its catalog entry", newest.name
            )
            started = newest.info.stopped
        if started is None:
            raise AirflowFailException(
                f"the age of {newest.name} is unknown: its label's START TIME has no UTC offset and it has"
                " no catalog entry (set log_timezone to UTC on the server)"
            )
        age = (datetime.now(timezone.utc) - started).total_seconds()
        self.log.info(
            "drill of %s: the newest of %d backups that proves itself, started %s (%s ago)",
            newest.name,
            len(entries),
            started.isoformat(),
            timedelta(seconds=round(age)),
        )
        if max_age is not None and age > max_age:
            raise AirflowFailException(
                f"the newest backup under {root} ({newest.name}) is {timedelta(seconds=round(age))} old,"
                f" older than max_age {timedelta(seconds=max_age)}: are the backups still running?"
            )
        began = time.monotonic()
        try:
            checks = check_backup(
                newest.folder, wal_archive, restore=False, encryption_key=key, archive_key=key
            )
            checks_s = time.monotonic() - began
            restored = check_backup(
                newest.folder,
                wal_archive,
                page_lsns=False,
                manifest=False,
                invariant_sql=self.invariant_sql,
                invariant_db=self.invariant_db,
                timeout=self.restore_timeout,
                work_dir=self.work_dir,
                encryption_key=key,
                archive_key=key,  # one key: the backup's and the WAL archive's (wal-push --encryption-key-*)
            )
        except PgSafeBackupError as err:  # CheckNotRun: no verdict, nothing recorded; retried
            raise task_error(err, f"the drill of {newest.name} could not run: {err}") from err
        restore_s = time.monotonic() - began - checks_s
        report = BackupCheck(checks.steps + restored.steps)
        for step in report.steps:
            (self.log.error if step.status == "FAIL" else self.log.info)("%s: %s", step.name, step.line())
        ti = context["ti"]
        by = f"{DRILL_BY}{ti.dag_id}/{ti.run_id}"
        record_check(newest.folder, report, checks_s + restore_s, by, encryption_key=key)
        self.log.info(
            "drill: the restore took %.1f s (RTO: %.1f s with the checks before it) for %s",
            restore_s,
            checks_s + restore_s,
            newest.name,
        )
        if not report.ok:
            raise AirflowFailException(
                f"the drill of {newest.name} failed: {report.summary().splitlines()[0]}"
            )
        return {
            "backup": newest.name,
            "age_s": round(age, 1),
            "checks_s": round(checks_s, 1),
            "restore_s": round(restore_s, 1),
            "rto_s": round(checks_s + restore_s, 1),
            **report.as_dict(),
        }


def _seconds(value: Any, name: str) -> float:
    """``value`` (a timedelta, a number, or text spelling one) as seconds; ValueError names ``name``."""
    if isinstance(value, timedelta):
        return value.total_seconds()
    return float(check_seconds(value, name))


class PostgresBackupRetentionOperator(BaseOperator):
    """
    Keep the newest ``keep_last`` backups under ``root`` and/or those that started within ``keep_days``
    days (their label's START TIME), always the newest verified one; delete the others, then the files of
    the WAL archive older than the oldest kept backup's START WAL file, as ``pg_archivecleanup`` does
    (never a ``.history`` or ``.backup`` file). See :mod:`pg_safe_backup.retention` for the order that
    keeps a crash safe.

    Only backups that prove themselves (:mod:`pg_safe_backup.proof`) are counted, kept or deleted; an
    unverifiable or incomplete one is neither counted nor deleted, named in the log and XCom. Nothing is
    removed when no proven backup would be kept: the task fails (``AirflowFailException``), as it does for
    a bad rendered parameter.

    XCom: ``kept`` (folder -> reasons), ``deleted``, ``skipped``, ``wal_cutoff``, ``wal_removed`` (a
    count) with ``wal_first_removed`` and ``wal_last_removed``, and ``dry_run``.

    :param root: the folder holding the backups: a local path or an ``ObjectStoragePath`` URL such as
        ``s3://conn_id@bucket/prefix`` (templated).
    :param wal_archive: the WAL archive, local or a URL (templated); None: no WAL is removed.
    :param keep_last: how many of the newest backups to keep, at least 1 (templated).
    :param keep_days: keep the backups started within this many days (templated). At least one of
        ``keep_last`` and ``keep_days`` is required.
    :param dry_run: only log and return what would go.
    :param postgres_conn_id: the live cluster (templated; optional): backups of another system identifier,
        or ending beyond its current WAL position, are left alone as unverifiable.
    :param encryption_conn_id: an Airflow connection whose password is the key of encrypted backups
        (templated); without it an encrypted backup does not prove itself and is left alone.
    """

    template_fields: Sequence[str] = (
        "root",
        "wal_archive",
        "keep_last",
        "keep_days",
        "postgres_conn_id",
        "encryption_conn_id",
    )

    def __init__(
        self,
        *,
        root: str,
        wal_archive: str | None = None,
        keep_last: int | str | None = None,
        keep_days: float | str | None = None,
        dry_run: bool = False,
        postgres_conn_id: str | None = None,
        encryption_conn_id: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.encryption_conn_id = encryption_conn_id
        self.root = unless_rendered_later(check_text, root, "root")
        self.wal_archive = optional_unless_rendered_later(check_text, wal_archive, "wal_archive")
        self.postgres_conn_id = optional_unless_rendered_later(
            check_text, postgres_conn_id, "postgres_conn_id"
        )
        self.keep_last = keep_last if renders_later(keep_last) else check_keep_last(keep_last, "keep_last")
        self.keep_days = keep_days if renders_later(keep_days) else check_keep_days(keep_days, "keep_days")
        if self.keep_last is None and self.keep_days is None:
            raise ValueError("retention needs keep_last and/or keep_days; neither was given")
        self.dry_run = check_flag(dry_run, "dry_run")

    def execute(self, context: Context) -> dict[str, Any]:
        keep_last = rendered(check_keep_last, self.keep_last, "keep_last")
        keep_days = rendered(check_keep_days, self.keep_days, "keep_days")
        if keep_last is None and keep_days is None:
            raise AirflowFailException("retention needs keep_last and/or keep_days; both rendered empty")
        return self.run_retention(
            rendered(check_storage_url, self.root, "root"),
            rendered(check_storage_url, self.wal_archive, "wal_archive") if self.wal_archive else None,
            keep_last,
            keep_days,
        )

    def run_retention(
        self,
        root: str,
        wal_archive: str | None,
        keep_last: int | None,
        keep_days: float | None,
        now: datetime | None = None,
    ) -> dict[str, Any]:
        """Retention of the rendered values (what ``execute()`` runs); the XCom.

        :param root: the backups' folder or URL.
        :param wal_archive: the WAL archive's folder or URL, or None.
        :param keep_last: how many of the newest to keep, or None.
        :param keep_days: keep those within this many days, or None.
        :param now: the time to count days from (default: now).
        """
        try:
            server = self._server() if self.postgres_conn_id else None
        except PgSafeBackupError as err:  # ServerUnreachable: retried
            raise task_error(
                err, f"postgres_conn_id {self.postgres_conn_id!r}: {err}; removing nothing"
            ) from err
        key = encryption_key(self.encryption_conn_id)
        try:
            plan = plan_root(
                storage_path(root), keep_last=keep_last, keep_days=keep_days, now=now, server=server, key=key
            )
            report = carry_out_retention(
                plan,
                wal_archive=storage_path(wal_archive) if wal_archive else None,
                dry_run=self.dry_run,
                log=self.log.info,
                key=key,
            )
        except PgSafeBackupError as err:  # RetentionRefused, CatalogError: never retried
            raise task_error(err, f"retention of {root}: {err}") from err
        except ValueError as err:  # plan_retention's check of keep_last / keep_days
            raise AirflowFailException(f"invalid rendered parameter: {err}") from err
        return report.as_dict()

    def _server(self) -> ServerPosition:
        """The live cluster's identity and WAL position, through the connection as the backup uses it."""
        return server_position(server_dsn(rendered(check_text, self.postgres_conn_id, "postgres_conn_id")))


def _unset(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() in _UNSET_TEXT)


def check_keep_last(value: Any, param: str) -> int | None:
    """A count of backups >= 1, or its text (a template renders to text); None or empty: not given."""
    if _unset(value):
        return None
    text = value.strip() if isinstance(value, str) else None
    if isinstance(value, bool) or not (isinstance(value, int) or (text and text.isdigit())):
        raise ValueError(f"{param} must be a whole number of backups, got {value!r}")
    if int(value) < 1:
        raise ValueError(f"{param} must be at least 1, got {value!r}")
    return int(value)


def check_keep_days(value: Any, param: str) -> float | None:
    """A number of days >= 0, or its text; None or empty: not given."""
    if _unset(value):
        return None
    try:
        if isinstance(value, bool):
            raise TypeError
        days = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{param} must be a number of days, got {value!r}") from None
    if not days >= 0 or days == float("inf"):
        raise ValueError(f"{param} must be a number of days >= 0, got {value!r}")
    return days
