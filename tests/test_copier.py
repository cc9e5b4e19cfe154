"""The copy engine (files/copier.py) on real clusters: a backup copied under write load while the server
drops a table and VACUUM truncates another passes the page-LSN check, pg_verifybackup (its manifest from
the copy's own checksums) and the restore check; a standby copied by it restores; what it refuses.

The drop and the truncation run from the progress callback's first call, which comes once the files are
listed and before any is copied: the files were listed, then vanished or shrank, as on a busy server.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from demo.load import Writer, invariant_sql, wait_archived
from pg_safe_backup.files.copier import (
    CopyError,
    CopyResult,
    DestinationNotEmpty,
    Progress,
    copy_data_directory,
    copy_tree,
    sync_tree,
)
from pg_safe_backup.files.label import LABEL_FILES
from pg_safe_backup.files.layout import CONTROL_FILE
from pg_safe_backup.files.manifest import (
    FileRecord,
    ManifestError,
    ManifestSummary,
    WalRange,
    manifest_of_records,
    write_backup_manifest,
    write_manifest,
)
from pg_safe_backup.hooks.backup import PostgresBackupHook
from pg_safe_backup.local_cluster import LocalCluster
from pg_safe_backup.verify import BackupCheck, check_backup

from backup_helpers import cluster_with_space, pair_maker, run_backup, store_backup_label
from conftest import CONN_ID
from pg_versions import verifier_for

ROWS = 20_000
KEPT = 2_000  # rows of the truncated table that stay


@dataclass
class Live:
    """An archiving cluster with a tablespace: ``ledger`` (written by a writer during the backup), and
    ``doomed`` and ``shrinking`` (in the tablespace), dropped and truncated by VACUUM during the copy."""

    cluster: LocalCluster
    archive: Path
    root: Path
    major: int
    doomed: str  # relation files, relative to the data directory
    shrinking: str


@dataclass
class Copied:
    """The backup the engine copied from :class:`Live`, and what happened during it."""

    copy: Path
    result: CopyResult
    backup: dict
    committed: int  # rows the writer committed before the copy ended
    shrinking_listed: int  # the truncated table's size when the files were listed
    calls: list[Progress] = field(default_factory=list)


def _setup_sql(cluster: LocalCluster, location: Path) -> None:
    cluster.sql(f"CREATE TABLESPACE space1 LOCATION '{location}'")
    cluster.sql("CREATE TABLE ledger (id bigint PRIMARY KEY, v text)")
    for table, space in (("doomed", ""), ("shrinking", " TABLESPACE space1")):
        cluster.sql(f"CREATE TABLE {table} (id bigint, v text){space}")
        cluster.sql(f"INSERT INTO {table} SELECT g, md5(g::text) FROM generate_series(1, {ROWS}) g")
    cluster.sql("CHECKPOINT")


def _manifest_and_checks(
    copy: Path, backup: dict, archive: Path, result: CopyResult, invariant: str
) -> tuple[BackupCheck, ManifestSummary | None]:
    """Write the copy's backup_manifest from the engine's checksums (13+), then run every check of it.

    The stop LSN is given, as the store task has it: without a manifest (12) the check would look for
    it in the archive's backup history files, and a standby writes none (the one found with the same
    START WAL LOCATION is the primary's backup the standby was made from).
    """
    major = int((copy / "PG_VERSION").read_text())
    summary = write_backup_manifest(  # PostgreSQL 12 too: version 1
        copy,
        backup_label=backup["backup_label"],
        stop_lsn=backup["stop_lsn"],
        system_identifier=backup["system_identifier"],
        checksums=result.checksums,
    )
    verifier = (verifier_for(major) or [None])[0]
    checked = check_backup(
        copy, archive, stop_lsn=backup["stop_lsn"], verifier_bindir=verifier, invariant_sql=invariant
    )
    return checked, summary


@pytest.fixture(scope="module")
def live(module_tmp_root: Path) -> Iterator[Live]:
    with cluster_with_space(module_tmp_root) as (cluster, archive, location):
        _setup_sql(cluster, location)
        paths = {
            t: cluster.sql("SELECT pg_relation_filepath(%s)", [t])[0][0] for t in ("doomed", "shrinking")
        }
        major = cluster.server_version() // 10000
        yield Live(cluster, archive, module_tmp_root, major, paths["doomed"], paths["shrinking"])


@pytest.fixture(scope="module")
def copied(live: Live) -> Copied:
    """One backup of ``live`` under write load, copied by the engine; during the copy ``doomed`` is dropped
    (its file vanishes once a checkpoint unlinks it) and VACUUM truncates ``shrinking``."""
    cluster, copy = live.cluster, live.root / "backup"
    calls: list[Progress] = []
    listed: dict[str, int] = {}

    def during(p: Progress) -> None:
        calls.append(p)
        if len(calls) == 1:
            listed["size"] = (cluster.datadir / live.shrinking).stat().st_size
            cluster.sql("DROP TABLE doomed")
            cluster.sql(f"DELETE FROM shrinking WHERE id > {KEPT}")
            cluster.sql("VACUUM shrinking")
            cluster.sql("CHECKPOINT")  # unlinks the dropped table's first segment (mdunlink)

    writer = Writer(cluster)
    writer.start()
    done: dict = {}

    def copy_it() -> None:
        done["result"] = copy_data_directory(cluster.datadir, copy, progress=during, progress_interval=0.2)
        done["committed"] = writer.committed  # before pg_backup_stop: all of them must be restored

    try:
        backup = run_backup(PostgresBackupHook(CONN_ID), "nightly/run1/engine", copy_it)
    finally:
        writer.stop()
    store_backup_label(copy, backup)
    wait_archived(cluster)
    return Copied(copy, done["result"], backup, done["committed"], listed["size"], calls)


def test_a_backup_under_load_with_a_drop_and_a_truncation_passes_every_check(live, copied):
    result = copied.result
    assert live.doomed in result.vanished
    assert result.sizes[live.shrinking] < copied.shrinking_listed  # copied as read, after VACUUM truncated it
    assert (copied.copy / live.shrinking).stat().st_size == result.sizes[live.shrinking]
    assert live.shrinking.startswith("pg_tblspc/")
    assert not (copied.copy / "pg_tblspc").joinpath(live.shrinking.split("/")[1]).is_symlink()
    assert f"{len(result.vanished)} vanished during the copy" in result.summary()
    first, last = copied.calls[0], copied.calls[-1]
    assert first.files_done == 0 and first.done_bytes == 0
    assert last.files_done == last.files_total
    assert last.done_bytes == result.bytes
    invariant = invariant_sql(("ledger",), copied.committed) + (
        f"\nUNION ALL\nSELECT count(*) = {KEPT}, format('shrinking: %s rows', count(*)) FROM shrinking"
    )
    report, summary = _manifest_and_checks(copied.copy, copied.backup, live.archive, result, invariant)
    if summary is not None:
        # Only the label files, written after the copy, are read: every copied file's checksum was given.
        labels = sum(
            (copied.copy / name).stat().st_size for name in LABEL_FILES if (copied.copy / name).exists()
        )
        assert summary.hashed_bytes == labels
    assert report.ok, report.summary()
    statuses = [step.status for step in report.steps]
    assert statuses == ["PASS", "PASS", "PASS"], report.summary()


def test_pg_control_is_the_last_file_written(copied):
    assert list(copied.result.checksums)[-1] == CONTROL_FILE
    # The copies keep their sources' mtimes: their ctimes tell when each was finished.
    finished = {
        rel: (copied.copy / rel).stat().st_ctime_ns for rel in copied.result.checksums if rel != CONTROL_FILE
    }
    assert max(finished.values()) <= (copied.copy / CONTROL_FILE).stat().st_ctime_ns
    assert (
        copied.result.checksums[CONTROL_FILE]
        == hashlib.sha256((copied.copy / CONTROL_FILE).read_bytes()).hexdigest()
    )


def test_a_standby_copied_by_the_engine_restores(tmp_root, monkeypatch):
    with pair_maker(tmp_root, monkeypatch) as make:
        pair = make(writing=True)
        pair.replayed()
        before = pair.writer.committed
        copy, done = tmp_root / "copy", {}

        def during(p: Progress) -> None:
            if p.files_done == 0 and "rows" not in done:
                done["rows"] = True
                pair.more_rows_on_disk()  # pages written to the standby's disk during its backup

        def copy_it() -> None:
            done["result"] = copy_data_directory(pair.standby.datadir, copy, progress=during)

        backup = run_backup(pair.hook, "nightly/run1/standby-engine", copy_it)
        pair.writer.stop()
        store_backup_label(copy, backup)
        wait_archived(pair.primary)
        report, _ = _manifest_and_checks(
            copy, backup, pair.archive, done["result"], invariant_sql(("ledger",), before + 300)
        )
    assert list(done["result"].checksums)[-1] == CONTROL_FILE
    assert report.ok, report.summary()
    assert report.step("restore check").status == "PASS", report.summary()


def test_a_destination_holding_a_backup_is_refused_and_overwrite_empties_it(live, tmp_root):
    dest, outside = tmp_root / "dest", tmp_root / "outside"
    dest.mkdir()
    outside.mkdir()
    (dest / "backup_label").write_text("START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\n")
    (dest / "PG_VERSION").write_text("9.6\n")
    (outside / "keep").write_text("not the copy's")
    os.symlink(outside, dest / "linked")
    with pytest.raises(
        DestinationNotEmpty, match=rf"{re.escape(str(dest))} already holds a backup.*backup_label"
    ):
        copy_data_directory(live.cluster.datadir, dest)
    assert (dest / "backup_label").exists()  # untouched
    result = copy_data_directory(live.cluster.datadir, dest, overwrite=True, fsync=False)
    assert not (dest / "backup_label").exists()
    assert not (dest / "linked").exists()
    assert (outside / "keep").read_text() == "not the copy's"  # the link was removed, not followed
    assert (dest / "PG_VERSION").read_text() == (live.cluster.datadir / "PG_VERSION").read_text()
    assert result.checksums["PG_VERSION"] == hashlib.sha256((dest / "PG_VERSION").read_bytes()).hexdigest()
    for inside in (live.cluster.datadir / "base" / "copy", live.root / "space1" / "copy", live.root):
        with pytest.raises(CopyError, match="overlap"):
            copy_data_directory(live.cluster.datadir, inside, overwrite=True)
    assert (live.cluster.datadir / "PG_VERSION").exists()


@pytest.fixture
def cold(live: Live, tmp_root: Path) -> Path:
    """A copy of ``live``'s data directory, as a source to damage."""
    copy_data_directory(live.cluster.datadir, tmp_root / "src", fsync=False)
    return tmp_root / "src"


def test_vanished_grown_and_special_files_are_copied_as_pg_basebackup_sends_them(cold, tmp_root):
    databases = sorted((p for p in (cold / "base").iterdir() if p.is_dir()), key=lambda p: p.name)
    gone = databases[0]
    gone_files = sorted(f"base/{gone.name}/{f.name}" for f in gone.iterdir())
    grown = cold / "postgresql.conf"
    original = grown.read_bytes()
    os.mkfifo(cold / "base" / "fifo")  # would block a plain open() for ever

    def during(p: Progress) -> None:
        if p.files_done == 0:
            shutil.rmtree(gone, ignore_errors=True)  # a database dropped after the listing
            with grown.open("ab") as f:
                f.write(b"# written after the listing\n")

    result = copy_data_directory(cold, tmp_root / "copy", progress=during, progress_interval=60)
    assert set(gone_files) <= set(result.vanished)
    assert (tmp_root / "copy" / "base" / gone.name).is_dir()
    assert list((tmp_root / "copy" / "base" / gone.name).iterdir()) == []
    assert result.sizes["postgresql.conf"] == len(original)  # read up to its size when listed
    assert result.checksums["postgresql.conf"] == hashlib.sha256(original).hexdigest()
    assert (tmp_root / "copy" / "postgresql.conf").read_bytes() == original
    assert result.special == ["base/fifo"]
    assert "; 1 special files skipped (base/fifo)" in result.summary()
    assert not (tmp_root / "copy" / "base" / "fifo").exists()


def test_a_file_replaced_by_a_folder_fails_the_copy_naming_it(cold, tmp_root):
    victim = max((f for f in (cold / "base").rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)

    def during(p: Progress) -> None:
        if p.files_done == 0:
            victim.unlink()
            victim.mkdir()

    with pytest.raises(CopyError, match=rf"{re.escape(str(victim))} \(base/.*\) is a folder now"):
        copy_data_directory(cold, tmp_root / "copy", progress=during, progress_interval=60)


def test_the_summary_names_what_was_left_out_or_changed():
    result = CopyResult(files=3, bytes=3 << 20, seconds=2.0, vanished=[f"base/5/{n}" for n in range(6)])
    result.shrunk, result.empty_folders = ["base/5/16384"], ["pg_notify", "pg_replslot"]
    assert result.summary() == (
        "copied 3 files, 3.0 MB in 2.0 s (1.5 MB/s); 6 vanished during the copy"
        " (base/5/0, base/5/1, base/5/2, base/5/3, base/5/4, ...); 1 shrank while copied (base/5/16384);"
        " 2 empty folders listed (pg_notify, pg_replslot)"
    )
    assert CopyResult().summary() == "copied 0 files, 0.0 MB in 0.0 s (0.0 MB/s); 0 vanished during the copy"


def test_the_manifest_of_the_records_is_the_manifest_of_the_copy_byte_for_byte(live, cold, tmp_root):
    """What an object store or tar copy gets (no file read back) is what write_manifest() writes of the same
    copy on disk: same files, order, sizes, times and checksums."""
    copy = tmp_root / "copy"
    result = copy_data_directory(cold, copy, fsync=False)
    (copy / "postgresql.auto.conf").write_text("# passed over by pg_verifybackup: not listed\n")
    ranges = [WalRange(1, "0/2000028", "0/2000100")]
    records = {
        path: FileRecord(result.sizes[path], result.mtimes_ns[path], digest)
        for path, digest in result.checksums.items()
    }
    from_records = manifest_of_records(records, major=live.major, system_identifier=7, wal_ranges=ranges)
    write_manifest(copy, major=live.major, system_identifier=7, wal_ranges=ranges)
    assert from_records == (copy / "backup_manifest").read_bytes()
    assert from_records.count(b'"Path": ') == result.files - 1  # postgresql.auto.conf passed over
    with pytest.raises(ManifestError, match="SHA256 or NONE checksums, not 'SHA512'"):
        manifest_of_records(
            records, major=live.major, system_identifier=7, wal_ranges=ranges, checksum_algorithm="sha512"
        )


def test_copy_tree_copies_a_folder_as_it_is_links_followed_with_modes_times_and_top_names_left_out(tmp_path):
    """files/copier.copy_tree (a restore's copy): the engine's workers over a plain folder."""
    src, outside, dst = tmp_path / "src", tmp_path / "outside", tmp_path / "dst"
    (src / "base" / "5").mkdir(parents=True)
    outside.mkdir()
    big = os.urandom(3 << 20)
    (src / "base" / "5" / "16384").write_bytes(big)
    (src / "PG_VERSION").write_text("15\n")
    os.chmod(src / "PG_VERSION", 0o640)
    os.utime(src / "PG_VERSION", ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    (outside / "linked.conf").write_text("work_mem = 7MB\n")
    (src / "linked.conf").symlink_to(outside / "linked.conf")
    (src / "dangling").symlink_to(tmp_path / "nothing")
    (src / "pg_wal").mkdir()
    (src / "pg_wal" / "000000010000000000000001").write_bytes(b"w" * 100)
    (src / "postmaster.pid").write_text("1\n")

    result = copy_tree(src, dst, skip_top={"pg_wal", "postmaster.pid"}, workers=3)

    assert sorted(str(p.relative_to(dst)) for p in dst.rglob("*")) == [
        "PG_VERSION",
        "base",
        "base/5",
        "base/5/16384",
        "linked.conf",
    ]
    assert (dst / "base" / "5" / "16384").read_bytes() == big
    assert not (dst / "linked.conf").is_symlink()
    assert (dst / "linked.conf").read_text() == "work_mem = 7MB\n"
    assert oct((dst / "PG_VERSION").stat().st_mode & 0o777) == "0o640"
    assert (dst / "PG_VERSION").stat().st_mtime_ns == 1_600_000_000_000_000_000
    assert (result.files, result.bytes) == (3, len(big) + 3 + 15)
    assert result.checksums["base/5/16384"] == hashlib.sha256(big).hexdigest()

    with pytest.raises(DestinationNotEmpty):
        copy_tree(src, dst)


def test_sync_tree_keeps_the_same_rewrites_the_rest_and_removes_what_the_source_lacks_never_through_a_link(
    tmp_path,
):
    """files/copier.sync_tree (restore --delta): the destination ends as copy_tree would make it."""
    src, dst, outside = tmp_path / "src", tmp_path / "dst", tmp_path / "outside"
    for folder in (src / "base" / "5", dst / "base" / "5", outside / "base"):
        folder.mkdir(parents=True)
    (src / "base" / "5" / "1").write_bytes(b"same" * 1000)
    (src / "base" / "5" / "2").write_bytes(b"new" * 1000)
    (src / "global").mkdir()
    (src / "global" / "pg_control").write_bytes(b"control")
    (src / "skipped").write_text("never copied")
    (dst / "base" / "5" / "1").write_bytes(b"same" * 1000)
    os.chmod(dst / "base" / "5" / "1", 0o644)
    (dst / "base" / "5" / "2").write_bytes(b"old" * 1000)  # same size, other bytes
    (dst / "base" / "5" / "3").write_bytes(b"dropped table")
    (dst / "global").write_text("a file where the source has a folder")
    (outside / "base" / "precious").write_text("not ours")
    (dst / "linked").symlink_to(outside / "base")  # removed as a link, never followed
    (dst / "skipped").write_text("removed: the source leaves it out")
    (dst / "mark").write_text("the caller's")

    synced = sync_tree(src, dst, skip_top={"skipped"}, keep_top={"mark"}, workers=2)

    assert synced.kept == 1
    assert sorted(synced.removed) == ["base/5/3", "global", "linked", "skipped"]
    assert sorted(synced.copied.sizes) == ["base/5/2", "global/pg_control"]
    assert (dst / "base" / "5" / "2").read_bytes() == b"new" * 1000
    assert oct((dst / "base" / "5" / "1").stat().st_mode & 0o777) == oct(
        (src / "base" / "5" / "1").stat().st_mode & 0o777
    )
    assert (outside / "base" / "precious").read_text() == "not ours"
    assert (dst / "mark").read_text() == "the caller's"
    assert {k: v for k, v in tree_of(dst).items() if k != "mark"} == tree_of(src, skip={"skipped"})


def tree_of(folder: Path, skip: set[str] = frozenset()) -> dict[str, bytes | None]:
    """Each path under ``folder`` (its top names in ``skip`` left out): a file's bytes, None for a folder."""
    out: dict[str, bytes | None] = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if rel.parts[0] not in skip:
            out[str(rel)] = None if path.is_dir() else path.read_bytes()
    return out
