"""Snapshot backups: the snapshot step inside backup mode, and the snapshots' removal after the copy-out.

A ``PostgresOnlineBackup(snapshot={...})`` places :class:`PostgresSnapshotOperator` between its gate and its
finish (backup mode lasts as long as the snapshots take: seconds, whatever the size), turns the copy tasks
of its ``with`` block into copy-outs that run after the finish and read the snapshots, and ends with
:class:`PostgresDeleteSnapshotsOperator` (a teardown: also after a failure). See
:mod:`pg_safe_backup.snapshots` for the drivers.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow.providers.common.compat.sdk import AirflowFailException
from airflow.sdk import BaseOperator, TriggerRule

from pg_safe_backup.errors import PgSafeBackupError
from pg_safe_backup.params import check_flag, check_text, unless_rendered_later
from pg_safe_backup.snapshots import (
    KeptSnapshot,
    Snapshot,
    SnapshotDriver,
    SnapshotError,
    delete_all,
    driver_from,
    kept_name,
    plan_volumes,
    planned,
    tablespace_links,
    take_all,
)
from pg_safe_backup.store import catalog_kept_snapshot
from pg_safe_backup.utils.mixins import (
    copied_records,
    finished_backup,
    rendered,
    same_map_index_xcom,
    task_error,
)

if TYPE_CHECKING:
    from airflow.sdk import Context

#: XCom key of the snapshots a step is about to take (pushed BEFORE it takes them): what the teardown removes
#: even when the step's worker died half-way.
PLANNED_XCOM = "snapshots_planned"
#: XCom key of the snapshots taken (each a :class:`~pg_safe_backup.snapshots.Snapshot` record).
TAKEN_XCOM = "snapshots"
DRIVERS = ("btrfs", "command")


def make_driver(
    driver: str, snapshot_command: str | None, mount_command: str | None, delete_command: str | None
) -> SnapshotDriver:
    """The driver named ``driver`` (``btrfs``, or ``command`` with its templates); ValueError naming the
    parameter that is wrong."""
    if driver not in DRIVERS:
        raise ValueError(f"driver must be one of {', '.join(DRIVERS)}, got {driver!r}")
    if driver == "btrfs" and (snapshot_command or mount_command or delete_command):
        raise ValueError("snapshot_command, mount_command and delete_command need driver='command'")
    if driver == "command" and (not snapshot_command or not delete_command):
        raise ValueError("driver='command' needs snapshot_command and delete_command")
    spec = {"driver": driver, "snapshot": snapshot_command, "delete": delete_command, "mount": mount_command}
    return driver_from(spec)


def snapshots_of(context: Context, task_id: str, key: str = TAKEN_XCOM) -> list[Snapshot]:
    """The snapshots ``task_id`` pushed under ``key`` at this task's map index (none: an empty list)."""
    pushed = same_map_index_xcom(context, task_id, key) or []
    return [Snapshot.from_dict(value) for value in pushed]


class PostgresSnapshotOperator(BaseOperator):
    """
    Snapshot the data directory and its tablespaces while backup mode is on (inside a
    ``PostgresOnlineBackup``, which places it: give the group ``snapshot={...}`` with these parameters).

    One snapshot per volume (a file system, or a btrfs subvolume) holding the data directory or a tablespace:
    the tablespaces' volumes first, the data directory's last (it holds ``global/pg_control``: a backup of a
    standby needs it copied last). Each is named after the backup attempt (``pgsb-<attempt>-<n>``) in
    ``snapshot_dir``, on the volume's file system. A folder that exists already is refused, naming it; a
    snapshot that fails deletes those taken before it and fails the task (the finish then fails the backup
    and ends backup mode: no label). Run it on a worker of the database host (``queue=``), as root or as a
    user the driver's commands allow (README, "Snapshot backups").

    :param data_directory: the live data directory (templated).
    :param snapshot_dir: the folder the snapshots are made in (templated); for btrfs, on the same file
        system as the subvolumes.
    :param driver: ``btrfs`` (built in) or ``command`` (the templates below:
        :mod:`pg_safe_backup.snapshots.command`).
    :param snapshot_command: with ``command``: snapshot ``{volume}`` so that it is readable at ``{snapshot}``.
    :param mount_command: with ``command``: make ``{snapshot}`` readable after backup mode ended (optional).
    :param delete_command: with ``command``: remove ``{snapshot}`` (nothing there is no error).
    :param gate_task_id: the group's gate, whose XCom names the backup attempt.
    """

    template_fields: Sequence[str] = ("data_directory", "snapshot_dir")
    ui_color = "#f8e8d0"

    def __init__(
        self,
        *,
        data_directory: str,
        snapshot_dir: str,
        driver: str = "btrfs",
        snapshot_command: str | None = None,
        mount_command: str | None = None,
        delete_command: str | None = None,
        gate_task_id: str,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("retries", 0)  # a snapshot taken twice in one backup mode is no better
        super().__init__(**kwargs)
        self.data_directory = unless_rendered_later(check_text, data_directory, "data_directory")
        self.snapshot_dir = unless_rendered_later(check_text, snapshot_dir, "snapshot_dir")
        self.driver = driver
        self.snapshot_command, self.mount_command, self.delete_command = (
            snapshot_command,
            mount_command,
            delete_command,
        )
        # A bad driver setting fails the DAG's parse, naming the parameter.
        make_driver(driver, snapshot_command, mount_command, delete_command)
        self.gate_task_id = check_text(gate_task_id, "gate_task_id")

    def make_driver(self) -> SnapshotDriver:
        return make_driver(self.driver, self.snapshot_command, self.mount_command, self.delete_command)

    def execute(self, context: Context) -> dict[str, Any]:
        data = Path(rendered(check_text, self.data_directory, "data_directory"))
        folder = Path(rendered(check_text, self.snapshot_dir, "snapshot_dir"))
        attempt = same_map_index_xcom(context, self.gate_task_id, "attempt")
        if not attempt:
            raise AirflowFailException(
                f"the gate {self.gate_task_id} named no backup attempt: nothing to snapshot"
            )
        if not (data / "PG_VERSION").is_file():
            raise AirflowFailException(
                f"data_directory {str(data)!r} is not a PostgreSQL data directory (no PG_VERSION): is this"
                " task on a worker of the database host (queue=)?"
            )
        if not folder.is_dir():
            raise AirflowFailException(f"snapshot_dir {str(folder)!r} is not a folder")
        driver = self.make_driver()
        began = time.monotonic()
        try:
            snapshots = planned(folder, attempt, plan_volumes(driver, data, tablespace_links(data)), driver)
            context["ti"].xcom_push(key=PLANNED_XCOM, value=[s.to_dict() for s in snapshots])
            taken = take_all(driver, snapshots, self.log.info)
        except PgSafeBackupError as err:
            raise task_error(err, f"snapshot not taken: {err}") from err
        seconds = time.monotonic() - began
        self.log.info("%d snapshots taken in %.2fs (backup mode can end now)", len(taken), seconds)
        context["ti"].xcom_push(key=TAKEN_XCOM, value=[s.to_dict() for s in taken])
        return {
            "snapshots": [s.path for s in taken],
            "attempt": attempt,
            "data_directory": str(data),
            "seconds": round(seconds, 3),
        }


class PostgresDeleteSnapshotsOperator(BaseOperator):
    """
    Remove the snapshots of this backup attempt (the group's teardown, after the copy-outs; also when
    anything failed). It removes what the snapshot step planned, taken or not (a step whose worker died
    half-way leaves no snapshot behind either); never another attempt's.

    With ``keep``, the snapshots of a backup that ended well (its finish handed over its label) stay as a
    restore point instead: catalogued in ``<snapshot_dir>/pgsb-<attempt>/`` (label files, backup_manifest,
    the snapshots' record; :func:`pg_safe_backup.store.catalog_kept_snapshot`), listed by
    ``pg-safe-backup list <snapshot_dir>``, restored by ``pg-safe-backup restore`` from the snapshots, removed
    by retention like any backup. Those of a backup that did not end well are removed.

    :param snapshot_task_id: the group's :class:`PostgresSnapshotOperator`.
    :param keep: keep the snapshots of a backup that ended well as a restore point.
    :param finish_task_id: the group's finish, whose XCom holds the backup's label (needed by ``keep``).
    """

    ui_color = "#f8e8d0"

    def __init__(
        self,
        *,
        snapshot_task_id: str,
        keep: bool = False,
        finish_task_id: str | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("trigger_rule", TriggerRule.ALL_DONE)
        super().__init__(**kwargs)
        self.snapshot_task_id = check_text(snapshot_task_id, "snapshot_task_id")
        self.keep = check_flag(keep, "keep")
        if self.keep and not finish_task_id:
            raise ValueError("keep=True needs finish_task_id: the finish whose label the kept snapshot gets")
        self.finish_task_id = finish_task_id
        #: The group's copy-outs (set by the group): their records spare the kept snapshot's manifest a read.
        self.copy_task_ids: list[str] = []

    def execute(self, context: Context) -> dict[str, Any]:
        snapshots = snapshots_of(context, self.snapshot_task_id, PLANNED_XCOM)
        if not snapshots:
            self.log.info("the snapshot step planned no snapshot: nothing to remove")
            return {"removed": []}
        if self.keep:
            kept = self._keep(context, snapshots)
            if kept is not None:
                return kept
        problems = delete_all(None, snapshots)
        if problems:
            raise AirflowFailException(f"could not remove {len(problems)} snapshots: {'; '.join(problems)}")
        self.log.info("removed %d snapshots: %s", len(snapshots), ", ".join(s.path for s in snapshots))
        return {"removed": [s.path for s in snapshots]}

    def _keep(self, context: Context, planned_snapshots: list[Snapshot]) -> dict[str, Any] | None:
        """Catalogue the snapshots of a backup that ended well; None (they are removed) otherwise."""
        assert self.finish_task_id
        backup, run = finished_backup(context, self.finish_task_id)
        taken = snapshots_of(context, self.snapshot_task_id)
        if not backup.get("backup_label") or len(taken) != len(planned_snapshots):
            self.log.warning("the backup did not end well: its snapshots are not kept")
            return None
        step = same_map_index_xcom(context, self.snapshot_task_id, "return_value")
        entry = Path(taken[0].path).parent / kept_name(step["attempt"])
        kept = KeptSnapshot(step["data_directory"], tuple(taken))
        try:
            written = catalog_kept_snapshot(
                entry, kept, backup, copied_records(context, self.copy_task_ids), run, self.log
            )
        except PgSafeBackupError as err:
            raise task_error(err, f"the snapshots were not kept: {err}") from err
        self.log.info("kept %d snapshots as the backup %s", len(taken), entry)
        return {"kept": str(entry), "snapshots": [s.path for s in taken], **written}


__all__ = [
    "PLANNED_XCOM",
    "TAKEN_XCOM",
    "PostgresDeleteSnapshotsOperator",
    "PostgresSnapshotOperator",
    "SnapshotError",
    "make_driver",
    "snapshots_of",
]
