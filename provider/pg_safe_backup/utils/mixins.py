"""What the hold, the gate and the finish share: which server and table, which backup of the run, how to
wait, and how a failure ends a task.

The base operator and sensor (amazon's ``AwsBaseOperator`` / ``aws_template_fields`` shape) declare the
shared keywords once. Below ``operators/`` and ``sensors/``, which both import it from here (as amazon's
``utils/mixins.py``), so the sensor does not import the operators' module, nor the operators' module
the task group.
"""

from __future__ import annotations

import asyncio
import posixpath
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

from airflow.providers.common.compat.sdk import AirflowException, AirflowFailException
from airflow.sdk import Asset, BaseOperator, BaseSensorOperator, ObjectStoragePath

from pg_safe_backup.errors import PgSafeBackupError, retryable
from pg_safe_backup.files.crypt import CryptError, EncryptionKey
from pg_safe_backup.params import check_number, check_text, unless_rendered_later, validate_identifier
from pg_safe_backup.session import PENDING
from pg_safe_backup.state import BackupRef, BackupTarget
from pg_safe_backup.store import BACKUP_KEYS, CopyRecords

if TYPE_CHECKING:
    from airflow.sdk import Context

    from pg_safe_backup.triggers.backup import PostgresBackupTriggerBase

T = TypeVar("T")

#: Fields rendered at run time (Jinja, params, XComArgs), so that a mapped task group can map over
#: connections.
CONNECTION_FIELDS = ("postgres_conn_id", "state_conn_id", "database")
#: XCom key of the copy's records (:class:`~pg_safe_backup.store.CopyRecords`): every file's size, time and
#: SHA-256, from which the store task writes the backup_manifest without reading the copy again (and of an
#: object store or tar copy, which it cannot read). Pushed only up to ``MAX_XCOM_FILES`` files
#: (:mod:`~pg_safe_backup.operators.copy`): XCom lives in Airflow's metadata database (about 100 bytes a
#: file); beyond, a local plain copy's manifest reads the copy, and other copies get none (the log says so).
FILES_XCOM = "files"
#: Default ``inline_wait``: seconds the gate and the finish wait in their worker slot before deferring.
INLINE_WAIT_S = 30.0


def default_deferrable() -> bool:
    """``[operators] default_deferrable``, read as Airflow's own deferrable operators read it."""
    from airflow.configuration import conf

    return conf.getboolean("operators", "default_deferrable", fallback=False)


def _text_or_template(value: Any, param: str) -> Any:
    """A non-empty string, checked now unless it renders at run time (then :func:`rendered` checks it)."""
    return unless_rendered_later(check_text, value, param)


def rendered(check: Callable[[Any, str], T], value: Any, param: str) -> T:
    """``check(value, param)`` on a field as rendered for this run, in ``execute()``. A bad value fails
    the task without a retry (a retry would render the same), with the check's message, which names
    the parameter."""
    try:
        return check(value, param)
    except ValueError as err:
        raise airflow_error(f"invalid rendered parameter: {err}", retry=False) from err


def airflow_error(message: str, *, retry: bool) -> AirflowException:
    """The one mapping from the package's two kinds of failure to Airflow's: ``AirflowException``, which
    Airflow retries (try again: :class:`~pg_safe_backup.errors.TransientError`), or
    ``AirflowFailException``, never retried (:class:`~pg_safe_backup.errors.PermanentError`: the backup is
    unusable or the request wrong, and running the task again gives the same answer).

    :param message: the task's failure, in one line.
    :param retry: whether running the task again may succeed.
    """
    return AirflowException(message) if retry else AirflowFailException(message)


def task_error(err: PgSafeBackupError, message: str | None = None) -> AirflowException:
    """The Airflow exception that ends a task on a domain error, by its branch of the error tree
    (:func:`pg_safe_backup.errors.retryable`). Raise it ``from err`` at an operator's error boundary, which
    catches :class:`~pg_safe_backup.errors.PgSafeBackupError`, never a list of classes.

    :param err: the domain error.
    :param message: the task's failure (default: the error's own message).
    """
    return airflow_error(str(err) if message is None else message, retry=retryable(err))


def fail_on(event: dict[str, Any], message: str) -> AirflowException:
    """The exception that ends a task on a failed wait: retried when the event says a retry could succeed
    (the server could not be reached or followed), never when a backup failed or was refused: that is not
    made good by running this task again."""
    return airflow_error(message, retry=bool(event.get("retryable")))


def server_dsn(conn_id: str) -> str:
    """The libpq connection string of the server backed up through ``conn_id``, as the backup's hook makes
    it, for the Airflow-free code (:mod:`pg_safe_backup.hooks.server`, the incremental's pg_basebackup).

    :raises AirflowFailException: no such connection, or its arguments cannot be made (the error names the
        parameter and the connection).
    """
    from pg_safe_backup.hooks.backup import PostgresBackupHook

    try:
        return PostgresBackupHook(conn_id).conninfo(backup_server=True)
    except Exception as err:  # BackupError: no such connection, or its arguments cannot be made
        raise AirflowFailException(str(err)) from err


def encryption_key(conn_id: str | None, param: str = "encryption_conn_id") -> EncryptionKey | None:
    """The key in the password of the Airflow connection ``conn_id`` (or a secret backend's), read on the
    worker when the task runs: never a task's argument, XCom value or log line (only its id is).

    :param conn_id: the rendered connection id; None or empty: no encryption.
    :param param: the operator's parameter that named it, for the error.
    :raises AirflowFailException: the connection has no password, or one that is no key (named, never its
        content); a missing connection is Airflow's own error, naming it.
    """
    if not conn_id:
        return None
    from airflow.sdk import BaseHook

    password = BaseHook.get_connection(conn_id).password
    try:
        if not password:
            raise CryptError(
                f"{param} {conn_id!r}: the connection has no password (the key: openssl rand -hex 32)"
            )
        return EncryptionKey.parse(password, f"{param} {conn_id!r} (its password)")
    except CryptError as err:
        raise task_error(err) from None


#: The provider whose filesystem Airflow uses for each object store's scheme (its provider info's
#: ``filesystems``: amazon's ``aws.fs.s3``, google's ``cloud.fs.gcs``, microsoft-azure's ``fs.adls``, and
#: each module's ``schemes``), with this package's extra that installs it and the store's fsspec driver.
STORE_PROVIDERS = {
    **dict.fromkeys(("s3", "s3a", "s3n"), ("apache-airflow-providers-amazon", "s3")),
    **dict.fromkeys(("gs", "gcs"), ("apache-airflow-providers-google", "gcs")),
    **dict.fromkeys(("abfs", "abfss", "adl"), ("apache-airflow-providers-microsoft-azure", "azure")),
}


def storage_path(location: str) -> Path | ObjectStoragePath:
    """A local ``Path`` for a plain or ``file://`` location (``shutil.rmtree``, no fsspec), else the
    ``ObjectStoragePath`` of the URL (its connection's credentials: :func:`check_storage_url` first).

    :param location: a rendered path or URL.
    """
    target = ObjectStoragePath(location)
    return Path(target.path) if target.protocol in ("", "file") else target


def check_storage_url(value: Any, param: str) -> str:
    """A rendered location (a local path or an ``ObjectStoragePath`` URL) whose connection, when the URL
    names one (``s3://conn_id@bucket/prefix``), Airflow will use: an installed provider registers a
    filesystem for its scheme (Airflow's own registry, ``airflow.sdk.io.has_fs``), or one was attached under
    that connection (``attach("s3", conn_id=..., fs=...)``). Without either Airflow has no filesystem for
    the scheme, a connection in the URL or not ("No filesystem registered for scheme s3" at the first
    access, on 3.1 and 3.3). A check for :func:`rendered`, called before a task does anything.

    :param value: the rendered parameter.
    :param param: its name, for the error.
    :raises ValueError: the error names ``param``, the scheme and the connection id, never the rest of the
        URL, and the extra to install (``[s3]``, ``[gcs]``, ``[azure]``).
    """
    text = check_text(value, param)
    url = urlsplit(text)
    conn_id = url.netloc.rpartition("@")[0]  # as ObjectStoragePath reads it
    if url.scheme in ("", "file") or _airflow_has_filesystem(url.scheme, conn_id or None):
        return text
    # A user:key pair: never the key; nothing after the @.
    shown = f"{param} {url.scheme}://" + (f"{conn_id.partition(':')[0]}@..." if conn_id else "...")
    if url.scheme in STORE_PROVIDERS:
        package, extra = STORE_PROVIDERS[url.scheme]
        what = "the connection needs" if conn_id else "Airflow reads it through"
        raise ValueError(
            f"{shown}: {what} {package}, whose filesystem Airflow uses for {url.scheme}://"
            f" (pip install 'airflow-provider-pg-safe-backup[{extra}]'); without it Airflow"
            + (" ignores the connection" if conn_id else " has no filesystem for it")
        )
    raise ValueError(
        f"{shown}: no installed Airflow provider registers a filesystem for {url.scheme}:// (s3://, gs://,"
        " abfs://: the extras [s3], [gcs], [azure])"
        + (", so Airflow would ignore the connection" if conn_id else "")
    )


def _airflow_has_filesystem(scheme: str, conn_id: str | None) -> bool:
    """Whether Airflow has a filesystem for ``scheme://conn_id@``: a provider's, or one attached under it."""
    from airflow.sdk.io import attach, has_fs

    # attach() returns the store attached under the connection (as ObjectStoragePath does on first use);
    # "fs" is in its __dict__ only when a filesystem was given to it: otherwise it would come from has_fs's.
    return has_fs(scheme) or "fs" in vars(attach(scheme, conn_id=conn_id))


def catalog_asset(root: str) -> Asset:
    """The Airflow Asset of the backups catalogued in ``root`` (each backup's folder and its catalog entry
    side by side there): the store task updates it, a DAG scheduled on it (the restore drill) runs after
    each stored backup. Its URI is the root's, without a connection id (``s3://conn_id@bucket/prefix`` and
    ``s3://bucket/prefix`` hold the same backups); a local folder's is ``file://`` and the absolute path.

    :param root: a local folder or an ``ObjectStoragePath`` URL, as the operators take it (not a template).
    :raises ValueError: a relative path, naming ``catalog_root``.
    """
    url = urlsplit(root)
    if url.scheme in ("", "file"):
        path = url.path if url.scheme else root
        if not path.startswith("/"):
            raise ValueError(f"catalog_root must be an absolute path or a URL, got {root!r}")
        return Asset(uri="file://" + posixpath.normpath(path))
    where = url.netloc.rpartition("@")[2]  # never the connection id (nor a user:key pair)
    return Asset(uri=f"{url.scheme}://{where}{url.path.rstrip('/')}")


def known_root(value: Any) -> str | None:
    """``value`` when it names a folder or URL before the run (when the DAG is parsed): an absolute path or
    a URL without a template; else None (a template, an XComArg, a relative path)."""
    templated = isinstance(value, str) and any(mark in value for mark in ("{{", "{%", "{#"))
    if not isinstance(value, str) or templated or value.endswith(":/"):
        return None
    return value if value.startswith("/") or "://" in value else None


def catalog_root_of(destination: Any) -> str | None:
    """The folder a backup stored into ``destination`` is catalogued in (its parent), when it is known
    before the run (:func:`known_root`)."""
    return known_root(destination.rstrip("/").rpartition("/")[0]) if isinstance(destination, str) else None


def same_map_index_xcom(context: Context, task_id: str, key: str) -> Any:
    """The XCom ``key`` of ``task_id`` in this run, from the same map index as the calling task (a mapped
    group's tasks all have one; outside one it is -1): never another map index's backup."""
    ti = context["ti"]
    return ti.xcom_pull(
        task_ids=task_id, key=key, map_indexes=ti.map_index if ti.map_index is not None else -1
    )


def copied_records(context: Context, copy_task_ids: Sequence[str]) -> CopyRecords | None:
    """The records the group's copy tasks pushed (XCom :data:`FILES_XCOM`), of this task's map index (see
    :meth:`CopyRecords.from_xcom <pg_safe_backup.store.CopyRecords.from_xcom>`).

    :param context: the reading task's context.
    :param copy_task_ids: the group's copy tasks.
    """
    return CopyRecords.from_xcom(
        same_map_index_xcom(context, task_id, FILES_XCOM) for task_id in copy_task_ids
    )


def finished_backup(context: Context, finish_task_id: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """What the finish ``finish_task_id`` handed over at this task's map index (its XCom
    :data:`~pg_safe_backup.store.BACKUP_KEYS`; no ``backup_label``: the backup did not complete), and this
    task's DAG run as a catalog entry records it (:data:`~pg_safe_backup.store.RUN_KEYS`)."""
    backup = {key: same_map_index_xcom(context, finish_task_id, key) for key in BACKUP_KEYS}
    finished = same_map_index_xcom(context, finish_task_id, "return_value") or {}
    ti = context["ti"]
    run = {
        "dag_id": ti.dag_id,
        "run_id": ti.run_id,
        "task_id": ti.task_id,
        "map_index": ti.map_index if ti.map_index is not None and ti.map_index >= 0 else None,
        "attempt": finished.get("attempt") if isinstance(finished, dict) else None,
    }
    return backup, run


def backup_template_fields(*fields: str) -> tuple[str, ...]:
    """A backup task's ``template_fields``: its own ``fields``, then :data:`CONNECTION_FIELDS` (as amazon's
    ``aws_template_fields``)."""
    return (*fields, *CONNECTION_FIELDS)


class PostgresBackupBaseOperator(BaseOperator):
    """
    What the hold, gate and finish share, declared once: which server and table (:class:`BackupTarget`),
    which backup of the run (:class:`BackupRef`), how to wait. The gate has it through
    :class:`PostgresBackupBaseSensor`.

    :param postgres_conn_id: Airflow connection (type postgres) of the server to back up (a primary
        or a hot standby). Templated: a mapped task group can map over it.
    :param state_conn_id: connection of the server holding the backup table when it is not the one
        backed up (for a standby: its primary, since a standby is read-only). Default: the same.
        Templated.
    :param database: database holding the backup table, instead of the connection's. Templated.
    :param table: backup state table (created on first use; the seed scripts' table is migrated).
    :param table_schema: schema of the backup state table.
    :param backup_key: tells apart several backups in one DAG run (one per cluster); the
        ``PostgresOnlineBackup`` group sets it to its full group id. With the map index of a mapped
        group, the DAG id and the run id it makes the backup's owner.
    :param poll_interval: seconds between the gate's and finish's re-reads (state changes wake them
        at once); the hold, woken by NOTIFY and its sessions' sockets, re-reads every max(this, 60 s).
    :param deferrable: wait in the triggerer instead of a worker slot (default:
        ``[operators] default_deferrable``).
    :param inline_wait: deferrable, the gate and the finish first wait this many seconds in their worker
        slot, and defer only if their backup has not started (or ended) by then: a fast checkpoint and
        pg_backup_stop take a second or less, and a deferral costs a trip through the triggerer, the
        scheduler and a worker (two to three seconds). A gate whose hold task waits for a slot (of the
        backup-mode pool) defers at once. 0: defer at once.
    """

    template_fields: Sequence[str] = backup_template_fields()

    def __init__(
        self,
        *,
        postgres_conn_id: str = "postgres_default",
        state_conn_id: str | None = None,
        database: str | None = None,
        table: str = "backup",
        table_schema: str = "public",
        backup_key: str = "backup",
        poll_interval: float = 5.0,
        deferrable: bool | None = None,
        inline_wait: float = INLINE_WAIT_S,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.postgres_conn_id = _text_or_template(postgres_conn_id, "postgres_conn_id")
        self.state_conn_id = (
            state_conn_id if state_conn_id is None else _text_or_template(state_conn_id, "state_conn_id")
        )
        self.database = database if database is None else _text_or_template(database, "database")
        self.table = validate_identifier(table, "table")
        self.table_schema = validate_identifier(table_schema, "table_schema")
        self.backup_key = check_text(backup_key, "backup_key")
        self.poll_interval = check_number(poll_interval, "poll_interval", 0, allow_min=False)
        self.deferrable = default_deferrable() if deferrable is None else deferrable
        self.inline_wait = check_number(inline_wait, "inline_wait", 0)

    @property
    def backup_target(self) -> BackupTarget:
        """Which server and table, from the rendered fields (checked again: they may come from a template)."""
        rendered(check_text, self.postgres_conn_id, "postgres_conn_id")
        for name in ("state_conn_id", "database"):
            if getattr(self, name) is not None:
                rendered(check_text, getattr(self, name), name)
        return BackupTarget(
            postgres_conn_id=self.postgres_conn_id,
            state_conn_id=self.state_conn_id,
            database=self.database,
            table=self.table,
            schema=self.table_schema,
        )

    def backup_ref(
        self, context: Context, hold_task_id: str | None = None, finish_task_id: str | None = None
    ) -> BackupRef:
        """Which backup: this DAG run, this group (backup key), this map index."""
        ti = context["ti"]
        return BackupRef(
            dag_id=ti.dag_id,
            run_id=ti.run_id,
            backup_key=self.backup_key,
            map_index=ti.map_index if ti.map_index is not None else -1,
            hold_task_id=hold_task_id,
            finish_task_id=finish_task_id,
        )

    def wait_on(
        self,
        context: Context,
        trigger: PostgresBackupTriggerBase,
        timeout: timedelta | None = None,
        patience: float = 0.0,
    ) -> Any:
        """Defer on ``trigger``, or (deferrable=False) run its wait here; then ``execute_complete``.

        :param patience: deferrable, first wait here this many seconds (see ``inline_wait``); the
            trigger, deferred on only if nothing settled, waits again from the start.
        """
        if self.deferrable:
            if patience > 0:
                started = time.monotonic()
                result = asyncio.run(trigger.result(patience=patience))
                if result["status"] != PENDING:
                    return self.execute_complete(context, result)  # type: ignore[attr-defined]
                trigger.waited(time.monotonic() - started)
                self.log.info("not settled within inline_wait=%gs: deferring", patience)
            self.defer(trigger=trigger, method_name="execute_complete", timeout=timeout)
        return self.execute_complete(context, asyncio.run(trigger.result()))  # type: ignore[attr-defined]

    def ended_well(
        self, context: Context, trigger: type[PostgresBackupTriggerBase], event: dict[str, Any]
    ) -> Any:
        """A successful wait's result (``trigger.outcome``): logged, its XComs pushed, its value returned."""
        xcoms, value = trigger.outcome(event, self.log)
        for key, item in xcoms.items():
            context["ti"].xcom_push(key=key, value=item)
        return value


class PostgresBackupBaseSensor(BaseSensorOperator, PostgresBackupBaseOperator):
    """The base operator's keywords and methods on a sensor (``timeout``, ``soft_fail``, ...)."""

    template_fields: Sequence[str] = backup_template_fields()


#: The name before the base operator (its tests and imports): the hold, gate and finish all derive from it.
BackupTaskMixin = PostgresBackupBaseOperator
