"""The pre-flight check as a task: a DAG's first task, or a deploy-time DAG's only one."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pg_safe_backup.errors import PgSafeBackupError
from pg_safe_backup.hooks.backup import PostgresBackupHook
from pg_safe_backup.params import (
    check_flag,
    check_seconds,
    check_text,
    optional_unless_rendered_later,
    unless_rendered_later,
)
from pg_safe_backup.preflight import CheckRequest, Level, run_check
from pg_safe_backup.utils.mixins import (
    PostgresBackupBaseOperator,
    backup_template_fields,
    rendered,
    task_error,
)

if TYPE_CHECKING:
    from airflow.sdk import Context


class PostgresCheckBackupOperator(PostgresBackupBaseOperator):
    """
    Check, before any backup, that the server of ``postgres_conn_id`` can be backed up and its WAL reaches
    the archive (:func:`pg_safe_backup.preflight.run_check`, as ``pg-safe-backup check`` does): its major, the
    role's privileges on every function a backup calls, ``wal_level``, WAL archiving, data checksums,
    ``summarize_wal`` when ``incremental``, the state table (``table`` in ``table_schema``, on
    ``state_conn_id`` when given), ``pgdata`` and free space at ``destination`` when given; then a forced
    WAL switch and a wait of up to ``archive_timeout`` seconds for that segment in ``wal_archive``.

    Logs each finding, one line with its fix. Fails without a retry (``AirflowFailException``) naming every
    problem; fails with a retry when something could not be checked (a server or the archive out of reach).
    XCom: ``ok``, ``server`` and ``findings`` (each ``check``, ``level``, ``message``, ``fix``).

    :param wal_archive: the WAL archive: a folder or an fsspec URL, listed with the store's own credentials
        (templated); None: pg_stat_archiver's word that the segment was archived.
    :param pgdata: the data directory as the copy task reads it (templated).
    :param destination: the local folder backups go to (templated): room for the databases?
    :param incremental: incremental backups are wanted (PostgreSQL 17+ with ``summarize_wal = on``).
    :param require_checksums: data checksums off fails the task (default: a warning).
    :param archive_timeout: seconds to wait for the switched WAL segment in the archive (templated).
    """

    template_fields: Sequence[str] = backup_template_fields(
        "wal_archive", "pgdata", "destination", "archive_timeout"
    )
    ui_color = "#e8f6f3"

    def __init__(
        self,
        *,
        wal_archive: str | None = None,
        pgdata: str | None = None,
        destination: str | None = None,
        incremental: bool = False,
        require_checksums: bool = False,
        archive_timeout: float | str = 60,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.wal_archive = optional_unless_rendered_later(check_text, wal_archive, "wal_archive")
        self.pgdata = optional_unless_rendered_later(check_text, pgdata, "pgdata")
        self.destination = optional_unless_rendered_later(check_text, destination, "destination")
        self.incremental = check_flag(incremental, "incremental")
        self.require_checksums = check_flag(require_checksums, "require_checksums")
        self.archive_timeout = unless_rendered_later(check_seconds, archive_timeout, "archive_timeout")

    def execute(self, context: Context) -> dict[str, Any]:
        target = self.backup_target
        request = CheckRequest(
            archive=self._optional("wal_archive"),
            pgdata=Path(pgdata) if (pgdata := self._optional("pgdata")) else None,
            destination=self._optional("destination"),
            table=target.table,
            schema=target.schema,
            incremental=self.incremental,
            require_checksums=self.require_checksums,
            timeout=rendered(check_seconds, self.archive_timeout, "archive_timeout"),
        )
        hook = PostgresBackupHook(
            target.postgres_conn_id,
            database=target.database,
            table=target.table,
            schema=target.schema,
            state_conn_id=target.state_conn_id,
        )
        try:
            preflight = run_check(
                hook.conninfo(backup_server=True),
                request,
                server_param="postgres_conn_id",
                server_name=repr(target.postgres_conn_id),
                state_dsn=hook.conninfo() if hook.separate_state else None,
            )
        except PgSafeBackupError as err:  # the connection unknown (never retried), or out of reach (retried)
            raise task_error(err, f"postgres_conn_id {target.postgres_conn_id!r}: {err}") from err
        for finding in preflight.findings:
            passed = {Level.OK: self.log.info, Level.WARNING: self.log.warning}
            passed.get(finding.level, self.log.error)("%s", finding.line())
        self.log.info("%s", preflight.summary())
        error = preflight.error()
        if error is not None:
            raise task_error(error)
        return preflight.as_dict()

    def _optional(self, name: str) -> str | None:
        """A templated optional text as rendered: None when unset or rendered empty."""
        value = getattr(self, name)
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
            return None
        return rendered(check_text, value, name)
