"""Encryption at rest of the copies stored outside the cluster (:mod:`pg_safe_backup.encryption`).

One real backup of a cluster with a tablespace, copied during the backup by the copy operator twice with
``encryption_conn_id``: as zstd tar archives into a local folder and as files into a real S3 API (the moto
server, as tests/test_object_storage.py uses it); the store operator writes each copy's label files and
manifest encrypted with the same connection's key. Each copy is then restored by ``pg-safe-backup restore``
with the key and its rows counted; without the key, with another key, and after a flipped byte, restore,
verify and list each fail in one line naming the flag or the key id, and nothing is restored. The key's
bytes are nowhere in what is stored, in the catalog entries or in what the tasks hand over through XCom.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from airflow.providers.common.compat.sdk import AirflowFailException
from airflow.sdk import ObjectStoragePath

from demo.load import wait_archived
from demo.s3 import KEY as S3_KEY
from demo.s3 import SECRET as S3_SECRET
from demo.s3 import LocalS3, local_s3
from pg_safe_backup.catalog import entry_path, list_backups, read_info
from pg_safe_backup.cli import NO_VERDICT, USAGE
from pg_safe_backup.encryption import backup_key_id, decrypt_backup
from pg_safe_backup.files.crypt import SUFFIX, EncryptionKey
from pg_safe_backup.files.manifest import manifest_version
from pg_safe_backup.files.objects import FOLDERS_NAME, download_tree, list_stored
from pg_safe_backup.hooks.backup import PostgresBackupHook
from pg_safe_backup.local_cluster import LocalCluster, give_to_server_user
from pg_safe_backup.operators.backup import PostgresStoreBackupLabelOperator
from pg_safe_backup.operators.copy import PostgresCopyDataDirectoryOperator
from pg_safe_backup.proof import prove_backup
from pg_safe_backup.store import CopyRecords, StoreRefused, check_encryption
from pg_safe_backup.utils.mixins import encryption_key

from backup_helpers import cluster_with_space, recovered, restore, run_backup, run_cli
from conftest import CONN_ID

BUCKET = "pgsb-encrypted"
S3_CONN = "pgsb_moto_enc"
#: The Airflow connection whose password is the key.
KEY_CONN = "pgsb_backup_key"
KEY_TEXT = os.urandom(32).hex()
KEY = EncryptionKey.parse(KEY_TEXT, "the test's key")
OTHER = EncryptionKey(os.urandom(32))
#: A value in a row: found in no stored byte once the copy is encrypted.
MARKER = "pgsb-plaintext-marker-0123456789"
FINISH_KEYS = ("backup_label", "tablespace_map", "system_identifier", "stop_lsn")


@dataclass
class Encrypted:
    """The backup, its two encrypted copies, and everything the tasks handed over (their XCom)."""

    cluster: LocalCluster
    archive: Path
    backup: dict
    root: Path
    tar: Path  # the local folder of the tar archives
    s3: ObjectStoragePath  # the prefix of the object-store copy
    s3_tar: ObjectStoragePath  # the prefix of the tar archives in the object store
    xcom: list[Any]  # each copy task's return value and records, each store's return value
    logs: list[str]  # every log line of the copy and store tasks
    oid: str  # the tablespace's
    key_file: Path
    other_key_file: Path
    server: LocalS3

    def url(self, prefix: ObjectStoragePath) -> tuple[str, list[str]]:
        """The CLI's URL of ``prefix`` (no Airflow connection) and the ``--storage-option`` flags that reach
        the S3 server."""
        options = [f"endpoint_url={self.server.endpoint_url}", f"key={S3_KEY}", f"secret={S3_SECRET}"]
        return f"s3://{prefix.path.strip('/')}", [f for o in options for f in ("--storage-option", o)]


class Collected(logging.Handler):
    """Every log line, formatted with its arguments, as a task log shows it."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def enc(module_tmp_root: Path) -> Iterator[Encrypted]:
    root = module_tmp_root
    env = pytest.MonkeyPatch()
    env.setenv(f"AIRFLOW_CONN_{KEY_CONN.upper()}", json.dumps({"conn_type": "generic", "password": KEY_TEXT}))
    with local_s3(BUCKET) as server, cluster_with_space(root) as (cluster, archive, location):
        bucket = server.attach(S3_CONN)
        cluster.sql(f"CREATE TABLESPACE space1 LOCATION '{location}'")
        cluster.sql("CREATE TABLE ledger (id bigint PRIMARY KEY, v text)")
        cluster.sql("CREATE TABLE spaced (id bigint, v text) TABLESPACE space1")
        cluster.sql(f"INSERT INTO ledger SELECT g, '{MARKER}' FROM generate_series(1, 5000) g")
        cluster.sql("INSERT INTO spaced SELECT g, md5(g::text) FROM generate_series(1, 3000) g")
        cluster.sql("CHECKPOINT")
        tar, s3 = root / "backups" / "tar", bucket / "backups" / "plain"
        s3_tar = bucket / "backups" / "tar"
        copies = {
            str(tar): PostgresCopyDataDirectoryOperator(
                task_id="copy_tar",
                source=str(cluster.datadir),
                destination=str(tar),
                format="tar",
                compression="zstd",
                encryption_conn_id=KEY_CONN,
            ),
            str(s3): PostgresCopyDataDirectoryOperator(
                task_id="copy_s3",
                source=str(cluster.datadir),
                destination=str(s3),
                encryption_conn_id=KEY_CONN,
            ),
            str(s3_tar): PostgresCopyDataDirectoryOperator(
                task_id="copy_s3_tar",
                source=str(cluster.datadir),
                destination=str(s3_tar),
                format="tar",
                compression="gzip",
                encryption_conn_id=KEY_CONN,
            ),
        }
        copied: dict[str, tuple[dict, CopyRecords | None]] = {}

        def copy() -> None:
            for destination, task in copies.items():
                copied[destination] = task.copy(cluster.datadir, destination)

        store = PostgresStoreBackupLabelOperator(
            task_id="store", backup="finish", destination="unused", encryption_conn_id=KEY_CONN
        )
        xcom: list[Any] = []
        # The tasks' log: their structlog lines go to stdout, the domain modules' through logging.
        logs, printed = Collected(), io.StringIO()
        logging.getLogger().addHandler(logs)
        try:
            with contextlib.redirect_stdout(printed):
                backup = run_backup(PostgresBackupHook(CONN_ID), "encrypted/run/backup", copy)
                for destination, (summary, records) in copied.items():
                    assert records is not None
                    pushed = json.loads(json.dumps(records.to_xcom()))  # through XCom's JSON, as stored
                    finished = {key: backup[key] for key in FINISH_KEYS}
                    written = store.store(destination, finished, CopyRecords.from_xcom([pushed]))
                    xcom += [summary, pushed, written]
        finally:
            logging.getLogger().removeHandler(logs)
        logs.lines.append(printed.getvalue())
        wait_archived(cluster)
        scratch = root / "restores"
        scratch.mkdir()
        give_to_server_user(scratch)
        (root / "key").write_text(KEY_TEXT + "\n")
        (root / "other.key").write_text(base64.b64encode(OTHER.material).decode())
        oid = str(cluster.sql("SELECT oid FROM pg_tablespace WHERE spcname = 'space1'")[0][0])
        keys = (root / "key", root / "other.key")
        yield Encrypted(
            cluster, archive, backup, scratch, tar, s3, s3_tar, xcom, logs.lines, oid, *keys, server
        )
    env.undo()


def restore_args(enc: Encrypted, backup: Path | str, name: str, *key: str) -> list[str | Path]:
    """``pg-safe-backup restore`` of ``backup`` into ``root/<name>`` to the end of the archive, its
    tablespace into ``root/<name>_space``, with the ``key`` flags."""
    return [
        backup,
        enc.root / name,
        "--wal-archive",
        enc.archive,
        "--tablespace",
        f"{enc.oid}={enc.root / f'{name}_space'}",
        *key,
    ]


def rows(server: LocalCluster) -> tuple[Any, ...]:
    ((ledger, total, marked),) = server.sql(
        f"SELECT count(*), sum(id), count(*) FILTER (WHERE v = '{MARKER}') FROM ledger"
    )
    ((spaced,),) = server.sql("SELECT count(*) FROM spaced")
    return ledger, total, marked, spaced


#: What each restore must hold: every row committed before the backup.
ROWS = (5000, 12502500, 5000, 3000)


def downloaded(enc: Encrypted, name: str, prefix: ObjectStoragePath | None = None) -> Path:
    """An object-store copy (default: the plain one) downloaded as it is stored (encrypted) into
    ``root/<name>``."""
    folder = enc.root / name
    download_tree(prefix or enc.s3, folder)
    return folder


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


@pytest.mark.parametrize("where, compression", [("local", "zst"), ("s3", "gz")])
def test_an_encrypted_tar_copy_restores_with_its_key_and_holds_its_rows(enc, where, compression):
    """From a local folder (chosen from its root), or straight from the object store's URL: each archive
    decrypted and extracted as it streams, no decrypted copy on disk."""
    folder = enc.tar if where == "local" else enc.s3_tar
    names = {p.name for p in folder.iterdir()}
    assert names == {
        f"base.tar.{compression}{SUFFIX}",
        f"{enc.oid}.tar.{compression}{SUFFIX}",
        f"backup_label{SUFFIX}",
        f"tablespace_map{SUFFIX}",
        f"backup_manifest{SUFFIX}",
    }
    assert backup_key_id(folder) == KEY.key_id
    target = f"tar_{where}"
    key = ["--encryption-key-file", enc.key_file]
    if where == "local":  # chosen from the root: proven with the key, as the newest before a time
        key += ["--latest-before", "2100-01-01T00:00:00Z"]
    if where == "s3":
        url, flags = enc.url(folder)
        done = restore(*restore_args(enc, url, target, *key, *flags))
    else:
        done = restore(*restore_args(enc, folder.parent, target, *key))
    assert done.returncode == 0, done.stderr
    assert where != "local" or f"picked {folder} " in done.stdout, done.stdout
    assert not [p for p in enc.root.iterdir() if ".decrypting-" in p.name], "the decrypted copy is removed"
    with recovered(enc.root / target) as server:
        assert rows(server) == ROWS


def test_an_encrypted_object_store_copy_restores_with_its_key_and_holds_its_rows(enc, monkeypatch):
    """Restored from the URL alone: each file downloaded and decrypted into the target as it arrives."""
    stored = list_stored(enc.s3)
    assert len(stored) > 900  # every file of the data directory
    assert all(name.endswith(SUFFIX) for name in stored if name != FOLDERS_NAME), "every file is encrypted"
    assert FOLDERS_NAME in stored  # the names of empty folders only, not encrypted
    monkeypatch.setenv("PGSB_TEST_KEY", KEY_TEXT)
    url, flags = enc.url(enc.s3)
    done = restore(*restore_args(enc, url, "s3", "--encryption-key-env", "PGSB_TEST_KEY", *flags))
    assert done.returncode == 0, done.stderr
    with recovered(enc.root / "s3") as server:
        assert rows(server) == ROWS


def test_without_the_key_restore_verify_and_list_say_in_one_line_which_key_and_which_flag(enc):
    done = restore(*restore_args(enc, enc.tar, "no_key"))
    assert done.returncode == 1
    line = one_line(done.stderr)
    assert KEY.key_id in line and "--encryption-key-file" in line and "--encryption-key-env" in line, line
    assert not (enc.root / "no_key").exists(), "nothing restored"
    checked = run_cli("verify", enc.tar, enc.archive)
    assert checked.returncode == NO_VERDICT, checked.stdout  # the check could not run
    line = one_line(checked.stderr)
    assert KEY.key_id in line and "--encryption-key-file" in line, line
    listed = run_cli("list", enc.tar.parent)
    assert listed.returncode == 0, listed.stderr
    notes = [line for line in listed.stdout.splitlines() if str(enc.tar) + ":" in line]
    assert len(notes) == 1 and KEY.key_id in notes[0] and "--encryption-key-file" in notes[0], listed.stdout
    assert "UNVERIFIABLE" in notes[0], "neither proven nor disproven: retention leaves it alone"


def test_another_key_is_refused_in_one_line_naming_both_key_ids(enc):
    done = restore(*restore_args(enc, enc.tar, "other_key", "--encryption-key-file", enc.other_key_file))
    assert done.returncode == 1
    line = one_line(done.stderr)
    assert KEY.key_id in line and OTHER.key_id in line, line
    assert not (enc.root / "other_key").exists()
    checked = run_cli("verify", enc.tar, enc.archive, "--encryption-key-file", enc.other_key_file)
    assert checked.returncode == NO_VERDICT
    assert KEY.key_id in one_line(checked.stderr)


def flipped(source: Path, into: Path, member: str) -> Path:
    """A copy of the backup ``source`` in ``into`` with one byte of ``member`` flipped, in its middle."""
    shutil.copytree(source, into)
    with open(into / member, "r+b") as f:
        f.seek(os.fstat(f.fileno()).st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))
    return into


@pytest.mark.parametrize("copy", ["tar", "s3"])
def test_a_flipped_byte_fails_the_restore_in_one_line_and_restores_nothing(enc, copy):
    if copy == "tar":
        damaged = flipped(enc.tar, enc.root / "flipped_tar", f"base.tar.zst{SUFFIX}")
    else:
        relation = enc.cluster.sql("SELECT pg_relation_filepath('ledger')")[0][0] + SUFFIX
        damaged = flipped(downloaded(enc, "s3_flip_src"), enc.root / "flipped_s3", relation)
    name = f"flipped_{copy}_target"
    done = restore(*restore_args(enc, damaged, name, "--encryption-key-file", enc.key_file))
    assert done.returncode == 1, done.stdout
    line = one_line(done.stderr)
    assert "does not authenticate" in line and "nothing restored" in line, line
    assert not (enc.root / name).exists(), "no data directory is left to start"
    assert not (enc.root / f"{name}_space").exists()
    assert not [p for p in enc.root.iterdir() if ".decrypting-" in p.name]
    assert "start it with" not in done.stdout


def test_verify_decrypts_with_the_key_records_its_verdict_and_fails_a_flipped_byte(enc):
    folder = downloaded(enc, "s3_verify")
    entry_path(folder).write_bytes(entry_path(enc.s3).read_bytes())  # synced with the bucket's folder
    checked = run_cli(
        "verify", folder, enc.archive, "--encryption-key-file", enc.key_file, "--work-dir", enc.root
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "decryption pass" in checked.stdout and "restore check pass" in checked.stdout, checked.stdout
    # Recorded for the manifest the encrypted backup proves with its key: list shows it verified.
    assert f"recorded in {entry_path(folder)}" in checked.stdout
    last = read_info(folder).verifications[-1]
    assert last["ok"] and last["manifest_checksum"] == prove_backup(folder, KEY).manifest_checksum
    listed = run_cli("list", enc.root, "--json", "--encryption-key-file", enc.key_file)
    entry = next(e for e in json.loads(listed.stdout) if e["folder"] == str(folder))
    assert entry["status"] == "proven" and entry["verified"].startswith("yes"), entry
    damaged = flipped(folder, enc.root / "s3_verify_flipped", f"global/pg_control{SUFFIX}")
    checked = run_cli("verify", damaged, enc.archive, "--encryption-key-file", enc.key_file, "--no-restore")
    assert checked.returncode == 1, checked.stdout + checked.stderr
    assert checked.stdout.startswith("FAIL: decryption fail"), checked.stdout


def test_each_copy_proves_itself_with_its_key_and_its_manifest_checks_the_plaintext(enc, tmp_root):
    for folder in (enc.tar, enc.s3, enc.s3_tar):
        without = prove_backup(folder)
        assert not without.ok and KEY.key_id in str(without.why), without
        proof = prove_backup(folder, KEY)
        assert proof.ok, proof.status
        assert proof.stop_lsn == enc.backup["stop_lsn"]
        # A version 2 manifest names the cluster (PostgreSQL 17 on); an encrypted pg_control is not read.
        major = enc.cluster.server_version() // 10000
        said = str(enc.backup["system_identifier"]) if manifest_version(major) == 2 else None
        assert proof.system_identifier == said
        info = read_info(folder)
        assert info.encryption_key_id == KEY.key_id
        assert info.manifest_checksum == proof.manifest_checksum
    listed = {e.name: e for e in list_backups(enc.tar.parent, key=KEY)}
    assert listed[str(enc.tar)].proof.ok
    # Decrypted, the tar copy is what pg_basebackup -Ft leaves: its manifest's checksums are of the plaintext.
    plain = tmp_root / "plain"
    decrypt_backup(enc.tar, plain, KEY)
    assert (plain / "backup_label").read_text() == enc.backup["backup_label"]
    assert prove_backup(plain).ok


def stored_bytes(enc: Encrypted) -> dict[str, bytes]:
    """Every file stored for the two copies, their catalog entries beside them included."""
    found = {str(p): p.read_bytes() for p in enc.tar.parent.rglob("*") if p.is_file()}
    for item in enc.s3.parent.rglob("*"):
        if item.is_file():
            found[str(item)] = item.read_bytes()
    assert str(entry_path(enc.s3)) in found and str(entry_path(enc.tar)) in found
    return found


def test_the_key_is_nowhere_in_the_stored_files_the_catalog_xcom_or_logs_and_no_row_is_readable(enc):
    key_forms = [KEY.material, KEY_TEXT.encode(), KEY_TEXT.upper().encode(), base64.b64encode(KEY.material)]
    stored = stored_bytes(enc)
    xcom = json.dumps(enc.xcom).encode()
    logs = "\n".join(enc.logs).encode()
    assert f"encrypted with key {KEY.key_id}".encode() in logs  # the tasks' log lines were collected
    for name, content in [*stored.items(), ("XCom", xcom), ("the task logs", logs)]:
        for form in key_forms:
            assert form not in content, f"the key is in {name}"
    for name, content in stored.items():
        if not name.endswith(FOLDERS_NAME):
            assert MARKER.encode() not in content, f"a row is readable in {name}"
            assert b"START WAL LOCATION" not in content or name.endswith(".backup_info.json"), name
    assert KEY.key_id.encode() in xcom  # the id, which names the key and reveals nothing of it


def test_the_store_refuses_a_key_that_is_not_the_copys(tmp_root):
    records = CopyRecords(15, {}, "tar", "zstd", KEY.key_id)
    with pytest.raises(StoreRefused, match=f"encrypted with key {KEY.key_id}.*gives key {OTHER.key_id}"):
        check_encryption(tmp_root, records, OTHER, "dest", False)
    with pytest.raises(StoreRefused, match="is not set"):
        check_encryption(tmp_root, records, None, "dest", False)
    (tmp_root / "PG_VERSION").write_text("15\n")  # a plain local copy is stored unencrypted
    with pytest.raises(StoreRefused, match="encryption_conn_id: 'dest' is a plain copy in a local folder"):
        check_encryption(tmp_root, CopyRecords(15, {}), KEY, "dest", False)


def test_the_operators_read_the_key_from_a_connection_and_name_a_bad_one_without_its_content(
    tmp_root, monkeypatch
):
    monkeypatch.setenv(
        f"AIRFLOW_CONN_{KEY_CONN.upper()}", json.dumps({"conn_type": "generic", "password": KEY_TEXT})
    )
    assert encryption_key(KEY_CONN) == KEY
    assert encryption_key(None) is None
    monkeypatch.setenv(
        "AIRFLOW_CONN_PGSB_BAD_KEY", json.dumps({"conn_type": "generic", "password": "hunter2-xyz"})
    )
    with pytest.raises(
        AirflowFailException, match="^encryption_conn_id 'pgsb_bad_key' \\(its password\\): not an"
    ) as caught:
        encryption_key("pgsb_bad_key")
    assert "hunter2" not in str(caught.value)
    copy = PostgresCopyDataDirectoryOperator(
        task_id="copy", source="/unused", destination=str(tmp_root / "plain"), encryption_conn_id=KEY_CONN
    )
    with pytest.raises(
        AirflowFailException, match="is a local folder, where a plain copy is stored unencrypted"
    ):
        copy.copy(tmp_root, str(tmp_root / "plain"))
    assert not (tmp_root / "plain").exists()


def test_the_drill_checks_an_encrypted_backup_with_its_key_and_passes_it_over_without(enc, task_context):
    from airflow.sdk import DAG

    from pg_safe_backup.operators.lifecycle import PostgresRestoreDrillOperator

    root = enc.root / "drill_root"
    folder = downloaded(enc, "drill_root/b")
    entry_path(folder).write_bytes(entry_path(enc.s3).read_bytes())
    common = {"root": str(root), "wal_archive": str(enc.archive), "max_age": None, "work_dir": str(enc.root)}
    with DAG("pgsb_encrypted_drill", schedule=None):
        keyed = PostgresRestoreDrillOperator(task_id="drill", encryption_conn_id=KEY_CONN, **common)
        keyless = PostgresRestoreDrillOperator(task_id="keyless", **common)
    done = keyed.execute(task_context(keyed))
    assert done["ok"] and done["backup"] == str(folder), done["summary"]
    assert done["checks"]["decryption"]["status"] == "PASS"
    assert done["checks"]["restore check"]["status"] == "PASS", done["summary"]
    with pytest.raises(AirflowFailException, match="holds no backup that proves itself"):
        keyless.execute(task_context(keyless))


def test_retention_counts_an_encrypted_backup_only_with_its_key(enc, tmp_root):
    """The encrypted tar backup alone under a root: without the key it does not prove itself, so retention
    removes nothing and says why; with it, it is the kept backup (its label and manifest decrypted)."""
    root = tmp_root / "root"
    shutil.copytree(enc.tar, root / "a")
    shutil.copy2(entry_path(enc.tar), entry_path(root / "a"))
    before = sorted(str(p) for p in root.rglob("*"))

    without = run_cli("retention", root, "--keep-last", "1")
    assert without.returncode == 1, without.stdout + without.stderr
    assert "no backup that proves itself" in without.stderr
    assert sorted(str(p) for p in root.rglob("*")) == before

    done = run_cli("retention", root, "--keep-last", "1", "--encryption-key-file", enc.key_file)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"keep      {root / 'a'}" in done.stdout
    assert sorted(str(p) for p in root.rglob("*")) == before
    assert KEY_TEXT not in done.stdout + done.stderr

    wrong = run_cli("retention", root, "--keep-last", "1", "--encryption-key-env", "PGSB_NO_SUCH_KEY")
    assert wrong.returncode == USAGE and "--encryption-key-env PGSB_NO_SUCH_KEY" in wrong.stderr
