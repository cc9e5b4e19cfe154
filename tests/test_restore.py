"""``pg-safe-backup restore`` on real clusters with a real WAL archive: a point-in-time restore holds exactly
the rows committed before its target, the newest backup replays to the end of the archive, a tablespace
goes where ``--tablespace`` says, and what cannot be restored safely is refused.

One cluster, two catalogued backups with writes between them; each restore is started with pg_ctl and
checked with data.
"""

from __future__ import annotations

import gzip
import os
import pwd
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import fsspec.config
import pytest

from demo import s3 as moto
from demo.load import wait_archived
from pg_safe_backup.catalog import entry_path
from pg_safe_backup.cli import NO_VERDICT
from pg_safe_backup.files.crypt import EncryptionKey
from pg_safe_backup.files.pgcontrol import stop_lsn_from_manifest
from pg_safe_backup.files.tarball import write_tar_backup
from pg_safe_backup.files.wal import (
    WAL_SEGMENT,
    KeyNeeded,
    NotWal,
    archive_system_identifier,
    include_wal,
    segment_system_identifier,
)
from pg_safe_backup.files.walarchive import IDENTITY_FILE
from pg_safe_backup.hooks.backup import PostgresBackupHook
from pg_safe_backup.local_cluster import SERVER_USER, LocalCluster, give_to_server_user
from pg_safe_backup.restore import ArchiveKey, archive_restore_command
from pg_safe_backup.verify import PASS, check_backup

from backup_helpers import (
    TEST_KEY,
    catalogued_backup,
    cluster_with_space,
    managed_archive,
    recovered,
    reforge_backup,
    restore,
    run_backup,
    run_cli,
)
from conftest import CONN_ID
from pg_versions import verifier_for

ROOT_DIR = Path(__file__).resolve().parent.parent


@dataclass
class Backups:
    """Two backups of one cluster under ``root``, and the time ``between`` them (rows 1-200 committed
    before it; 201-400 after)."""

    cluster: LocalCluster
    archive: Path
    root: Path
    first: Path
    second: Path
    between: datetime
    tablespace_oid: str
    scratch: Path


def _rows(cluster: LocalCluster, first: int, last: int) -> None:
    """Rows ``first``..``last`` into ``t`` (default tablespace) and ``s`` (tablespace space1), committed."""
    cluster.sql("INSERT INTO t SELECT g FROM generate_series(%s::int, %s::int) g", [first, last])
    cluster.sql("INSERT INTO s SELECT g FROM generate_series(%s::int, %s::int) g", [first, last])


@pytest.fixture(scope="module")
def backups(module_tmp_root: Path) -> Iterator[Backups]:
    root = module_tmp_root / "backups"
    root.mkdir()
    with cluster_with_space(module_tmp_root) as (cluster, archive, location):
        cluster.sql(f"CREATE TABLESPACE space1 LOCATION '{location}'")
        cluster.sql("CREATE TABLE t (n int)")
        cluster.sql("CREATE TABLE s (n int) TABLESPACE space1")
        ((oid,),) = cluster.sql("SELECT oid::text FROM pg_tablespace WHERE spcname = 'space1'")
        _rows(cluster, 1, 100)
        catalogued_backup(cluster, root / "first", "nightly/run1/backup")
        _rows(cluster, 101, 200)
        time.sleep(1)
        between = datetime.now(timezone.utc)
        time.sleep(1)
        _rows(cluster, 201, 300)
        catalogued_backup(cluster, root / "second", "nightly/run2/backup")
        _rows(cluster, 301, 400)
        wait_archived(cluster)
        scratch = module_tmp_root / "restores"
        scratch.mkdir()
        give_to_server_user(scratch)  # the restored servers write their logs beside their data
        yield Backups(cluster, archive, root, root / "first", root / "second", between, oid, scratch)


def count_and_sum(server: LocalCluster, table: str) -> tuple[int, int]:
    ((count, total),) = server.sql(f"SELECT count(*), coalesce(sum(n), 0) FROM {table}")
    return count, total


def test_a_point_in_time_restore_holds_exactly_the_rows_committed_before_its_target(backups: Backups) -> None:
    target = backups.scratch / "pitr"
    when = backups.between.isoformat()
    done = restore(
        backups.root,
        target,
        "--latest-before",
        when,
        "--target-time",
        when,
        "--target-action",
        "promote",
        "--wal-archive",
        backups.archive,
        "--tablespace",
        f"{backups.tablespace_oid}={backups.scratch / 'pitr_space'}",
        "--archive-mode",
        "off",
    )
    assert done.returncode == 0, done.stderr
    assert f"picked {backups.first} " in done.stdout, "--latest-before picks the backup before the target"
    assert f"pg_ctl -D {target} start" in done.stdout, "it says how to start the server"
    assert " MB of " in done.stdout, "it reports the copy's progress"
    with recovered(target) as server:
        assert count_and_sum(server, "t") == (200, sum(range(1, 201)))
        assert count_and_sum(server, "s") == (200, sum(range(1, 201)))


def restored_to_the_end(backups: Backups, stored: Path, name: str) -> tuple[Path, Path]:
    """``stored`` restored (to the end of the archive) into ``scratch/<name>``, its tablespace remapped to
    ``scratch/<name>_space``: the two folders."""
    target, space = backups.scratch / name, backups.scratch / f"{name}_space"
    done = restore(
        stored,
        target,
        "--wal-archive",
        backups.archive,
        "--tablespace",
        f"{backups.tablespace_oid}={space}",
        "--archive-mode",
        "off",
    )
    assert done.returncode == 0, done.stderr
    return target, space


def assert_every_row(server: LocalCluster) -> None:
    """All 400 rows of both tables, as the cluster holds them at the end of the archive."""
    assert count_and_sum(server, "t") == (400, sum(range(1, 401)))
    assert count_and_sum(server, "s") == (400, sum(range(1, 401)))


def test_the_newest_backup_replays_to_the_end_of_the_archive_with_its_tablespace_remapped(
    backups: Backups,
) -> None:
    target, space = restored_to_the_end(backups, backups.second, "newest")
    assert (target / "pg_tblspc" / backups.tablespace_oid).readlink() == space
    assert (target / "recovery.signal").is_file()
    assert not (target / "backup_info.json").exists(), "the catalog's sidecar stays with the backup"
    assert (target.stat().st_mode & 0o777) == 0o700
    assert target.stat().st_uid == space.stat().st_uid == pwd.getpwnam(SERVER_USER).pw_uid
    with recovered(target) as server:
        assert_every_row(server)
        (location,) = server.sql("SELECT pg_tablespace_location(%s::oid)", [backups.tablespace_oid])[0]
        assert location == str(space)


def tree(folder: Path, unlike: set[str] = frozenset()) -> dict[str, str]:
    """Every entry under ``folder``: a file by its SHA-256 (by its name alone in ``unlike``: those hold the
    restore's own paths), a folder as "dir", a link as where it points."""
    import hashlib

    found = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        if path.is_symlink():
            found[rel] = "link"
        elif path.is_dir():
            found[rel] = "dir"
        else:
            found[rel] = "file" if rel in unlike else hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def test_a_delta_restore_after_writes_and_a_dropped_table_equals_a_full_restore(backups: Backups) -> None:
    """--delta rewrites a stopped data directory of the cluster (a failed primary, a standby to rebuild):
    the same tree as a restore into an empty folder, every row back, refused on a running server and on
    another cluster's directory."""

    def delta_into(target: Path, space: Path) -> list[str | Path]:
        tablespace = f"{backups.tablespace_oid}={space}"
        return [
            backups.second,
            target,
            "--delta",
            "--wal-archive",
            backups.archive,
            "--tablespace",
            tablespace,
        ]

    full, full_space = restored_to_the_end(backups, backups.second, "delta_full")
    target, space = restored_to_the_end(backups, backups.second, "delta_target")
    with recovered(target) as server:  # it goes its own way: writes, a table dropped, one created
        server.sql("INSERT INTO s SELECT g FROM generate_series(1000, 50000) g")
        server.sql("DROP TABLE t")
        server.sql("CREATE TABLE newer AS SELECT g FROM generate_series(1, 1000) g")
        server.sql("CHECKPOINT")
        running = refused(*delta_into(target, space))
        assert "postmaster.pid exists: a server may run on the target" in running, running
    done = restore(*delta_into(target, space), "--archive-mode", "off")
    assert done.returncode == 0, done.stderr
    counts = re.search(r"--delta: (\d+) files kept as they were, (\d+) removed", done.stdout)
    assert counts, done.stdout
    kept, removed = map(int, counts.groups())
    assert kept > 100 and removed > 0, done.stdout
    unlike = {"postgresql.conf", "postgresql.auto.conf", "tablespace_map"}
    assert tree(target, unlike) == tree(full, unlike), "the delta's tree is the full restore's"
    assert tree(space) == tree(full_space)
    assert (target / "pg_tblspc" / backups.tablespace_oid).readlink() == space
    with recovered(target) as server:
        assert_every_row(server)
        assert server.sql("SELECT to_regclass('newer') IS NULL") == [(True,)]

    # A place that holds something and is not the target's own tablespace may be a live one.
    error = refused(*delta_into(target, full_space))
    assert (
        f"tablespace {backups.tablespace_oid} would be restored to {full_space}, which is not empty" in error
    )
    other = LocalCluster(backups.scratch / "delta_other").init(fresh=True)
    error = refused(backups.second, other.datadir, "--delta", "--wal-archive", backups.archive)
    assert f"--delta: the target {other.datadir} is of the cluster with system identifier" in error, error
    assert not (other.datadir / "pg_safe_backup_delta_restore").exists(), "refused before any change"


def refused(*args: str | Path) -> str:
    """The one-line error of a restore that must fail."""
    done = restore(*args)
    assert done.returncode == 1, done.stdout
    return done.stderr.strip()


def test_a_target_dir_that_is_not_empty_is_refused(backups: Backups) -> None:
    target = backups.scratch / "busy"
    target.mkdir()
    (target / "something").write_text("")
    error = refused(backups.second, target, "--wal-archive", backups.archive)
    assert "TARGET_DIR" in error
    assert sorted(p.name for p in target.iterdir()) == ["something"], "nothing was written into it"


def test_a_backup_without_backup_label_is_refused(backups: Backups) -> None:
    fake = backups.scratch / "no_label"
    (fake / "global").mkdir(parents=True)
    (fake / "PG_VERSION").write_text("15\n")
    (fake / "global" / "pg_control").write_bytes(b"")
    error = refused(fake, backups.scratch / "never1", "--wal-archive", backups.archive)
    assert "no backup_label" in error


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (
            lambda b: ["--target-time", b.between.isoformat(), "--target-lsn", "0/0"],
            "--target-time and --target-lsn",
        ),
        (lambda b: ["--target-time", (b.between - timedelta(seconds=1)).isoformat()], "use --latest-before"),
        (lambda b: [], "--tablespace {oid}=DIR"),
    ],
    ids=["two recovery targets at once", "a target time before the backup ended", "the live tablespace"],
)
def test_a_restore_that_cannot_be_done_safely_is_refused_naming_the_flag(
    backups: Backups, flags: Callable[[Backups], list[str]], named: str, request: pytest.FixtureRequest
) -> None:
    target = backups.scratch / f"never_{request.node.callspec.id.replace(' ', '_')}"
    error = refused(backups.second, target, "--wal-archive", backups.archive, *flags(backups))
    assert named.format(oid=backups.tablespace_oid) in error
    assert not target.exists(), "nothing was written"


def test_a_missing_wal_archive_is_refused(backups: Backups) -> None:
    error = refused(backups.second, backups.scratch / "never5", "--wal-archive", backups.scratch / "nowhere")
    assert "--wal-archive" in error


@pytest.fixture(scope="module")
def tar_backup(backups: Backups) -> Path:
    """A tar-format backup (zstd, no manifest) of the module's cluster, its WAL archived."""
    stored = backups.scratch / "tar"
    backup = run_backup(
        PostgresBackupHook(CONN_ID),
        "nightly/run3/tar",
        lambda: write_tar_backup(backups.cluster.datadir, stored, compression="zstd"),
    )
    (stored / "backup_label").write_text(backup["backup_label"])
    (stored / "tablespace_map").write_text(backup["tablespace_map"])
    wait_archived(backups.cluster)
    return stored


def test_a_tar_backup_with_zstd_restores_its_base_and_tablespace_archives(
    backups: Backups, tar_backup: Path
) -> None:
    target, _ = restored_to_the_end(backups, tar_backup, "from_tar")
    with recovered(target) as server:
        assert_every_row(server)


def test_a_target_dir_inside_the_backup_is_refused(backups: Backups) -> None:
    error = refused(
        backups.second,
        backups.second / "restored",
        "--wal-archive",
        backups.archive,
        "--tablespace",
        f"{backups.tablespace_oid}={backups.scratch / 'never6_space'}",
    )
    assert "overlaps BACKUP" in error
    assert not (backups.second / "restored").exists()


def test_latest_before_refuses_a_root_holding_two_clusters_backups(backups: Backups, tmp_path: Path) -> None:
    """--latest-before picks "the newest" of one cluster only: never another cluster's backup."""
    root = tmp_path / "two_clusters"
    for name in ("a", "b"):
        shutil.copytree(backups.first, root / name, symlinks=True)
        shutil.copy2(entry_path(backups.first), entry_path(root / name))
    reforge_backup(root / "b", system_identifier=7000000000000000001)  # its pg_control and manifest say so
    target = tmp_path / "target"
    done = restore(root, target, "--latest-before", "2100-01-01T00:00:00", "--wal-archive", backups.archive)
    assert done.returncode != 0 and "holds backups of 2 clusters" in done.stderr, done.stdout + done.stderr
    assert not target.exists()


def test_the_drill_refuses_before_restoring_anything(backups: Backups, tmp_path: Path) -> None:
    """The drill's refusals, before any restore: no backup, two clusters' backups, a newest backup too old."""
    from airflow.providers.common.compat.sdk import AirflowFailException

    from pg_safe_backup.operators.lifecycle import PostgresRestoreDrillOperator

    def drill(root: Path, **kwargs: object) -> str:
        op = PostgresRestoreDrillOperator(task_id="drill", root=str(root), **kwargs)
        with pytest.raises(AirflowFailException) as failed:
            op.execute({})  # each refusal comes before the task instance is needed
        return str(failed.value)

    (tmp_path / "empty").mkdir()
    assert "holds no backup that proves itself" in drill(tmp_path / "empty")
    root = tmp_path / "two_clusters"
    for name in ("a", "b"):
        shutil.copytree(backups.first, root / name, symlinks=True)
    reforge_backup(root / "b", system_identifier=7000000000000000001)
    assert "holds backups of 2 clusters" in drill(root)
    old = tmp_path / "old"
    shutil.copytree(backups.first, old / "a", symlinks=True)
    label = (old / "a" / "backup_label").read_text()
    started = (datetime.now(timezone.utc) - timedelta(days=3)).strftime("%Y-%m-%d %H:%M:%S UTC")
    label = re.sub(r"START TIME: .*", f"START TIME: {started}", label)
    reforge_backup(old / "a", label=label)  # the age is the label's, not a clock in the JSON
    refused = drill(old)
    assert " is 3 days, 0:00:0" in refused and "old, older than max_age 1 day, 6:00:00" in refused, refused


def test_a_drill_that_could_not_run_is_retried_and_records_nothing(backups: Backups, tmp_path: Path) -> None:
    """A missing WAL archive is no verdict on the backup: a plain AirflowException (retried), and its
    catalog entry gains no check."""
    from airflow.providers.common.compat.sdk import AirflowException, AirflowFailException

    from pg_safe_backup.catalog import read_info
    from pg_safe_backup.operators.lifecycle import PostgresRestoreDrillOperator

    root = tmp_path / "root"
    shutil.copytree(backups.first, root / "a", symlinks=True)
    shutil.copy2(entry_path(backups.first), entry_path(root / "a"))
    before = read_info(root / "a").verifications
    op = PostgresRestoreDrillOperator(
        task_id="drill", root=str(root), wal_archive=str(tmp_path / "no_archive")
    )
    with pytest.raises(AirflowException) as failed:
        op.execute({})
    assert not isinstance(failed.value, AirflowFailException), failed.value
    assert "could not run" in str(failed.value) and "no_archive" in str(failed.value), failed.value
    assert read_info(root / "a").verifications == before


# ------------------------------------------------------------------- a test restore never costs a row
def restore_newest(backups: Backups, target: Path, space: Path, *flags: str) -> subprocess.CompletedProcess:
    """``pg-safe-backup restore`` of the newest backup into ``target`` from the module's archive, its
    tablespace into ``space``, with ``flags``."""
    tablespace = f"{backups.tablespace_oid}={space}"
    return restore(
        backups.second, target, "--wal-archive", backups.archive, "--tablespace", tablespace, *flags
    )


def _day2_rows(server: LocalCluster) -> tuple[int, int, int]:
    """Rows, sum and largest value of ``day2``."""
    ((count, total, top),) = server.sql("SELECT count(*), coalesce(sum(n), 0), coalesce(max(n), 0) FROM day2")
    return count, total, top


def test_a_test_restore_never_writes_into_the_archive_so_a_later_restore_has_every_row(
    backups: Backups,
) -> None:
    """The README's point-in-time example, started, promoted and written into, then more commits on the
    source: a restore to the end of the archive holds every row the source committed (none of the copy's)."""
    source = backups.cluster
    source.sql("CREATE TABLE day2 (n int)")
    source.sql("INSERT INTO day2 SELECT g FROM generate_series(1, 100) g")
    ((when,),) = source.sql("SELECT clock_timestamp()")  # after rows 1-100 committed, before 101-200
    source.sql("INSERT INTO day2 SELECT g FROM generate_series(101, 200) g")
    wait_archived(source)
    target = backups.scratch / "tested"
    done = restore_newest(
        backups,
        target,
        backups.scratch / "tested_space",
        "--target-time",
        when.isoformat(),
        "--target-action",
        "promote",
    )
    assert done.returncode == 0, done.stderr
    with recovered(target) as copy:
        assert _day2_rows(copy) == (100, sum(range(1, 101)), 100)
        assert_every_row(copy)
        copy.sql("INSERT INTO day2 VALUES (100001)")
        archive_mode = copy.sql("SHOW archive_mode")
        copy.sql("SELECT pg_switch_wal()")
        copy.stop("fast")  # a fast shutdown archives what is ready: the copy's WAL, if it archived
    source.sql("INSERT INTO day2 SELECT g FROM generate_series(201, 300) g")
    wait_archived(source)
    again, _ = restored_to_the_end(backups, backups.second, "after_tested")
    with recovered(again) as server:
        assert _day2_rows(server) == (300, sum(range(1, 301)), 300)
        assert_every_row(server)
    assert archive_mode == [("off",)]
    assert "archiving is off" in done.stdout, done.stdout
    assert not any(p.name.startswith("00000002") for p in backups.archive.iterdir()), "the copy's timeline"


@pytest.mark.parametrize("timeline", ["0", "-1", "two", "latest,current"])
def test_a_bad_target_timeline_is_refused_naming_the_flag(backups: Backups, timeline: str) -> None:
    target = backups.scratch / "never_timeline"
    error = refused(backups.second, target, "--wal-archive", backups.archive, "--target-timeline", timeline)
    assert "--target-timeline" in error and len(error.splitlines()) == 1, error
    assert not target.exists()


def test_archive_mode_on_and_a_target_timeline_are_written_as_asked(backups: Backups) -> None:
    """For a real replacement: archiving as the backed up server did (not started here: it would archive
    into the module's archive)."""
    target = backups.scratch / "replacement"
    space = backups.scratch / "replacement_space"
    done = restore_newest(backups, target, space, "--archive-mode", "on", "--target-timeline", "current")
    assert done.returncode == 0, done.stderr
    assert "archiving is on (--archive-mode on)" in done.stdout, done.stdout
    ours = (target / "postgresql.auto.conf").read_text().split("# pg_safe_backup.restore")[-1]
    assert "archive_mode = on\n" in ours and "archive_command" not in ours, ours
    assert "recovery_target_timeline = 'current'\n" in ours, ours


# ---------------------------------------------------------------------- restore refuses before copying
def _system_identifier(cluster: LocalCluster) -> int:
    return int(cluster.sql("SELECT system_identifier::text FROM pg_control_system()")[0][0])


def test_an_archive_is_known_by_the_system_identifier_of_its_oldest_segment(
    backups: Backups, other_archive: Path, tmp_path: Path
) -> None:
    ours = _system_identifier(backups.cluster)
    found = archive_system_identifier(backups.archive)
    assert found is not None
    assert found[0] == ours
    assert found[1] == min(p.name for p in backups.archive.iterdir() if WAL_SEGMENT.match(p.name))
    packed = tmp_path / f"{found[1]}.gz"
    with open(backups.archive / found[1], "rb") as raw, gzip.open(packed, "wb") as out:
        shutil.copyfileobj(raw, out)
    assert segment_system_identifier(packed) == ours
    theirs = archive_system_identifier(other_archive)
    assert theirs is not None and theirs[0] != ours
    (tmp_path / "empty").mkdir()
    assert archive_system_identifier(tmp_path / "empty") is None
    (tmp_path / "000000010000000000000001").write_bytes(b"\0" * 100)
    with pytest.raises(NotWal, match="000000010000000000000001"):
        segment_system_identifier(tmp_path / "000000010000000000000001")


def test_another_clusters_archive_is_refused_before_copying(backups: Backups, other_archive: Path) -> None:
    target = backups.scratch / "never_other_archive"
    done = restore(
        backups.second,
        target,
        "--wal-archive",
        other_archive,
        "--tablespace",
        f"{backups.tablespace_oid}={backups.scratch / 'never_other_archive_space'}",
    )
    assert done.returncode != 0, done.stdout
    error = done.stderr.strip()
    assert len(error.splitlines()) == 1 and "another cluster" in error, error
    assert str(_system_identifier(backups.cluster)) in error, "it names the backup's system identifier"
    assert not target.exists()
    assert not (backups.scratch / "never_other_archive_space").exists()


def test_another_clusters_archive_is_refused_for_a_tar_backup_once_extracted(
    backups: Backups, tar_backup: Path, other_archive: Path
) -> None:
    """A tar backup without a version 2 manifest tells its cluster only in the pg_control it holds."""
    target, space = backups.scratch / "never_tar_other", backups.scratch / "never_tar_other_space"
    error = refused(
        tar_backup,
        target,
        "--wal-archive",
        other_archive,
        "--tablespace",
        f"{backups.tablespace_oid}={space}",
    )
    assert "another cluster" in error and str(target / "global" / "pg_control") in error, error
    assert not target.exists() and not space.exists(), "the extracted copy is taken back"


@pytest.mark.parametrize("where", ["TARGET_DIR", "--tablespace"])
def test_a_place_the_owner_cannot_reach_is_refused_before_copying(backups: Backups, where: str) -> None:
    closed = backups.scratch / f"closed_{where.strip('-')}"
    closed.mkdir(mode=0o700)
    os.chmod(closed, 0o700)  # root's, closed to the server's OS user
    untouched = closed.stat().st_mtime_ns
    target, space = backups.scratch / f"never_reach_{where.strip('-')}", backups.scratch / f"reach_{where}"
    if where == "TARGET_DIR":
        target = closed / "restored"
    else:
        space = closed / "space"
    done = restore_newest(backups, target, space)
    assert done.returncode == 1, done.stdout
    error = done.stderr.strip()
    assert closed.stat().st_mtime_ns == untouched, "nothing was made in it, even for a moment"
    assert not target.exists() and not space.exists()
    assert len(error.splitlines()) == 1 and where in error and f"cannot enter {closed}" in error, error


@pytest.fixture
def tiny_file_system(backups: Backups) -> Iterator[Path]:
    """A 1 MB tmpfs mounted under the scratch folder."""
    place = backups.scratch / "tiny"
    place.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(place)], check=True)
    try:
        yield place
    finally:
        subprocess.run(["umount", str(place)], check=True)


def test_a_target_without_room_for_the_backup_is_refused_with_both_numbers(
    backups: Backups, tiny_file_system: Path
) -> None:
    target = tiny_file_system / "restored"
    error = refused(
        backups.second,
        target,
        "--wal-archive",
        backups.archive,
        "--tablespace",
        f"{backups.tablespace_oid}={backups.scratch / 'never_room_space'}",
    )
    free = shutil.disk_usage(tiny_file_system).free
    needs = re.search(r"needs (\d+) bytes", error)
    assert needs and int(needs.group(1)) > free, error
    assert f"{free} bytes free" in error and "TARGET_DIR" in error, error
    assert not target.exists() and not (backups.scratch / "never_room_space").exists()


# ------------------------------------------------------------------- an archive wal-push manages
def files_of(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` with its size and mtime: to prove nothing was written there."""
    return {str(p): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def managed(backups: Backups) -> Path:
    """The module's archive as wal-push stores it: zstd, gzip and plain in turn, each file encrypted."""
    wait_archived(backups.cluster)
    major = backups.cluster.server_version() // 10000
    into = backups.scratch / "managed_archive"
    return managed_archive(backups.archive, into, major, TEST_KEY, ("zstd", "gzip", "none"))


def key_file(folder: Path, key: EncryptionKey, name: str = "wal.key") -> Path:
    """``key`` in a file of ``folder`` only the server's OS user reads (as wal-fetch, run by the server)."""
    path = folder / name
    path.write_text(key.material.hex() + "\n")
    give_to_server_user(path)
    os.chmod(path, 0o600)
    return path


def verifier(backups: Backups) -> tuple[Path, bool]:
    """The pg_verifybackup that reads this major's manifest (:func:`verifier_for`: the npm packages of 13, 14,
    16 and 17 hold no client programs) and whether it is of the same major (only then it parses the WAL)."""
    found = verifier_for(backups.cluster.server_version() // 10000)
    assert found is not None, "no pg_verifybackup reads this major's manifest"
    return found


def test_the_restore_command_is_wal_fetch_only_for_an_archive_wal_push_manages(tmp_path: Path) -> None:
    plain, ours = tmp_path / "plain 100%", tmp_path / "ours 100%"
    plain.mkdir()
    ours.mkdir()
    (ours / IDENTITY_FILE).write_text("{}")
    key = ArchiveKey(TEST_KEY, "--encryption-key-env", "PGSB_KEY")

    assert archive_restore_command(plain).startswith("cp "), "cp's archive is read with cp"
    fetch = archive_restore_command(ours, key)

    assert fetch.startswith(f"{sys.executable} -m pg_safe_backup wal-fetch --archive "), fetch
    assert fetch.endswith(' --encryption-key-env PGSB_KEY %f "%p"'), fetch
    assert "'" + str(ours).replace("%", "%%") + "'" in fetch, "the path quoted, its % doubled"


def test_a_backup_restores_through_wal_fetch_from_an_encrypted_managed_archive_with_every_row(
    backups: Backups, managed: Path
) -> None:
    target, space = backups.scratch / "managed", backups.scratch / "managed_space"
    before = files_of(managed)
    key = key_file(backups.scratch, TEST_KEY)

    done = restore(
        backups.second,
        target,
        "--wal-archive",
        managed,
        "--encryption-key-file",
        key,
        "--tablespace",
        f"{backups.tablespace_oid}={space}",
    )

    assert done.returncode == 0, done.stderr
    ours = (target / "postgresql.auto.conf").read_text().split("# pg_safe_backup.restore")[-1]
    assert f"wal-fetch --archive {managed} --encryption-key-file {key} %f" in ours, ours
    assert TEST_KEY.material.hex() not in ours, "the key itself is never written into the configuration"
    with recovered(target) as server:
        assert_every_row(server)
        log = server.log_text()
    assert re.search(r'restored log file "[0-9A-F]{24}" from archive', log), log[-2000:]
    assert files_of(managed) == before, "nothing was written into the archive"


def test_an_encrypted_archive_is_refused_without_its_key_or_with_another(
    backups: Backups, managed: Path
) -> None:
    target = backups.scratch / "never_managed"
    args = (backups.second, target, "--wal-archive", managed)
    other = key_file(backups.scratch, EncryptionKey(bytes(32)), "other.key")

    without = refused(*args)
    wrong = refused(*args, "--encryption-key-file", other)
    unreadable = key_file(backups.scratch, TEST_KEY, "root_only.key")
    os.chown(unreadable, 0, 0)
    closed = refused(*args, "--encryption-key-file", unreadable)

    assert "is encrypted" in without and "--encryption-key-file" in without, without
    assert f"not with the key given ({EncryptionKey(bytes(32)).key_id})" in wrong, wrong
    assert f"--encryption-key-file {unreadable} is not readable by the {SERVER_USER}" in closed, closed
    assert all(len(error.splitlines()) == 1 for error in (without, wrong, closed))
    assert not target.exists(), "refused before copying"


def test_a_self_contained_copy_takes_its_wal_from_an_encrypted_managed_archive(
    backups: Backups, managed: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(backups.second, copy, symlinks=True)
    label = (copy / "backup_label").read_text()
    stop = stop_lsn_from_manifest((copy / "backup_manifest").read_text())
    before = files_of(managed)

    with pytest.raises(KeyNeeded, match="is encrypted"):
        include_wal(copy, managed, backup_label=label, stop_lsn=stop)
    nothing = sorted((copy / "pg_wal").glob("0*"))
    copied = include_wal(copy, managed, backup_label=label, stop_lsn=stop, key=TEST_KEY)

    assert nothing == [], "nothing is copied without the key"
    assert copied, "the backup needs at least its first segment"
    for name in copied:
        assert (copy / "pg_wal" / name).read_bytes() == (backups.archive / name).read_bytes(), name
    assert files_of(managed) == before


def test_the_checks_read_a_managed_archive_with_its_key_and_never_write_into_it(
    backups: Backups, managed: Path
) -> None:
    before = files_of(managed)
    give_to_server_user(backups.second)

    report = check_backup(
        backups.second,
        managed,
        archive_key=TEST_KEY,
        work_dir=backups.scratch,
        keep=True,
        verifier_bindir=verifier(backups)[0],
    )

    assert report.ok, report.summary()
    assert report.step("pg_verifybackup").status == PASS, report.summary()
    assert report.step("restore check").details["wal_files_restored"] >= 1, report.summary()
    kept = Path(report.step("restore check").details["kept_work_dir"])
    conf = (kept / "data" / "postgresql.auto.conf").read_text()
    assert f"wal-fetch --archive {managed} --encryption-key-file {kept}/" in conf, conf
    assert not [p for p in kept.iterdir() if p.name.endswith(".key")], "the key left the kept work dir"
    assert files_of(managed) == before, "the restore check never writes into the archive"


def test_verify_reads_an_encrypted_archive_only_with_the_key_flag(backups: Backups, managed: Path) -> None:
    key = key_file(backups.scratch, TEST_KEY, "verify.key")
    args = ("verify", backups.second, managed, "--no-restore", "--verifier-bindir", verifier(backups)[0])

    without = run_cli(*args, timeout=120)
    done = run_cli(*args, "--encryption-key-file", key, timeout=120)

    assert without.returncode == NO_VERDICT, without.stdout + without.stderr
    error = without.stderr.strip().splitlines()[-1]
    assert "is encrypted" in error and "--encryption-key-file" in error, without.stderr
    assert done.returncode == 0, done.stdout + done.stderr
    assert "pg_verifybackup: PASS" in done.stdout, done.stdout


def test_a_backup_restores_through_wal_fetch_from_an_encrypted_archive_in_s3(
    backups: Backups, managed: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The archive in an object store: restore, and the checks (pg_verifybackup parses its WAL, the restore
    check recovers through wal-fetch), with the key from an environment variable; refused without it."""
    target, space = backups.scratch / "from_s3", backups.scratch / "from_s3_space"
    with moto.local_s3("pgsb-wal") as s3:
        fs = s3.filesystem()
        for stored in managed.iterdir():
            fs.pipe_file(f"{s3.bucket}/wal/{stored.name}", stored.read_bytes())
        # How wal-fetch, run by the restored server, finds the store: the AWS tools' and fsspec's variables.
        for name, value in {
            "AWS_ACCESS_KEY_ID": moto.KEY,
            "AWS_SECRET_ACCESS_KEY": moto.SECRET,
            "AWS_DEFAULT_REGION": moto.REGION,
            "FSSPEC_S3_ENDPOINT_URL": s3.endpoint_url,
        }.items():
            monkeypatch.setenv(name, value)
        monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": s3.endpoint_url})  # read at import
        url = f"s3://{s3.bucket}/wal"
        tablespace = f"{backups.tablespace_oid}={space}"
        without = refused(backups.second, target, "--wal-archive", url, "--tablespace", tablespace)
        monkeypatch.setenv("PGSB_TEST_KEY", TEST_KEY.material.hex())

        done = restore(
            *(backups.second, target, "--wal-archive", url, "--encryption-key-env", "PGSB_TEST_KEY"),
            *("--tablespace", tablespace),
        )

        assert "is encrypted" in without and "--encryption-key-env" in without, without
        assert done.returncode == 0, done.stderr
        assert "reads the key from $PGSB_TEST_KEY" in done.stdout, done.stdout
        ours = (target / "postgresql.auto.conf").read_text().split("# pg_safe_backup.restore")[-1]
        assert f"wal-fetch --archive {url} --encryption-key-env PGSB_TEST_KEY %f" in ours, ours
        with recovered(target) as server:
            assert_every_row(server)
        give_to_server_user(backups.second)
        bindir, same_major = verifier(backups)
        report = check_backup(
            backups.second, url, archive_key=TEST_KEY, work_dir=backups.scratch, verifier_bindir=bindir
        )
        assert report.ok, report.summary()
        # The WAL fetched from the store is parsed by a pg_verifybackup of the backup's own major only.
        assert report.step("pg_verifybackup").details["wal_parsed"] == same_major, report.summary()


def test_the_verify_operator_reads_an_encrypted_archive_with_its_key_connection(
    backups: Backups, managed: Path, task_context: Callable[..., dict], monkeypatch: pytest.MonkeyPatch
) -> None:
    """encryption_conn_id's key reads the WAL archive wal-push encrypted (the backup itself is plain):
    pg_verifybackup parses the fetched WAL and the restore check recovers through wal-fetch."""
    import json

    from airflow.sdk import DAG

    from pg_safe_backup.operators.backup import PostgresVerifyBackupOperator

    monkeypatch.setenv(
        "AIRFLOW_CONN_PGSB_WAL_KEY", json.dumps({"conn_type": "generic", "password": TEST_KEY.material.hex()})
    )
    from pg_safe_backup.restore_check import CheckNotRun
    from pg_safe_backup.verify import find_verifier

    try:  # the operator looks pg_verifybackup up itself: none reads a 17 manifest from npm's server-only 17
        find_verifier(backups.second)
        manifest = True
    except CheckNotRun:
        manifest = False
    give_to_server_user(backups.second)
    before = files_of(managed)
    with DAG("pgsb_verify_encrypted_archive", schedule=None):
        keyed = PostgresVerifyBackupOperator(
            task_id="verify",
            backup_dir=str(backups.second),
            wal_archive=str(managed),
            encryption_conn_id="pgsb_wal_key",
            verify_manifest=manifest,
        )
    done = keyed.execute(task_context(keyed))
    assert done["ok"], done
    if manifest:
        assert done["checks"]["pg_verifybackup"]["status"] == PASS, done
    assert done["checks"]["restore check"]["status"] == PASS, done
    assert files_of(managed) == before
