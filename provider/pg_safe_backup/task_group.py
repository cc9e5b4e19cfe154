"""PostgresOnlineBackup: the whole backup as one task group around the user's copy tasks."""

from __future__ import annotations

from collections.abc import Generator, Mapping
from typing import Any

from airflow.sdk import BaseOperator, TaskGroup, TriggerRule

from pg_safe_backup.operators.backup import (
    DEFAULT_LABEL,
    PostgresFinishBackupOperator,
    PostgresStartBackupOperator,
)
from pg_safe_backup.operators.copy import PostgresCopyDataDirectoryOperator
from pg_safe_backup.operators.incremental import PostgresBackupKindOperator, PostgresIncrementalBackupOperator
from pg_safe_backup.operators.snapshot import PostgresDeleteSnapshotsOperator, PostgresSnapshotOperator
from pg_safe_backup.sensors.backup import PostgresBackupStartedSensor
from pg_safe_backup.session import ONE_DAY_S
from pg_safe_backup.utils.mixins import INLINE_WAIT_S


class PostgresOnlineBackup(TaskGroup):
    """
    A task group that backs up one cluster around the copy tasks created inside it::

        with PostgresOnlineBackup(group_id="backup", postgres_conn_id="pg_main") as backup:
            copy = BashOperator(task_id="copy", bash_command="rsync -a --delete ...
            --exclude=/global/pg_control"
                                " $PGDATA/ $DEST/ && rsync -a $PGDATA/global/pg_control $DEST/global/")

    Inside the group: ``hold`` starts the backup and keeps its session (deferred all along),
    ``wait_for_backup_mode`` opens when backup mode is on and precedes the copy tasks, and
    ``finish_backup`` (teardown) ends the backup after them, even when a copy fails, and pushes
    backup_label via XCom. Pass the group to ``PostgresStoreBackupLabelOperator(backup=...)``.

    It is a ``TaskGroup``, wired when its ``with`` block ends: ``>>``, ``<<``, ``chain()``,
    ``cross_downstream()``, nesting in other groups and mapped groups work as for any group. Tasks
    upstream of it precede the hold and the gate; tasks downstream of it start after ``finish_backup``
    (not after the copies, as a group ending in a teardown would have it), so the label is in XCom.

    :param group_id: task group id. The group's FULL id (with its parent groups') is this backup's key
        within the DAG run; in a mapped task group each map index is a backup of its own.
    Templated (Jinja, params, XComArgs): ``postgres_conn_id``, ``state_conn_id``, ``database``,
    ``backup_timeout``, ``fast_checkpoint``, ``wait_for_archive`` and ``label``; each is checked as
    rendered when its task runs (see ``PostgresStartBackupOperator``).

    :param postgres_conn_id: Airflow connection of the server to back up (primary or hot standby).
    :param state_conn_id: where the backup table lives if not there (a standby's primary).
    :param backup_timeout: seconds after which an unfinished backup is failed (0 = none; default a day).
    :param fast_checkpoint: immediate start checkpoint instead of a spread one.
    :param wait_for_archive: complete only once the needed WAL is archived (a server whose WAL nothing
        archives is refused); False: the WAL is copied another way (see ``PostgresStartBackupOperator``).
    :param label: backup label.
    :param terminate_live: end another live backup instead of refusing to start.
    :param database, table, table_schema, poll_interval: see ``PostgresBackupBaseOperator``.
    :param gate_timeout: seconds the gate waits for backup mode (start checkpoint included).
    :param deferrable: gate and finish wait in the triggerer (the hold always does).
    :param inline_wait: seconds the gate and the finish wait in their worker slot before they defer (see
        ``PostgresBackupBaseOperator``); 0: defer at once.
    :param backup_mode_pool: the Airflow pool whose slots bound how many backups (of every group naming
        it) are in backup mode at once: the hold takes one slot from before ``pg_backup_start`` until the
        backup ended, so a cluster enters backup mode only when a slot is free, and its copy can run then.
        Create the pool with deferred tasks counted (``airflow pools set NAME K "backup mode"
        --include-deferred``; the REST API's ``include_deferred``): the hold waits deferred, and a pool
        that does not count deferred tasks bounds nothing. Give it as many slots as copies can run at
        once. None (default): no bound (every mapped group's holds start at once).
    :param snapshot: take the backup as file-system snapshots (README, "Snapshot backups"): the arguments of
        :class:`~pg_safe_backup.operators.snapshot.PostgresSnapshotOperator` (``data_directory``,
        ``snapshot_dir``, ``driver``, the command templates, ``queue``, ...) and ``keep`` (the
        snapshots of a backup that ended well stay, as a restore point). The group then snapshots between
        its gate and its finish, so backup mode lasts seconds; the copy tasks of its ``with`` block run
        after the finish and read the snapshots (a ``PostgresCopyDataDirectoryOperator`` does so by itself;
        another task reads XCom ``snapshots`` of ``snapshot``); ``remove_snapshots`` (a teardown) removes
        them at the end, also after a failure. Tasks downstream of the group start after the copies.
    :param incremental: full backups on some weekdays, incremental ones (PostgreSQL 17+) on the others
        (README, "Incremental backups"): ``{"full_on": "sunday", "root": "/backups/main"}`` and any other
        argument of :class:`~pg_safe_backup.operators.incremental.PostgresIncrementalBackupOperator`
        (``destination``, ``bindir``, ``incremental_label``, ``queue``, ``pool``, ...).
        ``choose_full_or_incremental`` (a branch, the group's first task) runs the hold and gate on a full
        day, and when no backup under ``root`` can be a parent; else ``incremental_backup``, which catalogues
        itself: the finish and the tasks after the group (the store) are skipped that day. ``root`` must be
        where the store puts the fulls.
    :param group_kwargs: further ``TaskGroup`` arguments (``prefix_group_id``, ``parent_group``, ``dag``,
        ``default_args``, ``tooltip``, ...).
    """

    def __init__(
        self,
        group_id: str = "backup",
        *,
        postgres_conn_id: str = "postgres_default",
        state_conn_id: str | None = None,
        database: str | None = None,
        table: str = "backup",
        table_schema: str = "public",
        backup_timeout: float = ONE_DAY_S,
        fast_checkpoint: bool = False,
        wait_for_archive: bool = True,
        label: str = DEFAULT_LABEL,
        terminate_live: bool = False,
        poll_interval: float = 5.0,
        gate_timeout: float = ONE_DAY_S,
        deferrable: bool | None = None,
        inline_wait: float = INLINE_WAIT_S,
        backup_mode_pool: str | None = None,
        snapshot: Mapping[str, Any] | None = None,
        incremental: Mapping[str, Any] | None = None,
        **group_kwargs: Any,
    ) -> None:
        super().__init__(group_id=group_id, **group_kwargs)
        # The group's own tasks are made here, in it (task_group=self), before the user's copy tasks.
        common = {
            "postgres_conn_id": postgres_conn_id,
            "state_conn_id": state_conn_id,
            "database": database,
            "table": table,
            "table_schema": table_schema,
            "backup_key": self.group_id,
            "poll_interval": poll_interval,
            "dag": self.dag,
            "task_group": self,
        }
        self.hold = PostgresStartBackupOperator(
            task_id="hold_backup_session",
            label=label,
            fast_checkpoint=fast_checkpoint,
            wait_for_archive=wait_for_archive,
            backup_timeout=backup_timeout,
            terminate_live=terminate_live,
            **({"pool": backup_mode_pool} if backup_mode_pool else {}),
            **common,
        )
        self.gate = PostgresBackupStartedSensor(
            task_id="wait_for_backup_mode",
            holder_task_id=self.hold.task_id,
            timeout=gate_timeout,
            deferrable=deferrable,
            inline_wait=inline_wait,
            **common,
        )
        self.finish = PostgresFinishBackupOperator(
            task_id="finish_backup",
            gate_task_id=self.gate.task_id,
            deferrable=deferrable,
            inline_wait=inline_wait,
            **common,
        )
        self.hold.finish_task_id = self.finish.task_id
        self.snapshot: PostgresSnapshotOperator | None = None
        self.remove_snapshots: PostgresDeleteSnapshotsOperator | None = None
        if snapshot is not None:
            if not isinstance(snapshot, Mapping):
                raise ValueError(
                    f"snapshot must be a dict of PostgresSnapshotOperator's arguments, got {snapshot!r}"
                )
            settings = dict(snapshot)
            keep = settings.pop("keep", False)
            self.hold.backup_mode = "snapshot"
            placement = {k: settings[k] for k in ("queue", "pool") if k in settings}
            self.snapshot = PostgresSnapshotOperator(
                task_id="snapshot",
                gate_task_id=self.gate.task_id,
                dag=self.dag,
                task_group=self,
                **settings,
            )
            self.remove_snapshots = PostgresDeleteSnapshotsOperator(
                task_id="remove_snapshots",
                snapshot_task_id=self.snapshot.task_id,
                keep=keep,
                finish_task_id=self.finish.task_id,
                dag=self.dag,
                task_group=self,
                **placement,
            )

        self.kind: PostgresBackupKindOperator | None = None
        self.incremental: PostgresIncrementalBackupOperator | None = None
        if incremental is not None:
            if not isinstance(incremental, Mapping) or not {"full_on", "root"} <= set(incremental):
                raise ValueError(
                    "incremental must be a dict with full_on and root (and other arguments of"
                    f" PostgresIncrementalBackupOperator), got {incremental!r}"
                )
            settings = dict(incremental)
            full_on = settings.pop("full_on")
            self.incremental = PostgresIncrementalBackupOperator(
                task_id="incremental_backup",
                postgres_conn_id=postgres_conn_id,
                dag=self.dag,
                task_group=self,
                **settings,
            )
            self.kind = PostgresBackupKindOperator(
                task_id="choose_full_or_incremental",
                full_on=full_on,
                root=settings["root"],
                full_task_ids=[self.hold.task_id, self.gate.task_id],
                incremental_task_id=self.incremental.task_id,
                postgres_conn_id=postgres_conn_id,
                dag=self.dag,
                task_group=self,
            )

    def __enter__(self) -> PostgresOnlineBackup:
        super().__enter__()
        return self

    def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> None:
        try:
            if exc_type is None:
                self._wire()
        finally:
            super().__exit__(exc_type, exc_value, traceback)

    def _own(self) -> set[str]:
        tasks = (
            self.hold,
            self.gate,
            self.finish,
            self.snapshot,
            self.remove_snapshots,
            self.kind,
            self.incremental,
        )
        return {task.node_id for task in tasks if task is not None}

    def _wire(self) -> None:
        """gate >> copy tasks >> finish; finish is the gate's teardown. With snapshots: gate >> snapshot >>
        finish >> copy tasks (copy-outs) >> remove_snapshots, a teardown of the snapshot step."""
        copies = [node for key, node in self.children.items() if key not in self._own()]
        if not copies and self.snapshot is None:
            raise ValueError(
                f"PostgresOnlineBackup {self.group_id!r} has no copy task inside its 'with' block"
            )
        if self.snapshot is not None:
            self._wire_snapshot(copies)
            copies = [self.snapshot]
        for node in copies:
            node.set_upstream(self.gate)
            node.set_downstream(self.finish)
        self.finish.as_teardown(setups=self.gate, on_failure_fail_dagrun=True)
        # Unlike the default teardown rule, end the backup even when the gate failed.
        self.finish.trigger_rule = TriggerRule.ALL_DONE
        if self.kind is not None:
            assert self.incremental is not None
            self.kind.set_downstream([self.hold, self.gate, self.incremental])

    def _wire_snapshot(self, copies: list[Any]) -> None:
        """The copy tasks read the snapshots after the finish; ``remove_snapshots`` follows them all."""
        assert self.snapshot is not None and self.remove_snapshots is not None
        for node in copies:
            node.set_upstream(self.finish)
            node.set_downstream(self.remove_snapshots)
            for task in node.iter_tasks() if isinstance(node, TaskGroup) else [node]:
                if isinstance(task, PostgresCopyDataDirectoryOperator):
                    task.snapshot_task_id = self.snapshot.task_id
                    self.remove_snapshots.copy_task_ids.append(task.task_id)
        self.remove_snapshots.set_upstream(self.finish)
        self.remove_snapshots.as_teardown(setups=self.snapshot)
        # Remove them whatever failed: a snapshot left behind holds the volume's space for ever.
        self.remove_snapshots.trigger_rule = TriggerRule.ALL_DONE

    def get_leaves(self) -> Generator[BaseOperator, None, None]:
        """
        What ``backup >> task`` (and ``chain``, ``cross_downstream``) makes ``task`` downstream of: the
        finish.

        TaskGroup's own rule passes over a teardown leaf to the tasks before it (the copies, and the hold),
        so a task after the group could start before the backup ended and its label was in XCom.
        """
        if self.snapshot is not None:  # the copy-outs: what follows the group reads their copy
            assert self.remove_snapshots is not None
            inside = {t.task_id for t in self.iter_tasks()} - {self.remove_snapshots.task_id}
            copies = [t for t in self.iter_tasks() if t.node_id not in self._own()]
            leaves = [t for t in copies if not set(t.downstream_task_ids) & inside]
            yield from leaves or [self.finish]
            return
        yield self.finish
