"""Incremental backups (PostgreSQL 17+): the task that takes one against the newest backup under a root, and
the branch that makes "full on Sundays, incremental on other days" one parameter of the group."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from airflow.providers.standard.operators.branch import BaseBranchOperator
from airflow.sdk import BaseOperator

from pg_safe_backup.errors import PgSafeBackupError
from pg_safe_backup.hooks.server import connect, incremental_facts
from pg_safe_backup.incremental import IncrementalRefused, check_ready, find_parent, take_incremental
from pg_safe_backup.params import (
    check_flag,
    check_text,
    optional_unless_rendered_later,
    unless_rendered_later,
)
from pg_safe_backup.utils import metrics
from pg_safe_backup.utils.mixins import (
    catalog_asset,
    check_storage_url,
    known_root,
    rendered,
    server_dsn,
    storage_path,
    task_error,
)

if TYPE_CHECKING:
    from airflow.sdk import Context

#: The days a ``full_on`` may name, Monday first (``datetime.weekday()``).
WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
DEFAULT_INCREMENTAL_LABEL = "airflow {{ dag.dag_id }} {{ run_id }} incremental"


def check_full_on(value: Any, param: str = "full_on") -> tuple[str, ...]:
    """``full_on`` as weekday names: one name (``"sunday"``) or several; ``"daily"`` is every day.

    :raises ValueError: an unknown day, naming ``param``.
    """
    names = [value] if isinstance(value, str) else list(value) if isinstance(value, Iterable) else [value]
    days = []
    for name in names:
        day = str(name).strip().lower() if isinstance(name, str) else None
        if day == "daily":
            return WEEKDAYS
        if day not in WEEKDAYS:
            raise ValueError(f"{param}: {name!r} is not a weekday ({', '.join(WEEKDAYS)}, or 'daily')")
        days.append(day)
    if not days:
        raise ValueError(f"{param}: name at least one weekday")
    return tuple(days)


def _run_time(context: Context) -> datetime:
    """The run's logical date, else (a manual run without one) its run_after."""
    return context.get("logical_date") or context["dag_run"].run_after


class PostgresIncrementalBackupOperator(BaseOperator):
    """
    Take an incremental backup (PostgreSQL 17+, ``summarize_wal = on``) of the cluster of
    ``postgres_conn_id`` against the newest backup of that cluster under ``root`` (a full of this provider,
    or an incremental; by proven stop LSN), with ``pg_basebackup --incremental`` over a replication
    connection, into ``destination``: only the blocks changed since that backup started. It is laid out as
    the fulls (tablespaces in ``pg_tblspc/<oid>``, ``tablespace_map``), proven against its parent and
    catalogued (parent, the parent's Manifest-Checksum). ``pg-safe-backup restore`` of it combines the chain
    (``pg_combinebackup``); retention keeps a kept incremental's chain (README, "Incremental backups").

    Before it starts, each condition not met fails the task naming its fix: PostgreSQL 17+, ``summarize_wal``
    on since before the parent started, the role's REPLICATION, a parent that proves itself with a version 2
    manifest; the server's own refusals (pg_hba, a changed manifest, missing WAL summaries) the same way.

    XCom: ``folder``, ``parent``, ``bytes``, ``files``, ``seconds``, ``start_lsn``, ``stop_lsn``,
    ``manifest_checksum``, ``backup_info``.

    :param postgres_conn_id: Airflow connection of the server (its role needs REPLICATION and a pg_hba.conf
        line for replication connections) (templated).
    :param root: the folder of the cluster's backups: a local path or an ``ObjectStoragePath`` URL such as
        ``s3://conn_id@bucket/prefix`` (templated).
    :param destination: the new backup's folder, local or a URL (templated); default
        ``<root>/<YYYYMMDDTHHMMSS>-incremental-<try id>`` (the run's logical date, else its run_after): one
        folder per try. In an object store the backup is taken into ``work_dir``, then uploaded (its
        manifest last) and catalogued there.
    :param incremental_label: the backup's label (templated).
    :param bindir: the folder of pg_basebackup of the server's major (templated); default: looked for.
    :param fast_checkpoint: start with an immediate checkpoint.
    :param basebackup_timeout: seconds pg_basebackup may take (None: no limit).
    :param work_dir: for a ``destination`` in an object store, where the backup is taken before it is
        uploaded (default: the system's temporary folder; it needs room for the incremental).

    A ``root`` known when the DAG is parsed (no template) makes the task update that root's Airflow Asset
    when it succeeds, as the store task of a full does (:func:`~pg_safe_backup.utils.mixins.catalog_asset`).
    """

    template_fields: Sequence[str] = (
        "postgres_conn_id",
        "root",
        "destination",
        "incremental_label",
        "bindir",
    )
    ui_color = "#d7e8f5"

    def __init__(
        self,
        *,
        postgres_conn_id: str = "postgres_default",
        root: str,
        destination: str | None = None,
        incremental_label: str = DEFAULT_INCREMENTAL_LABEL,
        bindir: str | None = None,
        fast_checkpoint: bool = True,
        basebackup_timeout: float | None = None,
        work_dir: str | None = None,
        **kwargs: Any,
    ) -> None:
        if known_root(root):  # as the store task's: a drill scheduled on it runs after an incremental too
            kwargs["outlets"] = [*(kwargs.get("outlets") or []), catalog_asset(root)]
        super().__init__(**kwargs)
        self.work_dir = work_dir
        self.postgres_conn_id = unless_rendered_later(check_text, postgres_conn_id, "postgres_conn_id")
        self.root = unless_rendered_later(check_text, root, "root")
        self.destination = optional_unless_rendered_later(check_text, destination, "destination")
        self.incremental_label = unless_rendered_later(check_text, incremental_label, "incremental_label")
        self.bindir = optional_unless_rendered_later(check_text, bindir, "bindir")
        self.fast_checkpoint = check_flag(fast_checkpoint, "fast_checkpoint")
        self.basebackup_timeout = basebackup_timeout

    def execute(self, context: Context) -> dict[str, Any]:
        conn_id = rendered(check_text, self.postgres_conn_id, "postgres_conn_id")
        root = storage_path(rendered(check_storage_url, self.root, "root"))
        ti = context["ti"]
        when = _run_time(context)  # a manual run of Airflow 3 may have no logical date (nor ts_nodash)
        default = root / f"{when.strftime('%Y%m%dT%H%M%S')}-incremental-{str(ti.id)[:8]}"
        destination = (
            storage_path(rendered(check_storage_url, self.destination, "destination"))
            if self.destination
            else default
        )
        dsn = server_dsn(conn_id)
        run = {
            "dag_id": ti.dag_id,
            "run_id": ti.run_id,
            "task_id": ti.task_id,
            "map_index": ti.map_index,
            "attempt": str(ti.id),
        }
        metrics.incr("backup.started", mode="incremental")
        try:
            with connect(dsn, purpose="incremental check") as conn:
                facts = incremental_facts(conn)
            parent = find_parent(root, facts.system_identifier)
            check_ready(facts, parent, role=f"the role of postgres_conn_id {conn_id!r}")
            taken = take_incremental(
                dsn,
                parent,
                destination,
                tablespaces=facts.tablespaces,
                bindir=self.bindir,
                label=rendered(check_text, self.incremental_label, "incremental_label"),
                fast_checkpoint=self.fast_checkpoint,
                run=run,
                timeout=self.basebackup_timeout,
                work_dir=self.work_dir,
                log=self.log,
            )
        except PgSafeBackupError as err:  # IncrementalRefused never retried; IncrementalFailed retried
            metrics.incr("backup.failed", mode="incremental", stage="incremental")
            raise task_error(err, f"incremental backup of {conn_id!r} into {destination}: {err}") from err
        metrics.completed("incremental", "plain", taken["bytes"], taken["seconds"])
        return taken


class PostgresBackupKindOperator(BaseBranchOperator):
    """
    The branch of a ``PostgresOnlineBackup`` with ``incremental=``: a full backup (the group's hold and gate)
    on the weekdays of ``full_on`` (of the run's logical date, else its run_after, in the DAG's time zone),
    and when no backup under ``root`` can be an incremental's parent (none yet, or the newest unusable: a
    full is what it needs); the incremental task on the other days.

    :param full_on: the weekdays of full backups (``"sunday"``, ``["sunday", "wednesday"]``, ``"daily"``).
    :param root: the folder of the cluster's backups (templated).
    :param full_task_ids: the tasks of a full backup (the hold and the gate).
    :param incremental_task_id: the incremental backup task.
    :param postgres_conn_id: the server (templated): its system identifier picks its backups under ``root``.
    """

    template_fields: Sequence[str] = ("root", "postgres_conn_id")

    def __init__(
        self,
        *,
        full_on: Any,
        root: str,
        full_task_ids: Sequence[str],
        incremental_task_id: str,
        postgres_conn_id: str = "postgres_default",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.full_on = check_full_on(full_on)
        self.root = unless_rendered_later(check_text, root, "root")
        self.full_task_ids = list(full_task_ids)
        self.incremental_task_id = incremental_task_id
        self.postgres_conn_id = unless_rendered_later(check_text, postgres_conn_id, "postgres_conn_id")

    def choose_branch(self, context: Context) -> str | Iterable[str]:
        when = _run_time(context)
        zone = getattr(context.get("dag"), "timezone", None)  # the DAG's weekdays: its start_date's zone
        day = WEEKDAYS[(when.astimezone(zone) if zone else when).weekday()]
        if day in self.full_on:
            self.log.info("a full backup: %s is in full_on (%s)", day, ", ".join(self.full_on))
            return self.full_task_ids
        conn_id = rendered(check_text, self.postgres_conn_id, "postgres_conn_id")
        root = storage_path(rendered(check_storage_url, self.root, "root"))
        try:
            with connect(server_dsn(conn_id), purpose="backup kind") as conn:
                system_identifier = incremental_facts(conn).system_identifier
            parent = find_parent(root, system_identifier)
        except IncrementalRefused as err:
            self.log.warning("a full backup instead of an incremental on %s: %s", day, err)
            return self.full_task_ids
        except PgSafeBackupError as err:  # the server unreachable: retried
            raise task_error(err, f"postgres_conn_id {conn_id!r}: {err}") from err
        self.log.info("an incremental backup on %s, against %s", day, parent.name)
        return self.incremental_task_id
