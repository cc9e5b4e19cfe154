"""A cluster laid out as Debian/Ubuntu's postgresql-common lays it out (its configuration files in their own
folder, the server started with ``-c config_file=...``) is backed up with its configuration files, and the
start command ``pg-safe-backup restore`` prints starts the restored copy; a plain cluster's backup is as
before. Real clusters, the copy operator's own path (gate, copy, store), real files."""

from __future__ import annotations

import asyncio
import json
import shlex
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest

from airflow.sdk import DAG

from demo.load import wait_archived
from pg_safe_backup import cli
from pg_safe_backup.files.extconfig import (
    ConfigCaptureError,
    ServerConfig,
    capture_entries,
    files_to_capture,
    restore_config,
)
from pg_safe_backup.hooks.backup import PostgresBackupHook
from pg_safe_backup.local_cluster import LocalCluster, find_bindir, free_port, give_to_server_user
from pg_safe_backup.operators.backup import Copied, PostgresStoreBackupLabelOperator
from pg_safe_backup.operators.copy import FILES_XCOM, PostgresCopyDataDirectoryOperator
from pg_safe_backup.task_group import PostgresOnlineBackup
from pg_safe_backup.verify import verify_backup

from backup_helpers import finish, req, started
from conftest import CONN_ID, PASSWORD

#: Where a backup keeps the configuration files it captured (files/extconfig.py).
CAPTURED = "pg_safe_backup_config"
ROWS = 500


@dataclass
class TaskXCom:
    """What a task reaches through ``context["ti"]`` of one DAG run's XCom (the Task SDK asks Airflow's API
    server, which these tests do not run): values go through JSON, as XCom stores them."""

    task_id: str
    run: dict[tuple[str, str], Any] = field(default_factory=dict)
    map_index: int = -1

    def xcom_push(self, key: str, value: Any) -> None:
        self.run[(self.task_id, key)] = json.loads(json.dumps(value))

    def xcom_pull(self, task_ids: str, key: str, map_indexes: int) -> Any:
        assert map_indexes == self.map_index
        return self.run.get((task_ids, key))


@dataclass
class Backed:
    """The Debian-laid-out cluster, its WAL archive and configuration folder, and its backups taken through
    gate, copy operator and store: format -> folder."""

    cluster: LocalCluster
    archive: Path
    etc: Path
    backups: dict[str, Path]
    root: Path


def debian_layout(root: Path) -> tuple[LocalCluster, Path, Path]:
    """An archiving cluster in ``root``/data whose postgresql.conf, pg_hba.conf and pg_ident.conf live in
    ``root``/etc/15/main with a conf.d/ (work_mem = 7MB in it), as pg_createcluster leaves them; not
    started. Returns the cluster, its configuration file and its archive."""
    archive, etc = root / "archive", root / "etc" / "15" / "main"
    archive.mkdir(parents=True)
    cluster = LocalCluster(root / "data").init(
        password=PASSWORD, settings={"archive_mode": "on", "archive_command": f"'cp %p {archive}/%f'"}
    )
    (etc / "conf.d").mkdir(parents=True)
    for name in ("postgresql.conf", "pg_hba.conf", "pg_ident.conf"):
        shutil.move(cluster.datadir / name, etc / name)
    with open(etc / "postgresql.conf", "a") as f:
        f.write(
            f"data_directory = '{cluster.datadir}'\nhba_file = '{etc}/pg_hba.conf'\n"
            f"ident_file = '{etc}/pg_ident.conf'\nexternal_pid_file = '{root}/run/15-main.pid'\n"
            f"port = {cluster.port}\ninclude_dir = 'conf.d'\n"
        )
    (etc / "conf.d" / "tuning.conf").write_text("work_mem = '7MB'\n")
    (root / "run").mkdir()
    give_to_server_user(root)
    return cluster, etc / "postgresql.conf", archive


def backup_through_the_operators(cluster: LocalCluster, destination: Path, format: str) -> None:
    """One backup of ``cluster`` (the ``pg_test`` connection) as a PostgresOnlineBackup group with a
    PostgresCopyDataDirectoryOperator and a store task runs it: the holder and the gate's wait (the
    triggers' functions), the gate's and the copy's ``execute``, the finish, the store's ``store``.

    :param format: the copy's, plain or tar.
    """
    with DAG("debian", schedule=None):
        with PostgresOnlineBackup(group_id="backup", postgres_conn_id=CONN_ID) as group:
            copy = PostgresCopyDataDirectoryOperator(
                task_id="copy", source=str(cluster.datadir), destination=str(destination), format=format
            )
        store = PostgresStoreBackupLabelOperator(task_id="store", backup=group, destination=str(destination))
    run: dict[tuple[str, str], Any] = {}
    hook = PostgresBackupHook(CONN_ID)
    r = req(f"debian/manual_{format}/backup", wait_for_archive=True, poll_interval=0.5)

    async def backup() -> dict[str, Any]:
        holder, opened = await started(hook, r)
        group.gate.execute_complete({"ti": TaskXCom(group.gate.task_id, run)}, opened)
        await asyncio.to_thread(copy.execute, {"ti": TaskXCom(copy.task_id, run)})
        done = await finish(hook, r.attempt, opened["backup"]["start_lsn"])
        held = await asyncio.wait_for(holder, 60)
        assert held["status"] == done["status"] == "complete", (held, done)
        return done["backup"]

    finished = asyncio.run(backup())
    keys = ("backup_label", "tablespace_map", "system_identifier", "stop_lsn")
    store.store(
        str(destination),
        {key: finished[key] for key in keys},
        Copied.from_xcom([run[(copy.task_id, FILES_XCOM)]]),
    )


@pytest.fixture(scope="module")
def debian(module_tmp_root: Path) -> Iterator[Backed]:
    """The Debian-laid-out cluster, started as pg_ctlcluster starts it, ROWS rows, a plain and a tar
    backup."""
    cluster, config_file, archive = debian_layout(module_tmp_root / "debian")
    cluster.run(
        "pg_ctl",
        "-D",
        str(cluster.datadir),
        "-l",
        str(cluster.logfile),
        "-o",
        f"-c config_file={config_file}",
        "-w",
        "start",
    )
    env = pytest.MonkeyPatch()
    env.setenv(f"AIRFLOW_CONN_{CONN_ID.upper()}", cluster.airflow_conn_uri(password=PASSWORD))
    try:
        cluster.sql("CREATE TABLE t (n int)")
        cluster.sql("INSERT INTO t SELECT generate_series(1, %s)", [ROWS])
        backups = {fmt: module_tmp_root / "backups" / fmt for fmt in ("plain", "tar")}
        for fmt, folder in backups.items():
            backup_through_the_operators(cluster, folder, fmt)
        wait_archived(cluster)
        yield Backed(cluster, archive, config_file.parent, backups, module_tmp_root)
    finally:
        env.undo()
        cluster.stop("immediate")


def manifest_paths(backup: Path) -> set[str]:
    return {f["Path"] for f in json.loads((backup / "backup_manifest").read_text())["Files"]}


@pytest.mark.parametrize("fmt", ["plain", "tar"])
def test_the_manifest_lists_the_configuration_files_from_outside_the_data_directory(debian: Backed, fmt):
    etc = debian.etc
    listed = manifest_paths(debian.backups[fmt])
    assert f"{CAPTURED}/config_file{etc}/postgresql.conf" in listed
    assert f"{CAPTURED}/hba_file{etc}/pg_hba.conf" in listed
    assert f"{CAPTURED}/ident_file{etc}/pg_ident.conf" in listed
    assert f"{CAPTURED}/include{etc}/conf.d/tuning.conf" in listed


def test_pg_verifybackup_passes_the_plain_backup_with_its_configuration_files(debian: Backed):
    backup = debian.backups["plain"]
    assert (backup / CAPTURED / f"include_dir{debian.etc}" / "conf.d").is_dir()
    done = subprocess.run(
        [
            str(find_bindir(15) / "pg_verifybackup"),
            "-w",
            str(debian.archive),
            "-i",
            "backup_info.json",
            str(backup),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("fmt", ["plain", "tar"])
def test_the_printed_start_command_starts_the_restored_debian_cluster(debian: Backed, fmt, capsys):
    scratch = debian.root / f"restores_{fmt}"
    scratch.mkdir()
    give_to_server_user(scratch)
    target = scratch / "debian"
    args = [debian.backups[fmt], target, "--wal-archive", debian.archive, "--archive-mode", "off"]
    assert cli.main(["restore", *map(str, args)]) == 0
    said = capsys.readouterr().out
    assert f"configuration {debian.etc}/conf.d/tuning.conf restored to {target}/conf.d/tuning.conf" in said
    start = said.split("start it with:\n", 1)[1].strip()
    port = free_port()
    with open(target / "postgresql.auto.conf", "a") as f:
        f.write(f"port = {port}\n")  # the live server keeps its own
    with open(scratch / "start.log", "w") as log:
        started_it = subprocess.run(start, shell=True, stdout=log, stderr=subprocess.STDOUT, timeout=120)
    try:
        assert started_it.returncode == 0, (start, (scratch / "start.log").read_text()[-3000:])
        socket_dir = debian.root / "debian"  # the restored postgresql.conf's unix_socket_directories
        deadline = time.monotonic() + 120
        while True:
            try:
                with psycopg.connect(host=str(socket_dir), port=port, user="postgres", autocommit=True) as c:
                    if c.execute("SELECT pg_is_in_recovery()").fetchone() == (False,):
                        rows = c.execute("SELECT count(*) FROM t").fetchone()
                        work_mem = c.execute("SHOW work_mem").fetchone()
                        hba = c.execute("SHOW hba_file").fetchone()
                        pid_file = c.execute("SHOW external_pid_file").fetchone()
                        break
            except psycopg.OperationalError:
                pass
            assert time.monotonic() < deadline, (scratch / "start.log").read_text()[-3000:]
            time.sleep(0.2)
        assert rows == (ROWS,)
        assert work_mem == ("7MB",)
        assert hba == (str(target / "pg_hba.conf"),)
        assert pid_file == ("",)
        assert not (target / CAPTURED).exists()
    finally:
        subprocess.run(
            shlex.split(start.replace(" start", " -m immediate stop")), capture_output=True, timeout=60
        )


def test_the_restore_check_of_the_debian_backup_passes(debian: Backed):
    result = verify_backup(debian.backups["plain"], debian.archive)
    assert result.ok, result.summary()


def test_a_plain_cluster_captures_nothing(cluster: LocalCluster, hook: PostgresBackupHook, tmp_root: Path):
    async def gate_xcom() -> dict[str, Any]:
        holder, opened = await started(hook, req("plain/manual/backup", poll_interval=0.5))
        await finish(hook, "plain/manual/backup#try1", opened["backup"]["start_lsn"])
        await asyncio.wait_for(holder, 60)
        return opened["server_config_files"]

    server = asyncio.run(gate_xcom())
    assert server["config_file"] == str(cluster.datadir / "postgresql.conf")
    assert server["unreadable"] is None
    assert capture_entries(ServerConfig.from_dict(server), cluster.datadir) == []


def test_includes_are_found_as_the_server_reads_them_and_one_outside_is_named_by_the_restore(tmp_root):
    etc, shared, data = tmp_root / "etc" / "main", tmp_root / "shared", tmp_root / "data"
    for folder in (etc / "conf.d", shared, data):
        folder.mkdir(parents=True)
    (etc / "postgresql.conf").write_text(
        "include_dir = 'conf.d'   # as Debian's\n"
        "include 'extra.conf'\n"
        "include_if_exists = 'absent.conf'\n"
        f"include '{shared}/tuning.conf'\n"
        "#include 'commented.conf'\n"
    )
    (etc / "extra.conf").write_text("")  # no setting in it: pg_file_settings does not name it
    (etc / "conf.d" / ".hidden.conf").write_text("")  # the server reads neither
    (etc / "conf.d" / "notes.txt").write_text("")
    (shared / "tuning.conf").write_text("work_mem = '7MB'\n")
    server = ServerConfig(
        data_directory=str(data),
        config_file=str(etc / "postgresql.conf"),
        hba_file=str(data / "pg_hba.conf"),
        ident_file=str(data / "pg_ident.conf"),
        sources=tuple(str(f) for f in (etc / "postgresql.conf", shared / "tuning.conf", data / "x.conf")),
    )
    assert set(files_to_capture(server, data)) == {
        f"{CAPTURED}/config_file{etc}/postgresql.conf",
        f"{CAPTURED}/include_dir{etc}/conf.d",
        f"{CAPTURED}/include{etc}/extra.conf",
        f"{CAPTURED}/include{shared}/tuning.conf",
    }
    restored = tmp_root / "restored"  # what a copy engine makes of the entries
    for entry in capture_entries(server, data):
        if entry.is_dir:
            (restored / entry.path).mkdir(parents=True)
        else:
            shutil.copy2(entry.source, restored / entry.path)
    done = restore_config(restored, "/backups/b1")
    assert (restored / "conf.d").is_dir()
    assert (restored / "extra.conf").read_text() == ""
    assert (restored / "postgresql.conf").read_text().endswith("external_pid_file = ''\n")
    assert not (restored / CAPTURED).exists()
    (note,) = done.notes
    assert f"includes {shared}/tuning.conf, outside {etc}" in note
    assert f"{CAPTURED}/include{shared}/tuning.conf in /backups/b1" in note


def test_a_configuration_file_the_copy_cannot_read_is_named(tmp_root):
    server = ServerConfig(data_directory=str(tmp_root), config_file="/nonexistent/main/postgresql.conf")
    with pytest.raises(ConfigCaptureError, match="config_file /nonexistent/main/postgresql.conf"):
        capture_entries(server, tmp_root)


def test_a_role_that_may_not_read_the_settings_is_told_the_grant(cluster: LocalCluster, hook):
    cluster.sql("CREATE ROLE backup_role LOGIN PASSWORD 'x'")

    async def asked() -> ServerConfig:
        conninfo = {**cluster.conninfo(), "user": "backup_role", "password": "x"}
        async with await psycopg.AsyncConnection.connect(**conninfo, autocommit=True) as conn:
            return await hook.config_files(conn)

    refused = asyncio.run(asked())
    assert refused.config_file is None
    assert refused.unreadable == (
        'role "backup_role" may not read data_directory, config_file, hba_file, ident_file, pg_file_settings;'
        ' as a superuser run: GRANT pg_read_all_settings TO "backup_role";'
        ' GRANT SELECT ON pg_catalog.pg_file_settings TO "backup_role";'
        ' GRANT EXECUTE ON FUNCTION pg_catalog.pg_show_all_file_settings() TO "backup_role";'
    )
    cluster.sql("GRANT pg_read_all_settings TO backup_role")
    cluster.sql("GRANT SELECT ON pg_catalog.pg_file_settings TO backup_role")
    cluster.sql("GRANT EXECUTE ON FUNCTION pg_catalog.pg_show_all_file_settings() TO backup_role")
    granted = asyncio.run(asked())
    assert granted.config_file == str(cluster.datadir / "postgresql.conf")
    assert granted.unreadable is None
    assert str(cluster.datadir / "postgresql.conf") in granted.sources
