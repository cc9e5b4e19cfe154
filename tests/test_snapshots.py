"""The snapshot drivers on a real btrfs file system (a loop device the tests make and remove): what is
snapshotted, in which order, where each tablespace is read from, and that nothing is left behind, also when a
snapshot fails or its folder exists. The backups themselves (Airflow, a write load, restores):
tests/test_e2e_snapshots.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from demo.load import invariant_sql, wait_archived
from pg_safe_backup.files.copier import copy_data_directory
from pg_safe_backup.files.layout import walk
from pg_safe_backup.files.manifest import write_backup_manifest
from pg_safe_backup.hooks.backup import PostgresBackupHook
from pg_safe_backup.local_cluster import SERVER_USER, as_server_user, give_to_server_user
from pg_safe_backup.operators.snapshot import make_driver
from pg_safe_backup.snapshots import (
    RECORD_NAME,
    KeptSnapshot,
    SnapshotError,
    SnapshotExists,
    delete_all,
    plan_volumes,
    planned,
    readable_tree,
    tablespace_links,
    take_all,
)
from pg_safe_backup.snapshots.btrfs import BtrfsDriver
from pg_safe_backup.snapshots.command import CommandDriver
from pg_safe_backup.state import parse_backup_label
from pg_safe_backup.store import catalog_kept_snapshot
from pg_safe_backup.verify import check_backup, verify_backup

from backup_helpers import (
    archiving_cluster,
    pair_maker,
    recovered,
    restore,
    run_backup,
    run_cli,
    store_backup_label,
    wait_for,
)
from btrfs_helpers import btrfs_volume, subvolume, subvolumes
from conftest import CONN_ID, PASSWORD
from pg_versions import verifier_for

ATTEMPT = "01a252b7-941f-7ace-9bcb-0610910cb83b"
BTRFS_TEMPLATES = {
    "snapshot": "btrfs subvolume snapshot -r {volume} {snapshot}",
    "delete": "if [ -e {snapshot} ]; then btrfs subvolume delete {snapshot}; fi",
}


@pytest.fixture(scope="module")
def volume() -> Iterator[Path]:
    with btrfs_volume() as mount:
        yield mount


@pytest.fixture
def layout(volume: Path) -> Iterator[dict[str, Path]]:
    """A data directory on one subvolume (a folder inside it), a tablespace on another, with a link as a
    server makes it, and a folder for the snapshots; removed after the test, snapshots checked gone."""
    data_vol, space_vol = subvolume(volume / "pgdata"), subvolume(volume / "space")
    data = data_vol / "16" / "main"
    (data / "global").mkdir(parents=True)
    (data / "pg_tblspc").mkdir()
    (data / "PG_VERSION").write_text("16\n")
    (data / "global" / "pg_control").write_bytes(b"control")
    (space_vol / "PG_16_202307071").mkdir()
    (space_vol / "PG_16_202307071" / "rel").write_bytes(b"tablespace")
    os.symlink(space_vol, data / "pg_tblspc" / "16384")
    snaps = volume / "snapshots"
    snaps.mkdir()
    yield {"data": data, "space": space_vol, "snapshots": snaps}
    left = [
        str(snaps / name) for name in sorted(os.listdir(snaps))
    ]  # a failed test's: so the next starts clean
    subprocess.run(
        ["btrfs", "subvolume", "delete", *left, str(data_vol), str(space_vol)], capture_output=True
    )
    snaps.rmdir()


def plan(driver, layout: dict[str, Path]):
    data = layout["data"]
    return planned(layout["snapshots"], ATTEMPT, plan_volumes(driver, data, tablespace_links(data)), driver)


@pytest.mark.parametrize("kind", ["btrfs", "command"])
def test_tablespaces_first_the_data_directory_last_each_read_from_its_own_snapshot_then_removed(
    volume, layout, kind
):
    driver = BtrfsDriver() if kind == "btrfs" else CommandDriver(**BTRFS_TEMPLATES)
    snapshots = plan(driver, layout)
    # One snapshot per subvolume, the tablespace's first; named after the attempt, in snapshot_dir.
    assert [s.volume for s in snapshots] == [str(layout["space"]), str(layout["data"].parents[1])]
    assert [Path(s.path).name for s in snapshots] == [f"pgsb-{ATTEMPT}-0", f"pgsb-{ATTEMPT}-1"]
    taken = take_all(driver, snapshots)
    assert subvolumes(volume) == sorted(
        ["pgdata", "space", f"snapshots/pgsb-{ATTEMPT}-0", f"snapshots/pgsb-{ATTEMPT}-1"]
    )

    # Written after the snapshots: in the live files only.
    (layout["space"] / "PG_16_202307071" / "after").write_bytes(b"live")
    (layout["data"] / "after").write_bytes(b"live")
    data, tablespaces = readable_tree(taken, layout["data"])
    assert data == layout["snapshots"] / f"pgsb-{ATTEMPT}-1" / "16" / "main"
    assert (data / "global" / "pg_control").read_bytes() == b"control" and not (data / "after").exists()
    # The data directory's snapshot links to the LIVE tablespace; the tablespace is read from its own.
    assert os.readlink(data / "pg_tblspc" / "16384") == str(layout["space"])
    assert tablespaces == {"16384": layout["snapshots"] / f"pgsb-{ATTEMPT}-0"}
    assert (tablespaces["16384"] / "PG_16_202307071" / "rel").read_bytes() == b"tablespace"
    assert not (tablespaces["16384"] / "PG_16_202307071" / "after").exists()
    with pytest.raises(OSError):  # read-only: a restore point cannot be written to
        (data / "written").write_bytes(b"x")

    assert delete_all(driver, taken) == []
    assert subvolumes(volume) == ["pgdata", "space"]
    assert delete_all(driver, taken) == []  # nothing there: nothing to do


def test_a_snapshot_folder_that_exists_is_refused_by_name_and_nothing_is_taken(volume, layout):
    driver = BtrfsDriver()
    snapshots = plan(driver, layout)
    Path(snapshots[1].path).mkdir()  # another backup's, or left over
    with pytest.raises(SnapshotExists, match=f"snapshot folder {snapshots[1].path} already exists"):
        take_all(driver, snapshots)
    assert subvolumes(volume) == ["pgdata", "space"]
    Path(snapshots[1].path).rmdir()


def test_a_failing_snapshot_command_deletes_those_taken_and_names_its_error(volume, layout):
    """The data directory's snapshot (the second) fails: the tablespace's is deleted, the error is the
    command's own line."""
    failing = {
        **BTRFS_TEMPLATES,
        "snapshot": "case {volume} in */pgdata) echo 'no space left on volume' >&2; exit 3;; esac; "
        + BTRFS_TEMPLATES["snapshot"],
    }
    driver = CommandDriver(**failing)
    snapshots = plan(driver, layout)
    with pytest.raises(SnapshotError) as raised:
        take_all(driver, snapshots)
    assert str(raised.value) == (
        f"snapshot_command of {snapshots[1].path} failed (exit 3): no space left on volume"
    )
    assert subvolumes(volume) == ["pgdata", "space"]


def test_the_server_s_os_user_takes_and_removes_btrfs_snapshots_where_user_subvol_rm_allowed(volume, layout):
    """No root: the owner of the subvolumes and of snapshot_dir takes read-only snapshots; removing one takes
    the file system mounted with user_subvol_rm_allowed and the snapshot made writable first (the driver
    does so when it is not root). As the README's privileges table says."""
    subprocess.run(["mount", "-o", "remount,user_subvol_rm_allowed", str(volume)], check=True)
    for folder in (layout["data"].parents[1], layout["space"], layout["snapshots"]):
        subprocess.run(["chown", "-R", f"{SERVER_USER}:", str(folder)], check=True)
    script = (
        "import json, sys; from pathlib import Path;"
        "from pg_safe_backup.snapshots import BtrfsDriver, delete_all, plan_volumes, planned,"
        " tablespace_links, take_all;"
        "d = BtrfsDriver(); data = Path(sys.argv[1]);"
        "snaps = planned(Path(sys.argv[2]), 'user', plan_volumes(d, data, tablespace_links(data)), d);"
        "taken = take_all(d, snaps); made = [Path(s.path).is_dir() for s in taken];"
        "print(json.dumps({'made': made, 'problems': delete_all(d, taken)}))"
    )
    done = subprocess.run(
        as_server_user([sys.executable, "-c", script, str(layout["data"]), str(layout["snapshots"])]),
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "provider")},
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"made": [True, True], "problems": []}
    assert subvolumes(volume) == ["pgdata", "space"]


def test_btrfs_refuses_a_data_directory_off_btrfs_naming_it(tmp_path):
    (tmp_path / "data").mkdir()
    with pytest.raises(
        SnapshotError, match=f"driver='btrfs': {tmp_path / 'data'} is not on a btrfs subvolume"
    ):
        BtrfsDriver().volume_of(tmp_path / "data")


@pytest.mark.parametrize(
    "args, message",
    [
        (("zfs", None, None, None), "driver must be one of btrfs, command, got 'zfs'"),
        (
            ("command", "snap {volume}", None, None),
            "driver='command' needs snapshot_command and delete_command",
        ),
        (
            ("btrfs", "snap {volume}", None, None),
            "snapshot_command, mount_command and delete_command need driver",
        ),
        (
            ("command", "snap {vol}", None, "rm {snapshot}"),
            "snapshot_command: 'snap {vol}' is not a template",
        ),
    ],
)
def test_a_bad_driver_setting_is_named(args, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make_driver(*args)


# ----------------------------------------------------------------- a kept snapshot: listed, restored, removed
@pytest.fixture
def btrfs_cluster(volume: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict]:
    """An archiving cluster whose data directory and tablespace are on two subvolumes, with rows in both."""
    data_volume, space_volume = subvolume(volume / "kdata"), subvolume(volume / "kspace")
    for folder in (data_volume, space_volume):
        give_to_server_user(folder)
    root = Path(tempfile.mkdtemp(prefix="pgsb-kept-"))
    give_to_server_user(root)  # the restored server writes its log beside its data directory
    archive, snaps = root / "archive", volume / "ksnapshots"
    archive.mkdir()
    give_to_server_user(archive)
    snaps.mkdir()
    cluster = archiving_cluster(data_volume / "data", archive, PASSWORD)
    monkeypatch.setenv(f"AIRFLOW_CONN_{CONN_ID.upper()}", cluster.airflow_conn_uri(password=PASSWORD))
    try:
        cluster.sql(f"CREATE TABLESPACE space1 LOCATION '{space_volume}'")
        cluster.sql("CREATE TABLE t (i int)")
        cluster.sql("CREATE TABLE s (i int) TABLESPACE space1")
        yield {"cluster": cluster, "archive": archive, "snapshots": snaps, "root": root}
    finally:
        cluster.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)
        left = [str(snaps / n) for n in sorted(os.listdir(snaps))]
        subprocess.run(["btrfs", "subvolume", "delete", *left], capture_output=True)
        shutil.rmtree(snaps, ignore_errors=True)
        subprocess.run(
            ["btrfs", "subvolume", "delete", str(data_volume), str(space_volume)], capture_output=True
        )


def kept_backup(env: dict, name: str, rows: range) -> Path:
    """``rows`` into both tables, then one backup taken as snapshots and kept; its catalog entry folder."""
    cluster = env["cluster"]
    for table in ("t", "s"):
        cluster.sql(
            f"INSERT INTO {table} SELECT generate_series(%s::int, %s::int)", [rows.start, rows.stop - 1]
        )
    driver, data = BtrfsDriver(), cluster.datadir
    taken: list = []
    attempt = f"kept-{name}"
    snapshots = planned(env["snapshots"], attempt, plan_volumes(driver, data, tablespace_links(data)), driver)
    backup = run_backup(
        PostgresBackupHook(CONN_ID), f"d/{name}/backup", lambda: taken.extend(take_all(driver, snapshots))
    )
    entry = env["snapshots"] / f"pgsb-{attempt}"
    catalog_kept_snapshot(entry, KeptSnapshot(str(data), tuple(taken)), backup, None, {"run_id": name})
    return entry


def test_a_kept_snapshot_is_listed_restored_with_both_volumes_rows_and_removed_by_retention(
    volume, btrfs_cluster
):
    env = btrfs_cluster
    cluster, snaps = env["cluster"], env["snapshots"]
    first = kept_backup(env, "first", range(1, 201))
    second = kept_backup(env, "second", range(201, 401))
    cluster.sql("INSERT INTO t SELECT generate_series(401, 450)")  # after the second: in the archive only
    wait_archived(cluster)
    # The entry holds the label files, the manifest and the record; the data stays in the snapshots.
    assert sorted(p.name for p in second.iterdir()) == [
        "backup_label",
        "backup_manifest",
        RECORD_NAME,
        "tablespace_map",
    ]
    listed = run_cli("list", snaps, "--json", timeout=60)
    assert listed.returncode == 0, listed.stderr
    rows = {Path(b["folder"]).name: b for b in json.loads(listed.stdout)}
    assert set(rows) == {first.name, second.name}, rows
    assert all(b["status"] == "proven" and b["proof"]["format"] == "snapshot" for b in rows.values()), rows
    assert rows[second.name]["info"]["format"] == "snapshot"

    # Restored without a copy-out, from the snapshots (each tablespace from its own), to the archive's end.
    target, space = env["root"] / "restored", env["root"] / "restored_space"
    oid = cluster.sql("SELECT oid FROM pg_tablespace WHERE spcname = 'space1'")[0][0]
    done = restore(
        second,
        target,
        "--wal-archive",
        env["archive"],
        "--tablespace",
        f"{oid}={space}",
        "--archive-mode",
        "off",
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert not list(env["root"].glob(".restored.snapshot-*")), "the staging folder was left"
    with recovered(target) as server:
        assert server.sql("SELECT count(*), sum(i) FROM t") == [(450, sum(range(1, 451)))]
        assert server.sql("SELECT count(*), sum(i) FROM s") == [(400, sum(range(1, 401)))]
        assert server.sql("SELECT pg_tablespace_location(%s::oid)", [oid]) == [(str(space),)]

    # Retention keeps the newest and removes the older: its entry and its two snapshots.
    before = subvolumes(volume)
    assert sum("ksnapshots/pgsb-kept-first-" in v for v in before) == 2, before
    done = run_cli("retention", snaps, "--keep-last", "1", "--wal-archive", env["archive"], timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert not first.exists() and second.is_dir()
    after = subvolumes(volume)
    assert (
        not any("pgsb-kept-first-" in v for v in after) and sum("pgsb-kept-second-" in v for v in after) == 2
    ), after


def test_a_kept_snapshot_whose_snapshot_is_gone_is_listed_incomplete_and_not_restored(volume, btrfs_cluster):
    env = btrfs_cluster
    entry = kept_backup(env, "gone", range(1, 11))
    record = KeptSnapshot.read(entry)
    subprocess.run(
        ["btrfs", "subvolume", "delete", record.snapshots[-1].path], check=True, capture_output=True
    )
    listed = json.loads(run_cli("list", env["snapshots"], "--json", timeout=60).stdout)
    assert [b["status"] for b in listed] == [f"incomplete: snapshot {record.snapshots[-1].path} is gone"]
    target = env["root"] / "never"
    done = restore(entry, target, "--wal-archive", env["archive"])
    assert done.returncode != 0 and f"snapshot {record.snapshots[-1].path} is gone" in done.stderr, (
        done.stderr
    )
    assert not target.exists()


def test_a_snapshot_backup_of_a_streaming_standby_under_write_load_restores_every_commit(
    volume, tmp_root, monkeypatch
):
    """The standby's volume snapshotted in backup mode (its pg_control in it), copied out after the stop: the
    store's copy check accepts the copy, the page-LSN check and pg_verifybackup pass, and recovery to the end
    of the primary's archive has every row committed."""
    pair_volume = subvolume(volume / "pair")
    give_to_server_user(pair_volume)
    snaps = volume / "pair_snapshots"
    snaps.mkdir()
    try:
        with pair_maker(pair_volume, monkeypatch) as make:
            pair = make(writing=True)
            wait_for(lambda: pair.writer.committed >= 100, what="some writes before the backup starts")
            driver, data = BtrfsDriver(), pair.standby.datadir
            plan = planned(snaps, "standby", plan_volumes(driver, data, tablespace_links(data)), driver)
            taken: list = []

            def snapshot_then_more_rows() -> None:
                pair.more_rows_on_disk()  # the standby's pages move past its start while in backup mode
                taken.extend(take_all(driver, plan))

            result = run_backup(pair.hook, "snap/standby/backup", snapshot_then_more_rows)
            committed = pair.writer.stop()
            fields = parse_backup_label(result["backup_label"])
            assert fields["BACKUP FROM"] == "standby"
            source, tablespaces = readable_tree(taken, data)
            copy = tmp_root / "copy"
            copied = copy_data_directory(source, copy, entries=walk(source, tablespaces=tablespaces))
            assert delete_all(driver, taken) == []
            store_backup_label(
                copy, result, local_copy=copy
            )  # checks the copy's pg_control against the label
            write_backup_manifest(
                copy,
                backup_label=result["backup_label"],
                stop_lsn=result["stop_lsn"],
                system_identifier=result["system_identifier"],
                checksums=copied.checksums,
            )
            wait_archived(pair.primary)
            major = pair.standby.server_version() // 10000
            report = check_backup(
                copy, pair.archive, restore=False, verifier_bindir=(verifier_for(major) or [None])[0]
            )
            page, verified = report.steps
            assert page.status == "PASS" and "minimum recovery point" in page.details["consistency_from"], (
                page
            )
            assert verified.status == "PASS", verified
            whole = verify_backup(
                copy,
                pair.archive,
                recovery_target_immediate=False,
                invariant_sql=invariant_sql(("ledger",), committed),
            )
            assert whole.ok, whole.summary()
    finally:
        subprocess.run(["btrfs", "subvolume", "delete", str(pair_volume)], capture_output=True)
        shutil.rmtree(snaps, ignore_errors=True)
    assert not any("pair" in v for v in subvolumes(volume))


def test_a_kept_snapshot_whose_record_names_another_folder_is_not_proven_and_retention_deletes_nothing_of_it(
    volume, btrfs_cluster
):
    """The record (snapshot.json) is a file's word: one that names a folder other than the entry's own
    snapshots (here the LIVE tablespace's subvolume, as a damaged or edited record might) proves nothing, and
    nothing is deleted or restored through it."""
    env = btrfs_cluster
    older = kept_backup(env, "older", range(1, 11))
    newer = kept_backup(env, "newer", range(11, 21))
    record = KeptSnapshot.read(older)
    live_space = str(volume / "kspace")
    space_snapshot = record.snapshots[0]  # the tablespace's, taken first
    forged = replace(
        space_snapshot, path=live_space, sources=dict.fromkeys(space_snapshot.sources, live_space)
    )
    (older / RECORD_NAME).write_bytes(
        KeptSnapshot(record.data_directory, (forged, *record.snapshots[1:])).to_json()
    )

    listed = {
        Path(b["folder"]).name: b["status"]
        for b in json.loads(run_cli("list", env["snapshots"], "--json").stdout)
    }
    assert listed[older.name] == (
        f"incomplete: {older / RECORD_NAME} names {live_space}, not one of its own snapshots"
        f" ({older.parent}/{older.name}-<n>)"
    ), listed
    assert listed[newer.name] == "proven"
    done = run_cli(
        "retention", env["snapshots"], "--keep-last", "1", "--wal-archive", env["archive"], timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "kspace" in subvolumes(volume) and older.is_dir(), "deleted on the record's word"
    done = restore(older, env["root"] / "never", "--wal-archive", env["archive"])
    assert done.returncode != 0 and f"names {live_space}, not one of its own snapshots" in done.stderr, (
        done.stderr
    )
