"""Retention on real backups and a real WAL archive: five backups of one archiving cluster, writes between
them; ``pg-safe-backup retention --keep-last 2`` (dry, then for real) deletes three and only the WAL before
the oldest kept backup's start, and both kept backups still restore. Then the rules around it (the newest
verified backup stays, nothing goes without a complete backup) and the operator against a local
S3-compatible server."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from airflow.providers.common.compat.sdk import AirflowFailException

from demo.load import wait_archived
from demo.s3 import local_s3
from pg_safe_backup.catalog import (
    INFO_NAME,
    LABEL_NAME,
    BackupInfo,
    CatalogEntry,
    append_verification,
    list_backups,
    plan_retention,
    read_info,
    write_info,
)
from pg_safe_backup.local_cluster import give_to_server_user
from pg_safe_backup.operators.lifecycle import PostgresBackupRetentionOperator
from pg_safe_backup.retention import RetentionRefused, carry_out_retention, plan_root
from pg_safe_backup.verify import PASS, check_backup

from backup_helpers import catalogued_backup, cluster_with_space

BACKUPS = 5
ROWS = 1000  # committed before each backup
#: A timeline history file, older by name than any segment: never removed.
HISTORY = "00000002.history"


@dataclass
class Five:
    """Five catalogued backups ``root/b0`` .. ``root/b4`` (oldest first) and the cluster's WAL archive."""

    root: Path
    archive: Path
    backups: list[Path]
    infos: list[BackupInfo]
    labels: list[str]
    wal_names: list[str]  # the archive's files once all five were archived


@pytest.fixture(scope="module")
def five(module_tmp_root: Path) -> Iterator[Five]:
    with cluster_with_space(module_tmp_root) as (cluster, archive, _):
        cluster.sql("CREATE TABLE ledger (id bigint PRIMARY KEY, v text)")
        root = module_tmp_root / "backups"
        backups, infos, labels = [], [], []
        for i in range(BACKUPS):
            cluster.sql(
                "INSERT INTO ledger SELECT g, md5(g::text) FROM generate_series(%s::bigint, %s::bigint) g",
                [i * ROWS + 1, (i + 1) * ROWS],
            )
            cluster.sql("SELECT pg_switch_wal()")  # each backup starts in a segment of its own
            folder = root / f"b{i}"
            backup, info = catalogued_backup(cluster, folder, f"retention/run{i}/backup")
            backups.append(folder)
            infos.append(info)
            labels.append(backup["backup_label"])
        wait_archived(cluster)
        yield Five(root, archive, backups, infos, labels, sorted(p.name for p in archive.iterdir()))


def listing(*folders: Path) -> dict[str, int]:
    """Every file under ``folders`` with its size."""
    return {str(p): p.lstat().st_size for f in folders for p in sorted(f.rglob("*"))}


def retention_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pg_safe_backup.cli", "retention", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )


def listed_folders(root: Path) -> list[str]:
    """The folders ``pg-safe-backup list ROOT`` prints (the last column), oldest first."""
    done = subprocess.run(
        [sys.executable, "-m", "pg_safe_backup", "list", str(root)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    *rows, count = done.stdout.splitlines()[1:]
    assert count == f"{len(rows)} backup{'s' if len(rows) != 1 else ''}"
    return [row.split()[-1] for row in rows]


def printed(stdout: str, verb: str) -> list[str]:
    """What the lines starting with ``verb`` name (a backup's folder, a WAL file)."""
    return [
        line.removeprefix(verb).split()[0].rstrip(":")
        for line in stdout.splitlines()
        if line.startswith(verb)
    ]


def expected_after(names: list[str], cutoff: str) -> list[str]:
    """The archive as pg_archivecleanup leaves it: segments from ``cutoff``'s position on, and every
    history and backup history file."""
    return sorted(n for n in names if not (len(n) == 24 and n[8:] < cutoff[8:]))


def catalog_only(five: Five, root: Path, labelled: range = range(BACKUPS)) -> list[Path]:
    """The five backups' catalogs (backup_info.json, and backup_label for those in ``labelled``) in
    ``root``, without their data: what retention reads."""
    folders = []
    for i, info in enumerate(five.infos):
        folder = root / f"b{i}"
        folder.mkdir(parents=True)
        write_info(folder, info)
        if i in labelled:
            (folder / LABEL_NAME).write_text(five.labels[i])
        folders.append(folder)
    return folders


def fake_archive(five: Five, folder: Path) -> Path:
    """An archive folder with the real archive's file names and a timeline history file (empty files:
    retention reads only names)."""
    folder.mkdir()
    for name in [*five.wal_names, HISTORY]:
        (folder / name).touch()
    return folder


def test_keep_last_two_deletes_three_backups_and_only_the_wal_before_the_oldest_kept_start(five, tmp_root):
    before = listing(five.root, five.archive)
    assert any(n.endswith(".backup") for n in five.wal_names), "the archive holds backup history files"
    args = [str(five.root), "--keep-last", "2", "--wal-archive", str(five.archive)]
    assert listed_folders(five.root) == [str(b) for b in five.backups]  # pg-safe-backup list: all five

    dry = retention_cli(*args, "--dry-run")

    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert listing(five.root, five.archive) == before, "--dry-run changed nothing"
    would_delete, would_remove = printed(dry.stdout, "would delete"), printed(dry.stdout, "would remove WAL")

    done = retention_cli(*args)

    assert done.returncode == 0, done.stdout + done.stderr
    kept, deleted = five.backups[3:], five.backups[:3]
    assert would_delete == [str(b) for b in deleted], dry.stdout
    assert [b for b in five.backups if b.exists()] == kept
    assert printed(done.stdout, "deleted") == [str(b) for b in deleted]
    assert listed_folders(five.root) == [str(b) for b in kept]
    assert all(f"keep      {b}: one of the newest 2" in done.stdout for b in kept), done.stdout
    cutoff = five.infos[3].start_wal
    remaining = sorted(p.name for p in five.archive.iterdir())
    assert remaining == expected_after(five.wal_names, cutoff)
    gone = sorted(set(five.wal_names) - set(remaining))
    assert gone, "WAL older than the oldest kept backup was removed"
    assert would_remove == gone, "the dry run printed exactly the WAL the real run removed"
    assert f"keeping from {cutoff}" in done.stdout
    # Both kept backups still restore from what is left of the archive, with the rows committed before them.
    for i, backup in zip((3, 4), kept, strict=True):
        give_to_server_user(backup)
        rows = (i + 1) * ROWS
        report = check_backup(
            backup,
            five.archive,
            manifest=False,
            invariant_sql=f"SELECT count(*) = {rows}, format('ledger: %s rows', count(*)) FROM ledger",
            work_dir=tmp_root,
        )
        assert report.ok, report.summary()
        assert report.step("restore check").status == PASS, report.summary()


def test_the_newest_verified_backup_is_kept_even_when_not_among_the_newest(five, tmp_root):
    folders = catalog_only(five, tmp_root / "backups")
    archive = fake_archive(five, tmp_root / "archive")
    spaces = tmp_root / "backups" / "b0_tablespaces"  # where an rsync-style copy keeps b0's tablespaces
    (spaces / "16384").mkdir(parents=True)
    append_verification(folders[1], {"ok": True, "checks": "restore check"})
    append_verification(folders[2], {"ok": False})  # failed: no reason to keep it

    plan = plan_root(tmp_root / "backups", keep_last=2, keep_days=None)
    report = carry_out_retention(plan, wal_archive=archive, dry_run=False, log=lambda line: None)

    assert sorted(report.kept) == [str(folders[i]) for i in (1, 3, 4)]
    assert report.kept[str(folders[1])] == ["the newest verified backup"]
    assert sorted(report.deleted) == [str(folders[i]) for i in (0, 2)]
    assert report.deleted[str(folders[0])] == [str(folders[0]), str(spaces)]
    assert not spaces.exists()
    assert [f.exists() for f in folders] == [False, True, False, True, True]
    assert report.wal_cutoff == five.infos[1].start_wal
    assert sorted(p.name for p in archive.iterdir()) == expected_after(
        [*five.wal_names, HISTORY], five.infos[1].start_wal
    )
    assert (archive / HISTORY).exists()


def test_nothing_is_removed_without_a_complete_backup_to_keep(five, tmp_root):
    root = tmp_root / "backups"
    folders = catalog_only(five, root, labelled=range(0))
    archive = fake_archive(five, tmp_root / "archive")
    before = listing(root, archive)

    done = retention_cli(str(root), "--keep-last", "1", "--wal-archive", str(archive))

    assert done.returncode == 1, done.stdout + done.stderr
    assert "no complete backup" in done.stderr
    assert listing(root, archive) == before
    # A plan made over every listed backup, the newest incomplete: carrying it out still removes nothing.
    (folders[0] / LABEL_NAME).write_text(five.labels[0])
    plan = plan_retention(list_backups(root), keep_last=1)
    assert [e.folder for e in plan.keep] == [folders[4]]
    with pytest.raises(RetentionRefused, match="no complete backup"):
        carry_out_retention(plan, wal_archive=archive, dry_run=False, log=print)
    assert listing(root, archive) == {**before, **listing(folders[0])}


def test_a_root_holding_two_clusters_backups_is_refused(five, tmp_root):
    root = tmp_root / "backups"
    folders = catalog_only(five, root)
    other = read_info(folders[2])
    other.system_identifier = "7000000000000000001"
    write_info(folders[2], other)
    before = listing(root)

    done = retention_cli(str(root), "--keep-last", "1")

    assert done.returncode == 1, done.stdout + done.stderr
    assert "holds backups of 2 clusters" in done.stderr, done.stderr
    assert "7000000000000000001" in done.stderr and five.infos[0].system_identifier in done.stderr
    assert "name the folder of one cluster's backups; removing nothing" in done.stderr, done.stderr
    assert listing(root) == before


def test_incomplete_backups_are_neither_counted_nor_deleted(five, tmp_root):
    root = tmp_root / "backups"
    folders = catalog_only(five, root, labelled=range(1, 4))  # b0 and the newest, b4, lack their label
    lines: list[str] = []

    report = carry_out_retention(
        plan_root(root, keep_last=2, keep_days=None), wal_archive=None, dry_run=False, log=lines.append
    )

    assert sorted(report.kept) == [str(folders[2]), str(folders[3])]
    assert sorted(report.skipped) == [str(folders[0]), str(folders[4])]
    assert [f.exists() for f in folders] == [True, False, True, True, True]
    assert f"skip      {folders[4]}: incomplete: no backup_label" in "\n".join(lines)
    assert report.wal_removed == []


def test_keep_days_through_the_operator_dry_run_changes_nothing(five, tmp_root):
    root = tmp_root / "backups"
    folders = catalog_only(five, root)
    archive = fake_archive(five, tmp_root / "archive")
    before = listing(root, archive)
    op = PostgresBackupRetentionOperator(
        task_id="retention", root=str(root), wal_archive=str(archive), keep_days=0, dry_run=True
    )

    xcom = op.run_retention(str(root), str(archive), None, 0.0, now=five.infos[3].stopped)

    assert listing(root, archive) == before
    assert xcom["dry_run"]
    assert xcom["deleted"] == [str(f) for f in folders[:3]]
    assert xcom["kept"][str(folders[3])] == ["within 0 days"]
    assert xcom["wal_cutoff"] == five.infos[3].start_wal
    assert xcom["wal_removed"] == len(
        set(five.wal_names) - set(expected_after(five.wal_names, xcom["wal_cutoff"]))
    )


def test_nothing_goes_when_a_folder_to_delete_holds_the_wal_archive(five, tmp_root):
    root = tmp_root / "backups"
    folders = catalog_only(five, root)
    fake_archive(five, folders[0] / "wal")
    before = listing(root)

    # The archive named relative to the working directory, the root not: still seen inside b0.
    done = retention_cli(str(root), "--keep-last", "2", "--wal-archive", "wal", cwd=folders[0])

    assert done.returncode == 1, done.stdout + done.stderr
    assert f"deleting {folders[0]} would delete {folders[0] / 'wal'}, which is kept" in done.stderr
    assert listing(root) == before


def test_backups_stopped_at_the_same_time_are_ordered_by_stop_lsn_as_a_number(five):
    """0/A000000 is before 0/10000000, though not as text."""
    same = five.infos[0].stop_time
    early = CatalogEntry(Path("/early"), replace(five.infos[0], stop_time=same, stop_lsn="0/A000000"))
    late = CatalogEntry(Path("/late"), replace(five.infos[1], stop_time=same, stop_lsn="0/10000000"))

    plan = plan_retention([late, early], keep_last=1)

    assert [e.folder for e in plan.keep] == [Path("/late")]
    assert [e.folder for e in plan.delete] == [Path("/early")]


def test_a_missing_wal_archive_or_root_removes_nothing(five, tmp_root):
    root = tmp_root / "backups"
    catalog_only(five, root)
    before = listing(root)

    done = retention_cli(str(root), "--keep-last", "1", "--wal-archive", str(tmp_root / "typo"))

    assert done.returncode == 1, done.stdout + done.stderr
    assert f"the WAL archive {tmp_root / 'typo'} is not a folder" in done.stderr
    assert listing(root) == before
    empty = retention_cli(str(tmp_root / "nothing-here"), "--keep-last", "1")
    assert empty.returncode == 1
    assert "no backup (backup_info.json) found under" in empty.stderr


def test_retention_refuses_to_run_without_a_policy(tmp_root):
    done = retention_cli(str(tmp_root))
    assert done.returncode == 2
    assert "--keep-last N and/or --keep-days D" in done.stderr
    with pytest.raises(ValueError, match="keep_last and/or keep_days"):
        plan_root(tmp_root, keep_last=None, keep_days=None)


def test_the_operator_carries_retention_out_in_an_object_store(five):
    with local_s3("pgsb-retention") as s3:
        bucket = s3.attach("pgsb_moto_ret")
        root, archive = bucket / "backups", bucket / "wal"
        for i, info in enumerate(five.infos):
            folder = root / f"b{i}"
            (folder / LABEL_NAME).write_text(five.labels[i])
            (folder / "global" / "pg_control").write_bytes(b"\0" * 512)
            write_info(folder, info)
        (root / "b0_tablespaces" / "16384" / "PG_VERSION").write_text("15\n")
        for name in [*five.wal_names, HISTORY]:
            (archive / name).write_bytes(b"wal")
        op = PostgresBackupRetentionOperator(
            task_id="retention", root=str(root), wal_archive=str(archive), keep_last=2
        )

        xcom = op.run_retention(str(root), str(archive), 2, None)

        assert sorted(p.name for p in root.iterdir()) == ["b3", "b4"]
        assert (root / "b3" / INFO_NAME).exists()
        cutoff = five.infos[3].start_wal
        remaining = sorted(p.name for p in archive.iterdir())
        assert remaining == expected_after([*five.wal_names, HISTORY], cutoff)
        assert HISTORY in remaining
        gone = sorted(set(five.wal_names) - set(remaining))
        assert xcom["deleted"] == [str(root / f"b{i}") for i in range(3)]
        assert sorted(xcom["kept"]) == [str(root / "b3"), str(root / "b4")]
        assert (xcom["wal_removed"], xcom["wal_first_removed"], xcom["wal_last_removed"]) == (
            len(gone),
            gone[0],
            gone[-1],
        )
        assert xcom["wal_cutoff"] == cutoff and not xcom["dry_run"]


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({}, "keep_last and/or keep_days"),
        ({"keep_last": 0}, "keep_last must be at least 1"),
        ({"keep_last": "two"}, "keep_last must be a whole number"),
        ({"keep_days": -1}, "keep_days must be a number of days >= 0"),
        ({"keep_last": 2, "root": ""}, "root"),
        ({"keep_last": 2, "dry_run": "yes"}, "dry_run"),
    ],
)
def test_retention_operator_parameters_are_checked_naming_them(kwargs, error):
    with pytest.raises(ValueError, match=error):
        PostgresBackupRetentionOperator(task_id="r", **{"root": "/backups", **kwargs})


def test_a_bad_rendered_parameter_fails_the_task_naming_it(tmp_root):
    op = PostgresBackupRetentionOperator(task_id="r", root=str(tmp_root), keep_days="{{ params.days }}")
    op.keep_days = "a week"  # as rendered
    with pytest.raises(AirflowFailException, match="keep_days must be a number of days"):
        op.execute({})
    op.keep_days = "None"  # an unset param: neither keep_last nor keep_days
    with pytest.raises(AirflowFailException, match="keep_last and/or keep_days"):
        op.execute({})
