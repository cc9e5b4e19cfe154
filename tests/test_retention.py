"""Retention on real backups and a real WAL archive: five backups of one archiving cluster, writes between
them; ``pg-safe-backup retention --keep-last 2`` (dry, then for real) deletes three and only the WAL before
the oldest kept backup's start, and both kept backups still restore. Then the rules around it (the newest
verified backup stays, nothing goes without a backup that proves itself), crafted catalogs that must change
nothing (a planted folder, a late store, a link, a malformed entry), and the operator against a local
S3-compatible server. Each test works on hard-linked copies of the five backups and their archive."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from psycopg.conninfo import make_conninfo

from airflow.providers.common.compat.sdk import AirflowFailException

from demo.load import wait_archived
from demo.s3 import local_s3
from pg_safe_backup.catalog import (
    INFO_NAME,
    BackupInfo,
    RetentionPlan,
    append_verification,
    entry_path,
    list_backups,
    read_info,
    wal_to_remove,
    write_info,
)
from pg_safe_backup.cli import FAILED, USAGE
from pg_safe_backup.files.crypt import EncryptionKey
from pg_safe_backup.files.walarchive import IDENTITY_FILE, parse_stored_name
from pg_safe_backup.local_cluster import give_to_server_user
from pg_safe_backup.operators.lifecycle import PostgresBackupRetentionOperator
from pg_safe_backup.proof import LABEL_NAME, prove_backup
from pg_safe_backup.retention import RetentionRefused, carry_out_retention, plan_root
from pg_safe_backup.verify import PASS, check_backup
from pg_safe_backup.wal_archive import TEMP_FOLDER

from backup_helpers import (
    TEST_KEY,
    catalogued_backup,
    cluster_with_space,
    linked_copy,
    managed_archive,
    reforge_backup,
    run_cli,
    wait_for,
)
from conftest import CONN_ID

BACKUPS = 5
ROWS = 1000  # committed before each backup
#: A timeline history file, older by name than any segment: never removed.
HISTORY = "00000002.history"
ENTRY = ".backup_info.json"


@dataclass
class Five:
    """Five catalogued backups ``root/b0`` .. ``root/b4`` (oldest first) and the cluster's WAL archive."""

    root: Path
    archive: Path
    backups: list[Path]
    infos: list[BackupInfo]
    labels: list[str]
    wal_names: list[str]  # the archive's files once all five were archived
    dsn: str  # the live cluster


@pytest.fixture(scope="module")
def five(module_tmp_root: Path) -> Iterator[Five]:
    with cluster_with_space(module_tmp_root) as (cluster, archive, _):
        cluster.sql("CREATE TABLE ledger (id bigint PRIMARY KEY, v text)")
        root = module_tmp_root / "backups"
        backups, infos, labels = [], [], []
        done_at = 0.0
        for i in range(BACKUPS):
            # backup_label's START TIME has whole seconds: each backup starts in a second of its own, so
            # that keep_days=0 "now" at one backup's start keeps none of the backups before it
            wait_for(lambda last=int(done_at): int(time.time()) > last, what="a new second")
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
            done_at = time.time()
        wait_archived(cluster)
        names = sorted(p.name for p in archive.iterdir())
        yield Five(root, archive, backups, infos, labels, names, make_conninfo(**cluster.conninfo()))


def listing(*folders: Path) -> dict[str, int]:
    """Every file under ``folders`` with its size (a folder's: None, as tmpfs counts its entries in it)."""
    return {str(p): None if p.is_dir() else p.lstat().st_size for f in folders for p in sorted(f.rglob("*"))}


def retention_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return run_cli("retention", *args, timeout=120, cwd=cwd)


def listed_folders(root: Path) -> list[str]:
    """The folders ``pg-safe-backup list ROOT`` prints (the last column), oldest first."""
    done = run_cli("list", root, timeout=60)
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
    """The five backups and their catalog entries in ``root`` (hard-linked copies), backup_label only in
    those in ``labelled``."""
    folders = []
    for i, backup in enumerate(five.backups):
        folder = linked_copy(backup, root / f"b{i}")
        shutil.copy2(entry_path(backup), entry_path(folder))
        if i not in labelled:
            (folder / LABEL_NAME).unlink()
        folders.append(folder)
    return folders


def real_copy(five: Five, tmp_root: Path) -> tuple[Path, Path, list[Path]]:
    """The five backups under ``tmp_root/backups`` and the real WAL archive in ``tmp_root/archive``
    (hard-linked copies): the root, the archive and the backups' folders."""
    folders = catalog_only(five, tmp_root / "backups")
    return tmp_root / "backups", linked_copy(five.archive, tmp_root / "archive"), folders


def assert_restores(
    five: Five, backup: Path, archive: Path, tmp_root: Path, key: EncryptionKey | None = None
) -> None:
    """``backup`` (b<i>) restores from ``archive`` (encrypted with ``key``) on a temporary server, with every
    row committed before it."""
    i = five.backups.index(five.root / backup.name)
    give_to_server_user(backup)
    report = check_backup(
        backup,
        archive,
        archive_key=key,
        manifest=False,
        page_lsns=False,
        invariant_sql=f"SELECT count(*) = {(i + 1) * ROWS}, format('ledger: %s rows', count(*)) FROM ledger",
        work_dir=tmp_root,
    )
    assert report.ok, report.summary()
    assert report.step("restore check").status == PASS, report.summary()


def fake_archive(five: Five, folder: Path) -> Path:
    """An archive folder with the real archive's file names and a timeline history file (empty files:
    retention reads only names)."""
    folder.mkdir()
    for name in [*five.wal_names, HISTORY]:
        (folder / name).touch()
    return folder


def test_keep_last_two_deletes_three_backups_and_only_the_wal_before_the_oldest_kept_start(five, tmp_root):
    root, archive, backups = real_copy(five, tmp_root)
    before = listing(root, archive)
    assert any(n.endswith(".backup") for n in five.wal_names), "the archive holds backup history files"
    args = [str(root), "--keep-last", "2", "--wal-archive", str(archive)]
    assert listed_folders(root) == [str(b) for b in backups]  # pg-safe-backup list: all five

    dry = retention_cli(*args, "--dry-run")

    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert listing(root, archive) == before, "--dry-run changed nothing"
    would_delete, would_remove = printed(dry.stdout, "would delete"), printed(dry.stdout, "would remove WAL")

    done = retention_cli(*args)

    assert done.returncode == 0, done.stdout + done.stderr
    kept, deleted = backups[3:], backups[:3]
    assert would_delete == [str(b) for b in deleted], dry.stdout
    assert [b for b in backups if b.exists()] == kept
    assert [b for b in backups if entry_path(b).exists()] == kept, "each catalog entry went with its backup"
    assert printed(done.stdout, "deleted") == [str(b) for b in deleted]
    assert listed_folders(root) == [str(b) for b in kept]
    assert all(f"keep      {b}: one of the newest 2" in done.stdout for b in kept), done.stdout
    cutoff = five.infos[3].start_wal
    remaining = sorted(p.name for p in archive.iterdir())
    assert remaining == expected_after(five.wal_names, cutoff)
    gone = sorted(set(five.wal_names) - set(remaining))
    assert gone, "WAL older than the oldest kept backup was removed"
    assert would_remove == gone, "the dry run printed exactly the WAL the real run removed"
    assert f"keeping from {cutoff}" in done.stdout
    # Both kept backups still restore from what is left of the archive, with the rows committed before them.
    for backup in kept:
        assert_restores(five, backup, archive, tmp_root)


#: Files a wal-push in progress may leave beside a stored segment (a temporary name, never a stored one).
PUSH_TEMPORARY = (".{}.tmp", "{}.tmp", "{}.part-4242", ".{}.pgsb-tmp")


def test_a_managed_archives_names_are_cut_by_the_segment_they_hold():
    old, kept = "000000010000000000000002", "000000010000000000000007"
    stored = [
        f"{old}.zst.enc",
        f"{old}.partial.gz",
        f"{old}.lz4",
        f"{old}.gz.enc",  # a second stored form of one name: both are that segment
        f"{kept}.zst.enc",
        f"{kept}.partial.lz4.enc",
        "00000002.history.gz.enc",
        f"{old}.00000028.backup.zst.enc",
        IDENTITY_FILE,
        *(form.format(f"{old}.zst.enc") for form in PUSH_TEMPORARY),
        f"{old}.enc.zst",  # suffixes in the wrong order: not a name wal-push writes
    ]

    removed = wal_to_remove(stored, "000000010000000000000005")

    assert removed == sorted([f"{old}.zst.enc", f"{old}.partial.gz", f"{old}.lz4", f"{old}.gz.enc"])


def test_a_managed_archive_loses_exactly_the_old_segments_and_never_its_identity_or_a_push_in_progress(
    five, tmp_root
):
    root = tmp_root / "backups"
    backups = catalog_only(five, root)
    major = five.infos[0].pg_major
    archive = managed_archive(five.archive, tmp_root / "archive", major, TEST_KEY, ("zstd", "gzip", "none"))
    stored = sorted(p.name for p in archive.iterdir())
    oldest = min(n for n in stored if (name := parse_stored_name(n)) and len(name.name) == 24)
    temporary = [form.format(oldest) for form in PUSH_TEMPORARY]
    for name in temporary:
        (archive / name).write_bytes(b"half a segment")
    (archive / TEMP_FOLDER).mkdir()  # where wal-push writes a file before linking it in
    in_progress = archive / TEMP_FOLDER / f"{oldest}.4242.0badcafe"
    in_progress.write_bytes(b"half a segment")
    assert any(n.endswith(".zst.enc") for n in stored) and any(n.endswith(".gz.enc") for n in stored)

    done = retention_cli(str(root), "--keep-last", "2", "--wal-archive", str(archive))

    assert done.returncode == 0, done.stdout + done.stderr
    cutoff = five.infos[3].start_wal
    left = {parse_stored_name(p.name).name for p in archive.iterdir() if parse_stored_name(p.name)}
    assert sorted(left) == expected_after(five.wal_names, cutoff), "segments cut as in a plain archive"
    assert (archive / IDENTITY_FILE).is_file(), "the identity file is never removed"
    assert all((archive / name).is_file() for name in temporary), "a push's temporary files stay"
    assert in_progress.is_file(), "wal-push's own temporary folder is left alone"
    assert [b for b in backups if b.exists()] == backups[3:]
    assert_restores(five, backups[3], archive, tmp_root, TEST_KEY)


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
    assert "no backup that proves itself" in done.stderr
    assert listing(root, archive) == before
    # A plan whose kept backup is incomplete and deletes a proven one: carrying it out removes nothing.
    (folders[0] / LABEL_NAME).write_text(five.labels[0])
    entries = {e.name: e for e in list_backups(root)}
    plan = RetentionPlan([entries[str(folders[4])]], [entries[str(folders[0])]], five.infos[4].start_wal, {})
    with pytest.raises(RetentionRefused, match="no backup that proves itself"):
        carry_out_retention(plan, wal_archive=archive, dry_run=False, log=print)
    assert listing(root, archive) == {**before, **listing(folders[0])}


def test_a_root_holding_two_clusters_backups_is_refused(five, tmp_root):
    root = tmp_root / "backups"
    folders = catalog_only(five, root)
    reforge_backup(folders[2], system_identifier=7000000000000000001)  # its pg_control and manifest say so
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

    xcom = op.run_retention(str(root), str(archive), None, 0.0, now=prove_backup(folders[3]).start_time)

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


def test_a_store_that_ran_late_does_not_make_an_older_backup_the_newest(five, tmp_root):
    """Item 7: b3's entry says it stopped after b4 (a cleared, retried store task): --keep-last 1 keeps b4,
    the newest in WAL; the order is by proven stop LSN (as a number: 0/A000000 is before 0/10000000)."""
    root, archive, folders = real_copy(five, tmp_root)
    late = read_info(folders[3])
    late.stop_time = (datetime.now(timezone.utc) + timedelta(days=1)).isoformat()
    late.stop_lsn = "FF/FFFFFFFF"
    write_info(folders[3], late)

    done = retention_cli(str(root), "--keep-last", "1", "--wal-archive", str(archive))

    assert done.returncode == 0, done.stdout + done.stderr
    assert [f.exists() for f in folders] == [False, False, False, False, True]
    assert f"keeping from {five.infos[4].start_wal}" in done.stdout
    assert_restores(five, folders[4], archive, tmp_root)


def test_a_missing_wal_archive_or_root_removes_nothing(five, tmp_root):
    root = tmp_root / "backups"
    catalog_only(five, root)
    before = listing(root)

    done = retention_cli(str(root), "--keep-last", "1", "--wal-archive", str(tmp_root / "typo"))

    assert done.returncode == USAGE, done.stdout + done.stderr
    assert f"retention: error: --wal-archive {tmp_root / 'typo'} is not a folder" in done.stderr
    assert listing(root) == before
    missing = retention_cli(str(tmp_root / "nothing-here"), "--keep-last", "1")
    assert missing.returncode == USAGE
    assert f"retention: error: ROOT {tmp_root / 'nothing-here'} is not a folder" in missing.stderr
    (tmp_root / "empty").mkdir()
    empty = retention_cli(str(tmp_root / "empty"), "--keep-last", "1")
    assert empty.returncode == FAILED
    assert "no backup found under" in empty.stderr


def test_retention_refuses_to_run_without_a_policy(tmp_root):
    done = retention_cli(str(tmp_root))
    assert done.returncode == USAGE
    assert "--keep-last N and/or --keep-days D" in done.stderr
    with pytest.raises(ValueError, match="keep_last and/or keep_days"):
        plan_root(tmp_root, keep_last=None, keep_days=None)


def test_the_operator_carries_retention_out_in_an_object_store(five):
    with local_s3("pgsb-retention") as s3:
        bucket = s3.attach("pgsb_moto_ret")
        root, archive = bucket / "backups", bucket / "wal"
        for i, info in enumerate(five.infos):
            folder = root / f"b{i}"
            for name in (LABEL_NAME, "backup_manifest", "PG_VERSION", "global/pg_control"):
                (folder / name).write_bytes((five.backups[i] / name).read_bytes())  # what proves it
            write_info(folder, info)
        (root / "b0_tablespaces" / "16384" / "PG_VERSION").write_text("15\n")
        for name in [*five.wal_names, HISTORY]:
            (archive / name).write_bytes(b"wal")
        op = PostgresBackupRetentionOperator(
            task_id="retention", root=str(root), wal_archive=str(archive), keep_last=2
        )

        xcom = op.run_retention(str(root), str(archive), 2, None)

        assert sorted(p.name for p in root.iterdir()) == ["b3", "b3" + ENTRY, "b4", "b4" + ENTRY]
        assert not (root / "b3" / INFO_NAME).exists()
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


def planted(root: Path, name: str, label: str, **crafted: object) -> Path:
    """A folder under ``root`` that is no backup: a file named backup_label and a crafted catalog entry
    (inside, as an earlier release stored it, and beside)."""
    folder = root / name
    folder.mkdir()
    (folder / LABEL_NAME).write_text(label)
    entry = json.dumps(
        {
            "label": "planted",
            "start_lsn": "FF/FF000028",
            "stop_lsn": "FF/FFFFFFFF",
            "timeline": 1,
            "start_wal": "00000001000000FF000000FF",
            "stop_wal": "00000001000000FF000000FF",
            "start_time": None,
            "stop_time": (datetime.now(timezone.utc) + timedelta(days=365)).isoformat(),
            "system_identifier": None,
            "verifications": [{"ok": True, "at": datetime.now(timezone.utc).isoformat()}],
            **crafted,
        }
    )
    (folder / INFO_NAME).write_text(entry)
    entry_path(folder).write_text(entry)
    return folder


def test_a_planted_folder_with_a_crafted_entry_deletes_no_proven_backup_and_no_needed_wal(five, tmp_root):
    """Item 2: a newer stop_time, a forward start_wal, no system identifier, a passed check and any
    backup_label (one of them even a real backup's label) change nothing: the run is the one without them."""
    root, archive, folders = real_copy(five, tmp_root)
    craft = [planted(root, "zz", "anything"), planted(root, "zzz", five.labels[4])]
    (craft[1] / "PG_VERSION").write_text("15\n")
    args = [str(root), "--keep-last", "1", "--wal-archive", str(archive)]

    done = retention_cli(*args)

    assert done.returncode == 0, done.stdout + done.stderr
    assert [f.exists() for f in folders] == [False, False, False, False, True]
    assert all(f.exists() for f in craft), "never deleted automatically"
    assert f"keep      {folders[4]}: one of the newest 1" in done.stdout
    assert f"skip      {craft[0]}: incomplete: " in done.stdout, done.stdout
    assert f"skip      {craft[1]}: UNVERIFIABLE: no backup_manifest" in done.stdout, done.stdout
    cutoff = five.infos[4].start_wal
    assert f"keeping from {cutoff}" in done.stdout
    assert sorted(p.name for p in archive.iterdir()) == expected_after(five.wal_names, cutoff)
    again = retention_cli(*args)
    assert again.returncode == 0 and "deleted" not in again.stdout, again.stdout + again.stderr
    assert_restores(five, folders[4], archive, tmp_root)


def test_a_linked_folder_under_the_root_is_named_and_never_followed(five, tmp_root):
    """Item 8: a link to a real backup outside ROOT: named as unverifiable; nothing outside is touched, and
    the next run still works."""
    root, archive, folders = real_copy(five, tmp_root)
    outside = linked_copy(five.backups[0], tmp_root / "elsewhere")
    shutil.copy2(entry_path(five.backups[0]), entry_path(outside))
    (root / "b9").symlink_to(outside)
    before = listing(outside)

    for _ in range(2):
        done = retention_cli(str(root), "--keep-last", "2", "--wal-archive", str(archive))
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"skip      {root / 'b9'}: UNVERIFIABLE: a link to {outside}: never followed" in done.stdout

    assert listing(outside) == before
    assert (root / "b9").is_symlink()
    assert [f.exists() for f in folders] == [False, False, False, True, True]
    assert f"{root / 'b9'}: UNVERIFIABLE: a link to" in run_cli("list", root, timeout=60).stdout
    for backup in folders[3:]:
        assert_restores(five, backup, archive, tmp_root)


def test_a_malformed_catalog_entry_stops_nothing_and_its_backup_is_still_counted(five, tmp_root):
    """Item 9: the newest backup's entry has a naive stop_time, another's is not JSON: both backups prove
    themselves from disk and are counted as any other."""
    root, archive, folders = real_copy(five, tmp_root)
    naive = json.loads(entry_path(folders[4]).read_text())
    naive["stop_time"] = "2026-11-26 06:00:00"
    entry_path(folders[4]).write_text(json.dumps(naive))
    entry_path(folders[0]).write_text("{not json")

    done = retention_cli(str(root), "--keep-last", "2", "--wal-archive", str(archive))

    assert done.returncode == 0, done.stdout + done.stderr
    assert [f.exists() for f in folders] == [False, False, False, True, True]
    assert f"keep      {folders[4]}: one of the newest 2" in done.stdout
    for backup in folders[3:]:
        assert_restores(five, backup, archive, tmp_root)


def test_a_passed_check_counts_only_for_the_manifest_it_was_of(five, tmp_root):
    """A verification record without the proven manifest's checksum (an earlier release's, or crafted) is
    no reason to keep a backup."""
    root = tmp_root / "backups"
    folders = catalog_only(five, root)
    info = read_info(folders[1])
    info.verifications.append({"ok": True, "at": datetime.now(timezone.utc).isoformat()})
    write_info(folders[1], info)
    append_verification(folders[2], {"ok": True})
    info = read_info(folders[2])
    assert info.verifications[-1]["manifest_checksum"] == five.infos[2].manifest_checksum

    plan = plan_root(root, keep_last=1, keep_days=None)

    assert plan.reasons[str(folders[2])] == ["the newest verified backup"]
    assert str(folders[1]) not in plan.reasons


def test_with_the_live_cluster_backups_it_disowns_are_left_alone(five, tmp_root):
    """Optional check (--dsn / postgres_conn_id): a self-consistent crafted backup ending beyond the
    server's WAL, or a backup of another cluster, is never counted: without it the crafted one would be
    "the newest" and b4 would go."""
    root, archive, folders = real_copy(five, tmp_root)
    future = linked_copy(five.backups[0], root / "future")
    reforge_backup(future, stop_lsn="FF/0")
    args = [str(root), "--keep-last", "1", "--wal-archive", str(archive)]
    assert f"would delete {folders[4]}" in retention_cli(*args, "--dry-run").stdout  # what --dsn prevents

    done = retention_cli(*args, "--dsn", five.dsn)

    assert done.returncode == 0, done.stdout + done.stderr
    assert f"skip      {future}: UNVERIFIABLE: its stop LSN FF/0 is beyond the server's" in done.stdout
    assert [f.exists() for f in folders] == [False, False, False, False, True] and future.exists()
    other = linked_copy(five.backups[4], root / "other")
    reforge_backup(other, system_identifier=7000000000000000001)
    op = PostgresBackupRetentionOperator(task_id="r", root=str(root), keep_last=1, postgres_conn_id=CONN_ID)
    xcom = op.run_retention(str(root), str(archive), 1, None)
    assert xcom["skipped"][str(other)].startswith("UNVERIFIABLE: of another cluster (7000000000000000001;")
    assert list(xcom["kept"]) == [str(folders[4])] and xcom["deleted"] == []
    refused = retention_cli(*args, "--dsn", "host=/nonexistent port=1")
    assert refused.returncode == 1 and "--dsn: cannot ask the server" in refused.stderr, refused.stderr
    assert_restores(five, folders[4], archive, tmp_root)
