"""What a stored backup proves about itself (proof.py), and the catalog that only caches it: real backups of
one archiving cluster, copied (hard links) and changed per test. A backup proves itself from its label and
manifest; an empty label is incomplete, a changed one unverifiable; ``restore --latest-before`` and the
drill pass over what is incomplete, unverifiable or failed, naming each; one malformed catalog entry stops
nothing; the bare ``pg_verifybackup BACKUP`` passes on a stored backup (its catalog entry lives beside it).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from demo.load import wait_archived
from pg_safe_backup.catalog import (
    INFO_NAME,
    BackupInfo,
    append_verification,
    entry_path,
    list_backups,
    read_info,
    write_info,
)
from pg_safe_backup.files.manifest import write_backup_manifest
from pg_safe_backup.files.wal import include_wal
from pg_safe_backup.local_cluster import LocalCluster, find_bindir, give_to_server_user
from pg_safe_backup.proof import prove_backup

from backup_helpers import (
    catalogued_backup,
    cluster_with_space,
    linked_copy,
    recovered,
    restore,
    run_cli,
)


@dataclass
class Two:
    """Two catalogued backups of one cluster (rows 1-100 before the first, 101-200 before the second, 201-300
    after it), in ``root``, and the WAL archive holding all of it."""

    cluster: LocalCluster
    root: Path
    archive: Path
    infos: list[BackupInfo]
    labels: list[str]
    scratch: Path


@pytest.fixture(scope="module")
def two(module_tmp_root: Path) -> Iterator[Two]:
    with cluster_with_space(module_tmp_root) as (cluster, archive, _):
        cluster.sql("CREATE TABLE t (n int)")
        root = module_tmp_root / "backups"
        infos, labels = [], []
        for i, name in enumerate(("first", "second")):
            cluster.sql(
                "INSERT INTO t SELECT generate_series(%s::int, %s::int)", [i * 100 + 1, i * 100 + 100]
            )
            backup, info = catalogued_backup(cluster, root / name, f"proof/run{i}/backup")
            infos.append(info)
            labels.append(backup["backup_label"])
        cluster.sql("INSERT INTO t SELECT generate_series(201, 300)")
        wait_archived(cluster)
        scratch = module_tmp_root / "restores"
        scratch.mkdir()
        give_to_server_user(scratch)
        yield Two(cluster, root, archive, infos, labels, scratch)


def copy_root(two: Two, root: Path) -> Path:
    """The two backups and their catalog entries under ``root`` (hard links: cheap; a test replaces a file
    rather than write into it)."""
    root.mkdir(parents=True)
    for name in ("first", "second"):
        linked_copy(two.root / name, root / name)
        shutil.copy2(entry_path(two.root / name), entry_path(root / name))
    return root


def replace_file(path: Path, content: bytes) -> None:
    """``path`` with ``content``, as a new file (never through a hard link into the fixture's backup)."""
    path.unlink()
    path.write_bytes(content)


def test_a_stored_backup_proves_what_its_catalog_entry_says(two: Two) -> None:
    for name, info in zip(("first", "second"), two.infos, strict=True):
        proof = prove_backup(two.root / name)
        assert proof.ok, proof.status
        assert proof.status == "proven"
        assert (proof.start_lsn, proof.start_tli, proof.start_wal) == (
            info.start_lsn,
            info.timeline,
            info.start_wal,
        )
        assert (proof.stop_lsn, proof.stop_tli) == (info.stop_lsn, info.timeline)
        assert proof.system_identifier == info.system_identifier
        assert proof.manifest_checksum == info.manifest_checksum
        assert proof.start_time is not None and proof.start_time.isoformat() == info.start_time
        assert proof.format == "plain"


def test_an_empty_or_truncated_label_is_incomplete_and_a_changed_one_unverifiable(
    two: Two, tmp_root: Path
) -> None:
    root = copy_root(two, tmp_root / "b")
    label = root / "second" / "backup_label"
    text = label.read_bytes()

    replace_file(label, b"")
    assert prove_backup(root / "second").status == "incomplete: backup_label is empty"
    replace_file(label, text[: text.index(b"CHECKPOINT")])
    assert prove_backup(root / "second").status.startswith("incomplete: backup_label is truncated or damaged")
    replace_file(label, text[:-1])  # the last line cut short: only the manifest's size tells
    assert prove_backup(root / "second").status.startswith("incomplete: backup_label is ")
    replace_file(label, text.replace(b"LABEL: ", b"LABEL: X")[: len(text)])  # same size, other bytes
    assert prove_backup(root / "second").status == (
        "UNVERIFIABLE: backup_label does not match its SHA256 checksum in backup_manifest"
    )
    label.unlink()
    assert prove_backup(root / "second").status == "incomplete: no backup_label"


def test_a_changed_manifest_or_one_at_odds_with_the_label_is_unverifiable(two: Two, tmp_root: Path) -> None:
    root = copy_root(two, tmp_root / "b")
    manifest = root / "first" / "backup_manifest"
    text = manifest.read_bytes()

    replace_file(manifest, text.replace(b'"Size": ', b'"Size":  ', 1))
    assert "fails its own Manifest-Checksum" in prove_backup(root / "first").status
    replace_file(manifest, b"")
    assert "no Manifest-Checksum line" in prove_backup(root / "first").status
    manifest.unlink()
    assert prove_backup(root / "first").status == "UNVERIFIABLE: no backup_manifest"
    # A self-consistent manifest listing a label moved forward, whose WAL range still starts at the start.
    label = root / "first" / "backup_label"
    forward = two.labels[0].replace(two.infos[0].start_lsn, two.infos[1].start_lsn, 1)
    replace_file(label, forward.encode())
    write_backup_manifest(
        root / "first",
        backup_label=two.labels[0],
        stop_lsn=two.infos[0].stop_lsn,
        system_identifier=two.infos[0].system_identifier,
    )
    assert "WAL-Ranges do not start at the label's" in prove_backup(root / "first").status


def test_a_manifest_without_checksums_still_proves_the_label(two: Two, tmp_root: Path) -> None:
    root = copy_root(two, tmp_root / "b")
    summary = write_backup_manifest(
        root / "first",
        backup_label=two.labels[0],
        stop_lsn=two.infos[0].stop_lsn,
        system_identifier=two.infos[0].system_identifier,
        checksum_algorithm="NONE",
    )
    proof = prove_backup(root / "first")
    assert proof.ok, proof.status
    assert proof.manifest_checksum == summary.checksum
    bindir = find_bindir(None)
    done = subprocess.run(
        [str(bindir / "pg_verifybackup"), "-w", str(two.archive), str(root / "first")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_bare_pg_verifybackup_passes_on_a_stored_backup(two: Two, tmp_root: Path) -> None:
    """Item 12: the catalog entry lives beside the backup, so the manifest lists everything in it:
    ``pg_verifybackup -w ARCHIVE BACKUP``, and the bare ``pg_verifybackup BACKUP`` once its WAL is in it
    (the store's include_wal)."""
    verifier = str(find_bindir(None) / "pg_verifybackup")
    backup = two.root / "first"
    assert not (backup / INFO_NAME).exists()
    assert entry_path(backup).is_file()
    with_archive = subprocess.run(
        [verifier, "-w", str(two.archive), str(backup)], capture_output=True, text=True
    )
    assert with_archive.returncode == 0, with_archive.stdout + with_archive.stderr
    root = copy_root(two, tmp_root / "b")
    include_wal(root / "first", two.archive, backup_label=two.labels[0], stop_lsn=two.infos[0].stop_lsn)
    bare = subprocess.run([verifier, str(root / "first")], capture_output=True, text=True, timeout=120)
    assert bare.returncode == 0, bare.stdout + bare.stderr


def test_a_catalog_entry_inside_the_folder_is_still_read_and_moved_out_when_a_check_is_recorded(
    two: Two, tmp_root: Path
) -> None:
    root = copy_root(two, tmp_root / "b")
    entry_path(root / "first").rename(root / "first" / INFO_NAME)  # as an earlier release stored it

    (first, second) = list_backups(root)
    assert first.info == two.infos[0] and first.proof.ok, first
    info = append_verification(root / "first", {"ok": True, "by": "test"})

    assert not (root / "first" / INFO_NAME).exists()
    assert read_info(root / "first") == info
    assert info.verifications[-1]["manifest_checksum"] == two.infos[0].manifest_checksum
    assert list_backups(root)[0].verified


def listing_cli(root: Path, *args: str) -> subprocess.CompletedProcess:
    return run_cli("list", root, *args, timeout=60)


def test_one_malformed_catalog_entry_stops_nothing(two: Two, tmp_root: Path) -> None:
    """Item 9: a naive time in the newest backup's entry; list names it, --latest-before still restores."""
    root = copy_root(two, tmp_root / "b")
    entry = json.loads(entry_path(root / "second").read_text())
    entry["stop_time"] = "2026-11-26 06:00:00"  # naive
    entry_path(root / "second").write_text(json.dumps(entry))
    (root / "junk").mkdir()
    (root / "junk.backup_info.json").write_text("{not json")

    done = listing_cli(root)

    assert done.returncode == 0, done.stderr
    assert "has no time zone" in done.stdout, done.stdout
    assert (
        f"{root / 'junk'}: UNVERIFIABLE: " in done.stdout or f"{root / 'junk'}: incomplete: " in done.stdout
    )
    rows = json.loads(listing_cli(root, "--json").stdout)
    assert [r["status"] for r in rows if r["folder"] == str(root / "second")] == ["proven"]
    assert [r["info"] for r in rows if r["folder"] == str(root / "second")] == [None]

    target = two.scratch / "malformed"
    restored = restore(
        root,
        target,
        "--latest-before",
        "2100-01-01T00:00:00+00:00",
        "--wal-archive",
        two.archive,
        "--archive-mode",
        "off",
    )
    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert f"picked {root / 'second'} " in restored.stdout
    with recovered(target) as server:
        assert server.sql("SELECT count(*), sum(n) FROM t") == [(300, sum(range(1, 301)))]


def test_latest_before_passes_over_incomplete_and_failed_backups_naming_each(
    two: Two, tmp_root: Path
) -> None:
    """Item 6: the newest backup's label is empty: take the one before, saying why; a failed newest check
    is passed over too, unless --allow-failed."""
    root = copy_root(two, tmp_root / "b")
    append_verification(root / "second", {"ok": False, "by": "test"})
    later = "2100-01-01T00:00:00+00:00"

    replace_file(root / "first" / "backup_label", b"")  # the older one incomplete: nothing fits
    none = restore(root, two.scratch / "never", "--latest-before", later, "--wal-archive", two.archive)
    assert none.returncode == 1, none.stdout
    assert f"skipped {root / 'second'}: its newest check FAILED" in none.stdout
    assert f"skipped {root / 'first'}: incomplete: backup_label is empty" in none.stdout
    assert "no backup under" in none.stderr and not (two.scratch / "never").exists()
    replace_file(root / "first" / "backup_label", (two.root / "first" / "backup_label").read_bytes())

    target = two.scratch / "before_failed"
    done = restore(
        root, target, "--latest-before", later, "--wal-archive", two.archive, "--archive-mode", "off"
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"skipped {root / 'second'}: its newest check FAILED" in done.stdout
    assert f"picked {root / 'first'} " in done.stdout
    with recovered(target) as server:
        assert server.sql("SELECT count(*), sum(n) FROM t") == [(300, sum(range(1, 301)))]

    allowed = restore(
        root,
        two.scratch / "allowed",
        "--latest-before",
        later,
        "--wal-archive",
        two.archive,
        "--allow-failed",
    )
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr
    assert f"picked {root / 'second'} " in allowed.stdout


def test_the_drill_chooses_as_latest_before_does(
    two: Two, tmp_root: Path, capsys: pytest.CaptureFixture
) -> None:
    """The drill's "newest backup and its age" pass over an incomplete newest backup, naming it; its age is
    the label's START TIME (a tiny max_age makes it refuse before restoring, naming its choice)."""
    from airflow.providers.common.compat.sdk import AirflowFailException

    from pg_safe_backup.operators.lifecycle import PostgresRestoreDrillOperator

    root = copy_root(two, tmp_root / "b")
    replace_file(root / "second" / "backup_label", b"")
    info = read_info(root / "first")
    info.stop_time = (datetime.now(timezone.utc) + timedelta(days=30)).isoformat()  # a clock in the JSON
    write_info(root / "first", info)
    op = PostgresRestoreDrillOperator(task_id="drill", root=str(root), max_age=0.001)
    with pytest.raises(AirflowFailException) as refused:
        op.execute({})
    assert f"the newest backup under {root} ({root / 'first'}) is " in str(refused.value), refused.value
    assert f"passing over {root / 'second'}: incomplete: backup_label is empty" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (lambda entry: "{not json", "is not JSON"),
        (lambda entry: json.dumps({**entry, "stop_time": "2026-11-26 06:00:00"}), "has no time zone"),
        (lambda entry: json.dumps({**entry, "stop_time": "yesterday"}), "is not an ISO 8601 time"),
        (lambda entry: json.dumps({**entry, "stop_lsn": 5}), "stop_lsn is 5, not str"),
        (lambda entry: json.dumps({**entry, "timeline": "1"}), "timeline is '1', not int"),
        (lambda entry: json.dumps({**entry, "verifications": {"ok": True}}), "verifications is not a list"),
        (lambda entry: json.dumps([entry]), "is not a JSON object"),
    ],
)
def test_a_malformed_entry_is_named_and_its_backup_still_proven_from_disk(
    two: Two, tmp_root: Path, change, named
):
    root = copy_root(two, tmp_root / "b")
    entry = json.loads(entry_path(root / "first").read_text())
    entry_path(root / "first").write_text(change(entry))

    first, second = list_backups(root)

    assert first.info is None and named in str(first.info_error), first.info_error
    assert first.proof.ok and first.proof.stop_lsn == two.infos[0].stop_lsn, first.proof.status
    assert second.info == two.infos[1]
