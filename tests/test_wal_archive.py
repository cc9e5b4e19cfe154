"""``pg-safe-backup wal-push`` and ``wal-fetch`` (pg_safe_backup.wal_archive, files/walarchive.py's stored
format) on real segments of real clusters: durable and create-only, the same file twice is success, another
file under the same name or another cluster's segment is refused, a killed push leaves nothing a fetch takes,
every compression with and without encryption round-trips, a wrong key or a changed byte fails fetch cleanly,
--parallel pushes ahead and records a file only once it is archived; then clusters archiving through wal-push
into a folder and into S3 (moto), backed up and restored through wal-fetch with every committed row."""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from demo.load import Writer, wait_archived
from demo.s3 import LocalS3, local_s3
from pg_safe_backup.files.crypt import EncryptionKey
from pg_safe_backup.files.pgcontrol import read_pg_control
from pg_safe_backup.files.walarchive import (
    COMPRESSIONS,
    IDENTITY_FILE,
    ArchiveFormatError,
    ArchiveIdentity,
    DamagedFile,
    StoredName,
    compress_chunks,
    decompress_chunks,
    is_archived_name,
)
from pg_safe_backup.files.walspool import ERROR_SUFFIX, SPOOL_SUFFIX, format_record, parse_record
from pg_safe_backup.hooks.backup import PostgresBackupHook
from pg_safe_backup.local_cluster import LocalCluster, as_server_user, give_to_server_user
from pg_safe_backup.restore import ArchiveKey, prepare_restore
from pg_safe_backup.wal_archive import PUSHER_LOCK, SPOOL_FOLDER, TEMP_FOLDER

from backup_helpers import (
    ROOT_DIR,
    archiving_cluster,
    copy_data_dir,
    recovered,
    run_backup,
    run_cli,
    store_backup_label,
)
from conftest import CONN_ID, PASSWORD

KEY_HEX = bytes(range(32)).hex()
OTHER_KEY_HEX = bytes(range(1, 33)).hex()
#: wal-fetch's status for a failure that must stop recovery (cli.FETCH_FAILED).
FETCH_FAILED = 255
BUCKET = "pgsb-wal"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def wal(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``pg-safe-backup ARGS`` (wal-push or wal-fetch) as PostgreSQL runs it, in ``cwd``."""
    return run_cli(*args, timeout=120, cwd=cwd)


def first_segment(datadir: Path) -> str:
    return min(p.name for p in (datadir / "pg_wal").iterdir() if len(p.name) == 24)


@pytest.fixture(scope="module")
def source(module_tmp_root: Path) -> Path:
    """A data directory made by initdb (not started): its first segment is the test's WAL."""
    return LocalCluster(module_tmp_root / "source" / "data").init().datadir


@pytest.fixture(scope="module")
def other(module_tmp_root: Path, source: Path) -> Path:
    """Another cluster's data directory (its own initdb: another system identifier)."""
    datadir = LocalCluster(module_tmp_root / "other" / "data").init(fresh=True).datadir
    assert read_pg_control(datadir).system_identifier != read_pg_control(source).system_identifier
    return datadir


@pytest.fixture
def archive(tmp_root: Path) -> Path:
    folder = tmp_root / "archive"
    folder.mkdir()
    return folder


@pytest.fixture
def keys(tmp_root: Path) -> dict[str, Path]:
    """Two key files: ``right`` and ``wrong``."""
    found = {}
    for name, text in (("right", KEY_HEX), ("wrong", OTHER_KEY_HEX)):
        found[name] = tmp_root / f"{name}.key"
        found[name].write_text(text + "\n")
    return found


@pytest.fixture(scope="module")
def s3() -> Iterator[LocalS3]:
    with local_s3(BUCKET) as server:
        yield server


def pushed(source: Path, archive: Path, *flags: str | Path) -> str:
    """Push ``source``'s first segment into ``archive`` (must succeed); its name."""
    name = first_segment(source)
    done = wal("wal-push", "--archive", archive, *flags, f"pg_wal/{name}", cwd=source)
    assert done.returncode == 0, done.stderr
    return name


# ------------------------------------------------------------------------------------ the stored format
def test_the_identity_file_reads_back_and_a_damaged_or_newer_one_is_refused_naming_it():
    identity = ArchiveIdentity(7381234567890123456, 17, 16 << 20)  # a 64-bit identifier, exactly
    text = identity.to_bytes()
    assert ArchiveIdentity.from_bytes(text, "x") == identity
    assert b"system_identifier = 7381234567890123456\n" in text
    for bad, says in [
        (text.replace(b"format = 1", b"format = 2"), "archive identity format '2'; this version reads 1"),
        (b"{}", "not an archive identity file"),
        (text.replace(b"major = 17\n", b""), "not an archive identity file (KeyError"),
        (text.replace(b"17", b"seventeen"), "not an archive identity file (ValueError"),
        (b"\xff\xfe", "not an archive identity file (UnicodeDecodeError"),
    ]:
        with pytest.raises(ArchiveFormatError, match=r"^s3://b/w/pg_safe_backup_archive.info: ") as err:
            ArchiveIdentity.from_bytes(bad, f"s3://b/w/{IDENTITY_FILE}")
        assert says in str(err.value)


def test_archived_names_are_those_postgresql_archives():
    """files/walarchive.is_archived_name, written out without re (pgarch.c and xlog_internal.h's names)."""
    good = [
        "000000010000000000000003",
        "000000010000000000000003.partial",
        "00000002.history",
        "000000010000000000000003.00000028.backup",
        "0000000A00000000000000FF",
    ]
    bad = [
        "",
        "00000001000000000000003",
        "0000000100000000000000030",
        "000000010000000000000003.",
        "000000010000000000000003.partial.x",
        "000000010000000000000003.gz",
        "00000002.history.gz",
        "0000002.history",
        "000000010000000000000003.0000028.backup",
        "000000010000000000000003.00000028.backupx",
        "000000010000000000000003.00000028",
        "00000001000000000000000a",
        "pg_safe_backup_archive.info",
        ".history",
    ]
    assert [n for n in good if not is_archived_name(n)] == []
    assert [n for n in bad if is_archived_name(n)] == []


@pytest.mark.parametrize("compression", ["gzip", "lz4", "zstd"])
def test_a_compressed_stream_cut_short_or_followed_by_other_bytes_does_not_decode(compression):
    plain = os.urandom(100_000) + bytes(3_000_000)
    packed = b"".join(compress_chunks([plain[:1_000_000], plain[1_000_000:]], compression))
    assert len(packed) < len(plain) // 10
    assert b"".join(decompress_chunks([packed[:1000], packed[1000:]], compression, "seg")) == plain
    with pytest.raises(DamagedFile, match=f"seg: its {compression} stream is cut short"):
        b"".join(decompress_chunks([packed[:-5]], compression, "seg"))
    with pytest.raises(DamagedFile, match=f"seg: bytes after the end of its {compression} stream"):
        b"".join(decompress_chunks([packed, b"more"], compression, "seg"))


# ------------------------------------------------------------------------------------- push and fetch
@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
@pytest.mark.parametrize("compression", list(COMPRESSIONS))
def test_a_segment_is_stored_under_its_codec_s_name_and_fetched_back_byte_for_byte(
    source, archive, keys, tmp_root, compression, encrypted
):
    key_flags = ["--encryption-key-file", keys["right"]] if encrypted else []
    name = pushed(source, archive, "--compress", compression, *key_flags)
    stored = StoredName(name, compression, encrypted).stored
    assert sorted(p.name for p in archive.iterdir()) == sorted([stored, IDENTITY_FILE, TEMP_FOLDER])
    assert list((archive / TEMP_FOLDER).iterdir()) == []
    control = read_pg_control(source)
    identity = ArchiveIdentity.from_bytes((archive / IDENTITY_FILE).read_bytes(), "identity")
    assert identity == ArchiveIdentity(control.system_identifier, 15, control.xlog_seg_size)
    target = tmp_root / "pg_wal" / "RECOVERYXLOG"
    target.parent.mkdir()
    done = wal("wal-fetch", "--archive", archive, *key_flags, name, target)
    assert done.returncode == 0, done.stderr
    assert sha256(target) == sha256(source / "pg_wal" / name)
    assert [p.name for p in target.parent.iterdir()] == ["RECOVERYXLOG"]


def test_the_same_segment_pushed_again_is_success_whatever_its_codec_and_stays_stored_once(
    source, archive, keys, monkeypatch
):
    name = pushed(source, archive, "--compress", "zstd", "--encryption-key-file", keys["right"])
    before = sorted(archive.iterdir())
    pushed(source, archive, "--compress", "zstd", "--encryption-key-file", keys["right"])
    monkeypatch.setenv("PGSB_WAL_ARCHIVE", str(archive))  # --archive's default
    monkeypatch.setenv("PGSB_TEST_KEY", KEY_HEX)
    done = wal(
        "wal-push",
        "--compress",
        "gzip",
        "--encryption-key-env",
        "PGSB_TEST_KEY",
        f"pg_wal/{name}",
        cwd=source,
    )
    assert done.returncode == 0, done.stderr
    assert sorted(archive.iterdir()) == before
    assert (archive / f"{name}.zst.enc").is_file()


def test_another_file_under_an_archived_name_is_refused_naming_both_checksums_and_the_original_kept(
    source, archive, tmp_root
):
    name = pushed(source, archive, "--compress", "lz4")
    kept = sha256(archive / f"{name}.lz4")
    changed = tmp_root / "changed" / "pg_wal" / name
    changed.parent.mkdir(parents=True)
    data = bytearray((source / "pg_wal" / name).read_bytes())
    data[5000] ^= 0xFF
    changed.write_bytes(bytes(data))
    done = wal("wal-push", "--archive", archive, changed)
    assert done.returncode == 1
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert sha256(source / "pg_wal" / name) in done.stderr
    assert sha256(changed) in done.stderr
    assert "the archived one is kept" in done.stderr
    assert sha256(archive / f"{name}.lz4") == kept


def test_a_segment_of_another_cluster_is_refused_naming_both_system_identifiers(source, other, archive):
    name = pushed(source, archive)
    # The other cluster's first segment has the same name: refused for its cluster, before any comparison.
    done = wal("wal-push", "--archive", archive, f"pg_wal/{name}", cwd=other)
    assert done.returncode == 1
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert str(read_pg_control(other).system_identifier) in done.stderr
    assert str(read_pg_control(source).system_identifier) in done.stderr
    assert sha256(archive / name) == sha256(source / "pg_wal" / name)


def test_an_archive_cp_filled_with_another_cluster_s_wal_is_refused_on_the_first_push(source, other, archive):
    name = first_segment(other)
    shutil.copy2(other / "pg_wal" / name, archive / name)  # what archive_command = cp left
    done = wal("wal-push", "--archive", archive, f"pg_wal/{first_segment(source)}", cwd=source)
    assert done.returncode == 1
    assert f"already holds WAL of system {read_pg_control(other).system_identifier} ({name})" in done.stderr
    assert not (archive / IDENTITY_FILE).exists()
    assert sha256(archive / name) == sha256(other / "pg_wal" / name)


def test_a_killed_push_leaves_nothing_a_fetch_or_the_next_push_takes(source, archive, tmp_root):
    name = first_segment(source)
    # What a push killed between its write and its link leaves: a part of the segment under a temporary name.
    (archive / TEMP_FOLDER).mkdir()
    leftover = archive / TEMP_FOLDER / f"{name}.4242.deadbeef"
    leftover.write_bytes((source / "pg_wal" / name).read_bytes()[:1000])
    target = tmp_root / "RECOVERYXLOG"
    missing = wal("wal-fetch", "--archive", archive, name, target)
    assert (missing.returncode, missing.stdout, missing.stderr) == (1, "", "")
    assert not target.exists()
    pushed(source, archive)
    assert not leftover.exists()
    done = wal("wal-fetch", "--archive", archive, name, target)
    assert done.returncode == 0, done.stderr
    assert sha256(target) == sha256(source / "pg_wal" / name)


def test_a_history_file_is_pushed_and_fetched_without_a_page_header(source, archive, tmp_root):
    pushed(source, archive)
    history = tmp_root / "data" / "pg_wal" / "00000002.history"
    history.parent.mkdir(parents=True)
    history.write_text("1\t0/3000000\tno recovery target specified\n")
    done = wal("wal-push", "--archive", archive, "--compress", "gzip", history)
    assert done.returncode == 0, done.stderr
    assert (archive / "00000002.history.gz").is_file()
    target = tmp_root / "fetched.history"
    assert wal("wal-fetch", "--archive", archive, "00000002.history", target).returncode == 0
    assert target.read_bytes() == history.read_bytes()


def test_wal_push_into_a_folder_imports_neither_psycopg_nor_an_object_store_nor_airflow(source, archive):
    """archive_command runs once per segment: the command's start is the archive's speed."""
    name = first_segment(source)
    code = (
        "import sys; from pg_safe_backup.cli import main;"
        f" code = main(['wal-push', '--archive', {str(archive)!r}, '--compress', 'zstd', 'pg_wal/{name}']);"
        " print(code, sorted({m.split('.')[0] for m in sys.modules}"
        " & {'psycopg', 'fsspec', 's3fs', 'airflow'}))"
    )
    env = {**os.environ, "PYTHONPATH": f"{ROOT_DIR / 'provider'}"}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=source, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.stdout.strip() == "0 []", done.stdout + done.stderr


# ------------------------------------------------------------------------------- failing cleanly
def test_a_wrong_key_a_missing_key_or_a_changed_byte_fails_fetch_with_one_line_and_nothing_written(
    source, archive, keys, tmp_root
):
    name = pushed(source, archive, "--compress", "zstd", "--encryption-key-file", keys["right"])
    stored = archive / f"{name}.zst.enc"
    folder = tmp_root / "pg_wal"
    folder.mkdir()
    target = folder / "RECOVERYXLOG"

    def fails(*flags: str | Path) -> str:
        done = wal("wal-fetch", "--archive", archive, *flags, name, target)
        assert done.returncode == FETCH_FAILED, done.stderr
        assert len(done.stderr.splitlines()) == 1, done.stderr
        assert list(folder.iterdir()) == []
        return done.stderr

    wrong = fails("--encryption-key-file", keys["wrong"])
    assert EncryptionKey.from_file(keys["wrong"]).key_id in wrong
    assert EncryptionKey.from_file(keys["right"]).key_id in wrong
    assert "is encrypted" in fails()
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0x01
    stored.write_bytes(bytes(data))
    assert "does not authenticate" in fails("--encryption-key-file", keys["right"])


def test_a_changed_byte_in_a_compressed_unencrypted_segment_fails_fetch(source, archive, tmp_root):
    name = pushed(source, archive, "--compress", "gzip")
    stored = archive / f"{name}.gz"
    data = bytearray(stored.read_bytes())
    # The stream's CRC-32: a byte changed in the deflate data of a segment that is mostly zeros can decode
    # to the same bytes (a back-reference into a run of zeros), which is no damage; this one always is.
    data[-8] ^= 0x01
    stored.write_bytes(bytes(data))
    target = tmp_root / "RECOVERYXLOG"
    done = wal("wal-fetch", "--archive", archive, name, target)
    assert done.returncode == FETCH_FAILED
    assert f"{stored}: not valid gzip data" in done.stderr
    assert not target.exists()


def test_a_missing_compression_library_is_one_line_naming_the_extra_and_nothing_is_stored(source, archive):
    name = first_segment(source)
    code = (
        "import sys; sys.modules['lz4'] = None; from pg_safe_backup.cli import main;"  # lz4 not installed
        f" sys.exit(main(['wal-push', '--archive', {str(archive)!r}, '--compress', 'lz4', 'pg_wal/{name}']))"
    )
    env = {**os.environ, "PYTHONPATH": f"{ROOT_DIR / 'provider'}"}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=source, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1
    assert done.stderr.strip() == (
        "pg-safe-backup wal-push: error: lz4 compression needs the lz4 package: pip install"
        " 'airflow-provider-pg-safe-backup[lz4]'"
    )
    assert list(archive.iterdir()) == []


def test_wal_fetch_errors_are_fatal_to_recovery_not_the_end_of_the_archive(archive, tmp_root):
    """PostgreSQL takes a restore_command status of 1 or 2 for "not archived" and ends recovery there: a
    usage error or a missing archive must exit above 125."""
    assert wal("wal-fetch", "--archive", archive).returncode == FETCH_FAILED
    gone = wal("wal-fetch", "--archive", tmp_root / "nowhere", "000000010000000000000001", "x")
    assert gone.returncode == FETCH_FAILED
    assert (
        gone.stderr.strip()
        == f"pg-safe-backup wal-fetch: error: --archive {tmp_root / 'nowhere'}: no such folder"
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="reads the archive as the postgres OS user (needs root)")
def test_an_archive_the_server_may_not_read_is_an_error_not_the_end_of_the_archive(source, archive, tmp_root):
    """restore_command runs as the server's OS user: "permission denied" must not read as "not archived"."""
    name = pushed(source, archive)
    os.chmod(archive, 0o700)  # root's: closed to postgres
    folder = tmp_root / "pg_wal"
    folder.mkdir()
    give_to_server_user(folder)
    env = {**os.environ, "PYTHONPATH": f"{ROOT_DIR / 'provider'}"}
    fetch = [sys.executable, "-m", "pg_safe_backup", "wal-fetch", "--archive", str(archive), name, "x"]
    done = subprocess.run(
        as_server_user(fetch), cwd=folder, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == FETCH_FAILED, done.stderr
    assert "Permission denied" in done.stderr
    assert list(folder.iterdir()) == []


def test_an_object_store_archive_that_holds_nothing_is_an_error_not_the_end_of_the_archive(
    s3, tmp_root, monkeypatch
):
    """A mistyped bucket or prefix lists nothing, as a name not archived yet would: wal-fetch says so."""
    for name, value in s3_env(s3).items():
        monkeypatch.setenv(name, value)
    for url in (f"s3://{BUCKET}/never-written", "s3://no-such-bucket/wal"):
        done = wal("wal-fetch", "--archive", url, "000000010000000000000001", tmp_root / "x")
        assert done.returncode == FETCH_FAILED, done.stderr
        assert f"the archive {url} holds nothing" in done.stderr


# ------------------------------------------------------------------------------------------- --parallel
@pytest.fixture(scope="module")
def backlog(module_tmp_root: Path) -> Iterator[LocalCluster]:
    """A running cluster with archiving on and no archive_command: its .ready files pile up (8 segments)."""
    cluster = LocalCluster(module_tmp_root / "backlog" / "data").init(
        settings={"archive_mode": "on", "archive_command": "''"}
    )
    cluster.start()
    try:
        cluster.sql("CREATE TABLE t (v text)")
        for _ in range(8):
            cluster.sql("INSERT INTO t VALUES ('x')")
            cluster.sql("SELECT pg_switch_wal()")
        yield cluster
    finally:
        cluster.stop("immediate")


def ready(cluster: LocalCluster) -> list[str]:
    status = cluster.datadir / "pg_wal" / "archive_status"
    return sorted(p.name.removesuffix(".ready") for p in status.iterdir() if p.name.endswith(".ready"))


def pusher_done(spool: Path, timeout: float = 120) -> None:
    """Until no background pusher holds ``spool``'s lock (it exits once nothing is left to push)."""
    deadline = time.monotonic() + timeout
    while True:
        fd = os.open(spool / PUSHER_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            assert time.monotonic() < deadline, f"the pusher of {spool} still runs after {timeout} s"
        finally:
            os.close(fd)
        time.sleep(0.05)


def test_parallel_pushes_every_ready_file_in_the_background_and_records_each_only_once_archived(
    backlog, archive, tmp_root
):
    names = ready(backlog)
    assert len(names) >= 8, names
    datadir = backlog.datadir
    spool = datadir / "pg_wal" / SPOOL_FOLDER

    def push(name: str) -> subprocess.CompletedProcess:
        """What PostgreSQL's archiver does: call wal-push, mark the file .done when it exits 0."""
        done = wal("wal-push", "--archive", archive, "--parallel", "3", f"pg_wal/{name}", cwd=datadir)
        if done.returncode == 0:
            status = datadir / "pg_wal" / "archive_status"
            (status / f"{name}.ready").rename(status / f"{name}.done")
        return done

    # Other content under names[4]'s name (its header still names the system): that push must fail.
    changed = tmp_root / "changed" / names[4]
    changed.parent.mkdir(parents=True)
    changed.write_bytes(b"\x01" + (datadir / "pg_wal" / names[4]).read_bytes()[1:])
    assert wal("wal-push", "--archive", archive, changed, cwd=datadir).returncode == 0  # the data directory's
    spool.mkdir()
    stale = spool / f"000000010000000000000099{SPOOL_SUFFIX}"  # a record of a file that is not .ready
    stale.write_text("{}")

    first = push(names[0])
    assert first.returncode == 0, first.stderr
    assert sha256(archive / names[0]) == sha256(datadir / "pg_wal" / names[0])
    pusher_done(spool)
    others = [n for n in names[1:] if n != names[4]]
    assert sorted(p.name for p in spool.glob(f"*{SPOOL_SUFFIX}")) == [f"{n}{SPOOL_SUFFIX}" for n in others]
    assert (spool / f"{names[4]}{ERROR_SUFFIX}").exists()  # no record: its failure, for PostgreSQL's call
    for name in others:
        body = parse_record((spool / f"{name}{SPOOL_SUFFIX}").read_text())
        assert sha256(archive / name) == sha256(datadir / "pg_wal" / name)
        assert body["size"] == str((datadir / "pg_wal" / name).stat().st_size)
        assert body["archive"] == str(archive)
    assert not stale.exists()
    # PostgreSQL's calls for files pushed ahead: answered from their records, which are used up.
    for name in names[1:4]:
        assert push(name).returncode == 0
        assert not (spool / f"{name}{SPOOL_SUFFIX}").exists()
    refused = push(names[4])
    assert refused.returncode == 1
    assert "other content" in refused.stderr
    assert (archive / names[4]).read_bytes() == changed.read_bytes()  # the archived one is kept
    pusher_done(spool)


def test_a_pusher_that_cannot_start_fails_the_call_that_started_it_with_one_line(backlog, tmp_root):
    """--parallel with an archive that is not there: the forked pusher fails and leaves its line for the call
    (not a fork per poll until the 60 s timeout)."""
    name = ready(backlog)[0]
    missing = tmp_root / "no-such-archive"
    began = time.monotonic()
    done = wal("wal-push", "--archive", missing, "--parallel", "2", f"pg_wal/{name}", cwd=backlog.datadir)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"pg-safe-backup wal-push: error: the background pusher: --archive {missing}: no such folder"
    ]
    assert time.monotonic() - began < 50, "answered by the pusher's line, not by the call's 60 s timeout"


def test_the_pusher_pushes_only_while_a_call_waits_for_what_it_pushes(backlog, tmp_root):
    """wal_archive.pusher stops when the waiting calls want another archive (archive_command changed) or
    none waited for its linger (archiving paused): it never pushes on its own. A pusher's error answers only
    a call that wants the same."""
    from pg_safe_backup.files import walspool
    from pg_safe_backup.wal_archive import pusher

    pg_wal = backlog.datadir / "pg_wal"
    names = ready(backlog)
    assert names
    archive, spool = tmp_root / "wanted-archive", tmp_root / "wanted-spool"
    archive.mkdir()
    spool.mkdir()
    wanted = f"{archive}|none||2"

    def run(linger: float = 0.2) -> list[str]:
        pusher(pg_wal, str(archive), wanted=wanted, parallel=2, spool=spool, linger=linger)
        return sorted(p.name for p in archive.iterdir() if is_archived_name(p.name))

    walspool.want(spool, f"{tmp_root / 'another-archive'}|none||2")
    assert run() == [], "another archive is wanted: this pusher stops at once"
    walspool.want(spool, wanted)
    os.utime(spool / walspool.WANTED_FILE, (time.time() - 60, time.time() - 60))
    assert run() == [], "no call waited for a minute: archiving is paused"
    walspool.want(spool, wanted)
    assert run(linger=5) == names, "wanted now: every .ready file"
    recorded, failed = walspool.listing(spool)
    assert (recorded, failed) == (set(names), set())

    walspool.write_error(spool, names[0], "a line for another archive", "elsewhere|none||2")
    assert walspool.take_error(spool, names[0], wanted) is None
    assert not (spool / f"{names[0]}{ERROR_SUFFIX}").exists(), "taken, so the file is pushed again"
    walspool.write_error(spool, names[0], f"{names[0]}: the\nreason", wanted)
    assert walspool.take_error(spool, names[0], wanted) == f"{names[0]}: the reason"


def test_a_spool_record_of_another_archive_or_other_content_is_not_taken(backlog, archive, tmp_root):
    name = ready(backlog)[-1]
    datadir = backlog.datadir
    spool = tmp_root / "spool"
    spool.mkdir()
    record = spool / f"{name}{SPOOL_SUFFIX}"
    size = (datadir / "pg_wal" / name).stat().st_size
    record.write_text(
        format_record({"name": name, "size": size, "sha256": "0" * 64, "archive": str(archive)})
    )
    done = wal("wal-push", "--archive", archive, "--spool-dir", spool, f"pg_wal/{name}", cwd=datadir)
    assert done.returncode == 0, done.stderr
    assert sha256(archive / name) == sha256(
        datadir / "pg_wal" / name
    )  # pushed, not taken on the record's word
    assert not record.exists()


def test_a_spool_record_answers_only_for_the_file_as_it_was_pushed_and_only_once(tmp_root):
    """files/walspool.py: the record names the archive and the file's size, inode and time; a file changed
    since (other bytes of the same size, or only touched) or another archive is not answered from it."""
    from pg_safe_backup.files import walspool

    segment = tmp_root / "pg_wal" / "000000010000000000000003"
    segment.parent.mkdir()
    segment.write_bytes(b"\x07" * 4096)
    spool, where = str(tmp_root / "spool"), walspool.archive_location(str(tmp_root / "archive"))

    def recorded() -> None:
        walspool.write_record(spool, segment.name, walspool.file_state(segment), where)

    recorded()
    assert walspool.answered(segment, where, spool)
    assert not walspool.answered(segment, where, spool)  # used once
    recorded()
    assert not walspool.answered(segment, where + "-other", spool)
    assert not os.path.exists(walspool.record_path(spool, segment.name))  # a record that did not match: gone
    recorded()
    with open(segment, "r+b") as f:
        f.write(b"\x08")  # the same size, other bytes
    assert not walspool.answered(segment, where, spool)
    recorded()
    os.utime(segment, ns=(1, 1))  # only touched: not the file that was pushed, as far as a record knows
    assert not walspool.answered(segment, where, spool)


def imported_by(args: list[str], cwd: Path) -> set[str]:
    """The modules ``python -m pg_safe_backup ARGS`` imports (``-X importtime``); it must exit 0."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "pg_safe_backup", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return {line.split("|")[-1].strip() for line in done.stderr.splitlines() if "|" in line}


def test_a_call_for_a_file_pushed_ahead_imports_only_the_spool(backlog, archive, tmp_root):
    """The shortcut in pg_safe_backup/__main__.py: the archiver's call for a recorded file costs a Python
    start, not the CLI's imports; and its flags are wal-push's (cli.py) that take a value."""
    import argparse

    from pg_safe_backup import __main__ as entry
    from pg_safe_backup.cli import add_wal_push_arguments

    parser = argparse.ArgumentParser()
    add_wal_push_arguments(parser)
    taking_values = {
        flag for a in parser._actions if a.option_strings and a.nargs != 0 for flag in a.option_strings
    }
    assert taking_values == set(entry._VALUE_FLAGS)

    name = ready(backlog)[-1]
    spool = tmp_root / "spool"
    segment = backlog.datadir / "pg_wal" / name
    from pg_safe_backup.files import walspool

    walspool.write_record(
        str(spool), name, walspool.file_state(segment), walspool.archive_location(str(archive))
    )
    args = [
        "wal-push",
        "--parallel",
        "2",
        f"--archive={archive}",
        "--spool-dir",
        str(spool),
        f"pg_wal/{name}",
    ]
    imported = imported_by(args, backlog.datadir)
    ours = sorted(m for m in imported if m.startswith("pg_safe_backup"))
    assert ours == [
        "pg_safe_backup",
        "pg_safe_backup.errors",
        "pg_safe_backup.files",
        "pg_safe_backup.files.walheader",
        "pg_safe_backup.files.walspool",
    ], ours
    assert not imported & {"json", "re", "pathlib", "argparse"}, imported
    assert not (archive / name).exists()  # answered from the record: nothing pushed
    assert not list(spool.iterdir())  # the record used up


def test_a_push_imports_neither_the_cli_nor_the_heavy_standard_modules(backlog, tmp_root):
    """PostgreSQL waits for each archive_command: ``wal-push`` of one file goes through __main__'s short way
    (no argparse, no CLI) and wal_archive's lean imports (counted here; its time is `make bench`'s)."""
    first, name = ready(backlog)[:2]
    archive = tmp_root / "lean"
    archive.mkdir()
    # The first push writes the archive's identity from pg_control (files/pgcontrol.py): once per archive.
    assert wal("wal-push", "--archive", archive, f"pg_wal/{first}", cwd=backlog.datadir).returncode == 0
    args = ["wal-push", "--archive", str(archive), f"pg_wal/{name}"]
    imported = imported_by(args, backlog.datadir)
    assert sha256(archive / name) == sha256(backlog.datadir / "pg_wal" / name)
    heavy = {
        "argparse",
        "pg_safe_backup.cli",
        "dataclasses",
        "typing",
        "logging",
        "pathlib",
        "shutil",
        "hashlib",
        "json",
        "re",
    }
    assert not imported & heavy, sorted(imported & heavy)


# ------------------------------------------------------------------- clusters archiving through wal-push
def s3_env(s3: LocalS3) -> dict[str, str]:
    """The moto server's credentials and endpoint as the AWS tools (and s3fs) read them."""
    return s3.environment()


def command(subcommand: str, archive: str, env: dict[str, str], *flags: str) -> str:
    """The archive_command / restore_command running this checkout's pg-safe-backup."""
    settings = " ".join(f"{k}={v}" for k, v in {"PYTHONPATH": ROOT_DIR / "provider", **env}.items())
    return f"{settings} {sys.executable} -m pg_safe_backup {subcommand} --archive {archive} {' '.join(flags)}"


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_cluster_archiving_through_wal_push_restores_through_wal_fetch_with_every_committed_row(
    where, tmp_root, monkeypatch, request
):
    key = tmp_root / "wal.key"
    key.write_text(KEY_HEX)
    give_to_server_user(key)
    if where == "local":
        archive = tmp_root / "archive"
        archive.mkdir()
        give_to_server_user(archive)
        env: dict[str, str] = {}
        push_flags = ["--compress", "zstd"]
        url = str(archive)
    else:
        s3: LocalS3 = request.getfixturevalue("s3")
        env = s3_env(s3)
        push_flags = ["--compress", "lz4", "--parallel", "4"]  # s3fs takes a second to import: 4 a process
        url = f"s3://{BUCKET}/{tmp_root.name}"
        archive = tmp_root / "no-local-archive"  # restore.py still wants a folder; the WAL comes from S3
        archive.mkdir()
        give_to_server_user(archive)
    keyed = ["--encryption-key-file", str(key)]
    push = command("wal-push", url, env, *push_flags, *keyed, "%p")
    cluster = archiving_cluster(tmp_root / "data", archive, PASSWORD, archive_command=f"'{push}'")
    monkeypatch.setenv(f"AIRFLOW_CONN_{CONN_ID.upper()}", cluster.airflow_conn_uri(password=PASSWORD))
    writer = Writer(cluster)
    try:
        cluster.sql("CREATE TABLE ledger (id bigint PRIMARY KEY, v text)")
        cluster.sql("CREATE TABLE bulk (id bigint, v text)")
        # Several segments before, during and after the backup, while the writer commits one row at a time.
        writer.start()
        cluster.sql("INSERT INTO bulk SELECT g, repeat(md5(g::text), 4) FROM generate_series(1, 150000) g")
        backup_dir = tmp_root / "backup"
        backup = run_backup(
            PostgresBackupHook(CONN_ID), "wal/run/backup", lambda: copy_data_dir(cluster.datadir, backup_dir)
        )
        store_backup_label(backup_dir, backup)
        cluster.sql(
            "INSERT INTO bulk SELECT g, repeat(md5(g::text), 4) FROM generate_series(150001, 300000) g"
        )
        committed = writer.stop()
        wait_archived(cluster, timeout=120)
        segments = cluster.sql("SELECT archived_count, failed_count FROM pg_stat_archiver")[0]
    finally:
        if writer.is_alive():
            writer.stop()
        cluster.stop("immediate")
    assert segments[0] >= 5, segments  # several segments went through wal-push
    assert not list((cluster.datadir / "pg_wal" / SPOOL_FOLDER).glob(f"*{SPOOL_SUFFIX}"))  # every record used
    target = tmp_root / "restored"
    fetch = command("wal-fetch", url, env, *keyed, "%f", "%p")
    # The archive is read with its key before anything is copied (which cluster's it is).
    prepare_restore(
        backup_dir, target, wal_archive=archive, restore_command=fetch, archive_key=ArchiveKey.from_file(key)
    )
    with recovered(target, timeout=180) as server:
        assert server.sql("SELECT count(*), max(id) FROM ledger") == [(committed, committed)]
        assert server.sql("SELECT count(*) FROM bulk") == [(300000,)]
