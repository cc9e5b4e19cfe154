"""The restore check against real backups taken by hand (pg_backup_start/pg_backup_stop) under write load.

Every backup is made the same way: while one session holds the backup open and another keeps
committing rows (increasing, contiguous ids), the data directory is copied with global/pg_control
last, after a CHECKPOINT that follows at least ``GAP_ROWS`` rows committed after the data files were
copied. With its backup_label the copy recovers from the backup's start and has every row committed
before pg_backup_stop(); without it recovery starts at that later checkpoint, so the heap pages
filled between the file copy and the checkpoint are never replayed: rows are missing for sure.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from pg_safe_backup.files.wal import WalMissing, include_wal
from pg_safe_backup.local_cluster import LocalCluster, give_to_server_user
from pg_safe_backup.verify import VerifyResult, verify_backup

from backup_helpers import copy_data_dir

GAP_ROWS = 3000  # ~100 heap pages committed between the copy of the data files and the checkpoint
BATCH = 50

INVARIANT = """
SELECT count(*) = coalesce(max(id), 0) AND coalesce(min(id), 1) = 1,
       format('{table}: %s rows, ids %s..%s, must be contiguous from 1', count(*), min(id), max(id))
  FROM {table}
UNION ALL
SELECT coalesce(max(id), 0) >= {committed},
       format('{table}: max id %s, %s were committed before pg_backup_stop()', max(id), {committed})
  FROM {table}
"""


def invariant(committed: int, *tables: str) -> str:
    return "\nUNION ALL\n".join(INVARIANT.format(table=t, committed=committed).strip() for t in tables)


class Inserter(threading.Thread):
    """Commits batches of rows with contiguous ids into ``tables`` (one transaction per batch)."""

    def __init__(self, cluster: LocalCluster, tables: list[str], start_id: int) -> None:
        super().__init__(daemon=True)
        self.cluster, self.tables, self.committed = cluster, tables, start_id
        self.error: BaseException | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        try:
            with self.cluster.connect() as conn:
                while not self._halt.is_set():
                    lo, hi = self.committed + 1, self.committed + BATCH
                    with conn.transaction():
                        for table in self.tables:
                            conn.execute(
                                f"INSERT INTO {table} SELECT g, md5(g::text) || repeat('x', 150)"
                                " FROM generate_series(%s::bigint, %s) g",
                                (lo, hi),
                            )
                    self.committed = hi
        except BaseException as exc:  # noqa: BLE001 - reported by stop()
            self.error = exc

    def wait_for(self, count: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.committed < count:
            assert self.error is None, self.error
            assert time.monotonic() < deadline, f"inserter stuck at {self.committed}"
            time.sleep(0.01)

    def stop(self) -> int:
        self._halt.set()
        self.join(30)
        assert self.error is None, self.error
        return self.committed


@dataclass
class Backup:
    copy: Path
    archive: Path
    committed: int
    source: LocalCluster
    tablespace_location: Path | None = None
    tablespace_oid: int | None = None
    stop_lsn: str | None = None


def take_backup(root: Path, *, tablespace: bool = False) -> Backup:
    archive = root / "archive"
    archive.mkdir()
    give_to_server_user(archive)
    source = LocalCluster(root / "src").init(
        settings={
            "archive_mode": "on",
            "archive_command": f"'cp %p {archive}/%f'",
            "autovacuum": "off",
            "checkpoint_timeout": "'1h'",
            "max_wal_size": "'1GB'",
        }
    )
    source.start()
    tables = ["ledger"]
    location = oid = None
    source.sql("CREATE TABLE ledger (id bigint PRIMARY KEY, v text)")
    source.sql("CREATE INDEX ledger_v ON ledger (v)")
    if tablespace:
        location = root / "space1_location"
        location.mkdir()
        give_to_server_user(location)
        source.sql(f"CREATE TABLESPACE space1 LOCATION '{location}'")
        source.sql(
            "CREATE TABLE spaced (id bigint PRIMARY KEY USING INDEX TABLESPACE space1, v text)"
            " TABLESPACE space1"
        )
        oid = source.sql("SELECT oid FROM pg_tablespace WHERE spcname = 'space1'")[0][0]
        tables.append("spaced")
    for table in tables:
        source.sql(
            f"INSERT INTO {table} SELECT g, md5(g::text) || repeat('x', 150) FROM generate_series(1, 5000) g"
        )
    source.sql("CHECKPOINT")

    inserter = Inserter(source, tables, start_id=5000)
    inserter.start()
    copy = root / "backup"
    try:
        inserter.wait_for(5000 + 5 * BATCH)
        with source.connect() as session:
            pre15 = session.info.server_version < 150000  # the functions' names before PostgreSQL 15
            session.execute(
                "SELECT pg_start_backup('verify test', true, false)"
                if pre15
                else "SELECT pg_backup_start('verify test', true)"
            )

            def meanwhile() -> None:
                if tablespace:
                    shutil.copytree(location, root / f"backup_tablespaces/{oid}", symlinks=True)
                inserter.wait_for(inserter.committed + GAP_ROWS)
                source.sql("CHECKPOINT")
                inserter.wait_for(inserter.committed + 5 * BATCH)

            # Like rsync -a (the tablespace's link kept as a link) minus what a backup leaves out.
            copy_data_dir(source.datadir, copy, meanwhile=meanwhile, tablespace_links=True)
            committed = inserter.stop()
            stop_lsn, labelfile, spcmapfile = session.execute(
                "SELECT lsn::text, labelfile, spcmapfile FROM "
                + ("pg_stop_backup(false, true)" if pre15 else "pg_backup_stop(true)")
            ).fetchone()
    finally:
        if inserter.is_alive():
            inserter.stop()
    (copy / "backup_label").write_text(labelfile)
    if tablespace:
        assert spcmapfile.startswith(f"{oid} {location}")
        (copy / "tablespace_map").write_text(spcmapfile)
    else:
        assert not spcmapfile
    return Backup(copy, archive, committed, source, location, oid, stop_lsn)


def snapshot(path: Path) -> dict[str, tuple]:
    """Every file and link under ``path`` with size, mtime and mode: to prove nothing was touched."""
    seen = {}
    for folder, dirs, files in os.walk(path):
        for name in dirs + files:
            p = Path(folder, name)
            st = p.lstat()
            seen[str(p.relative_to(path))] = (st.st_size, st.st_mtime_ns, st.st_mode)
    return seen


@pytest.fixture
def backup(tmp_root: Path):
    made: list[Backup] = []

    def make(**kwargs) -> Backup:
        try:
            made.append(take_backup(tmp_root, **kwargs))
        except BaseException:
            LocalCluster(tmp_root / "src").stop("immediate")
            raise
        return made[-1]

    yield make
    for b in made:
        b.source.stop("immediate")


def assert_pass(result: VerifyResult) -> None:
    assert result.ok, result.summary()
    assert result.summary().startswith("PASS: ")


def test_backup_with_label_restores_with_every_committed_row(backup, tmp_root):
    b = backup()
    assert b.committed >= 5000 + GAP_ROWS
    before = snapshot(b.copy)

    result = verify_backup(b.copy, b.archive, invariant_sql=invariant(b.committed, "ledger"), timeout=60)

    assert_pass(result)
    d = result.details
    label = (b.copy / "backup_label").read_text()
    assert d["redo_start_lsn"] and f"START WAL LOCATION: {d['redo_start_lsn']} " in label
    assert d["consistent_lsn"] and d["recovery_end_lsn"]
    assert d["wal_files_restored"] >= 1
    assert d["btree_indexes_checked"] > 100 and d["databases"] == ["postgres", "template1"]
    assert all(ok for ok, _ in d["invariant_rows"])
    assert snapshot(b.copy) == before, "the restore check changed the backup"
    assert not Path(d["work_dir"]).exists()

    # A copy whose configuration points elsewhere (the live server's port and socket, another data
    # directory, an archive_command, a recovery target, a synchronous standby, preload libraries, no
    # pg_hba.conf as on Debian): the restore check overrides all of it and never leaves its work dir.
    hostile = tmp_root / "hostile"
    shutil.copytree(b.copy, hostile, symlinks=True)
    marker = tmp_root / "archive_command_ran"
    (hostile / "pg_hba.conf").unlink()
    with open(hostile / "postgresql.conf", "a") as f:
        f.write(
            f"data_directory = '/nonexistent/data'\nhba_file = '/nonexistent/pg_hba.conf'\n"
            f"port = {b.source.port}\nunix_socket_directories = '{b.source.socket_dir}'\n"
            f"listen_addresses = '*'\narchive_command = 'touch {marker}'\nlogging_collector = on\n"
            "log_directory = '/nonexistent/log'\nshared_preload_libraries = 'no_such_library'\n"
        )
    with open(hostile / "postgresql.auto.conf", "a") as f:
        f.write(
            f"recovery_target_time = '2000-01-01 00:00:00+00'\nsynchronous_standby_names = 'nobody'\n"
            "default_transaction_read_only = on\n"
            f"primary_conninfo = 'host={b.source.socket_dir} port={b.source.port}'\n"
        )
    assert_pass(verify_backup(hostile, b.archive, invariant_sql=invariant(b.committed, "ledger"), timeout=60))
    assert not marker.exists()
    assert b.source.sql("SELECT count(*) FROM pg_stat_replication")[0][0] == 0

    # The same through the CLI, replaying the whole archive this time, keeping the work dir.
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "pg_safe_backup",
            "verify",
            str(b.copy),
            str(b.archive),
            "--to-end-of-archive",
            "--keep",
            "--work-dir",
            str(tmp_root),
            "--invariant-sql",
            invariant(b.committed, "ledger"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cli.returncode == 0, cli.stdout + cli.stderr
    assert cli.stdout.startswith("PASS: ") and "kept " in cli.stdout
    kept = Path(cli.stdout.split("kept ")[1].split(";")[0].strip())
    assert (kept / "data" / "backup_label.old").exists() and not (kept / "data" / "postmaster.pid").exists()


def test_same_copy_without_backup_label_fails(backup, tmp_root):
    b = backup()
    unlabeled = tmp_root / "unlabeled"
    shutil.copytree(b.copy, unlabeled, symlinks=True)
    (unlabeled / "backup_label").unlink()
    check = invariant(b.committed, "ledger")

    refused = verify_backup(unlabeled, b.archive, invariant_sql=check, timeout=60)
    assert not refused.ok
    assert refused.summary().startswith("FAIL: ") and "has no backup_label" in refused.summary()

    cli = subprocess.run(
        [sys.executable, "-m", "pg_safe_backup", "verify", str(unlabeled), str(b.archive)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cli.returncode == 1 and cli.stdout.startswith("FAIL: ") and "no backup_label" in cli.stdout

    # Restored anyway with an empty pg_wal/ (the README's procedure), recovery looks for the checkpoint
    # of the copy's pg_control in pg_wal/ only (crash recovery first: no label) and gives up.
    restored = verify_backup(
        unlabeled, b.archive, invariant_sql=check, timeout=60, require_backup_label=False
    )
    print(f"\nwithout backup_label, empty pg_wal: {restored.summary()}")
    assert not restored.ok
    assert "PANIC:  could not locate a valid checkpoint record" in restored.summary()

    # With the WAL an rsync of pg_wal/ would have brought along, crash recovery starts at that later
    # checkpoint. Stopping at the earliest consistent point is refused (a target needs archive
    # recovery) ...
    shutil.copytree(
        b.archive,
        unlabeled / "pg_wal",
        dirs_exist_ok=True,
        ignore=lambda folder, names: {n for n in names if not re.fullmatch("[0-9A-F]{24}", n)},
    )
    restored = verify_backup(
        unlabeled,
        b.archive,
        invariant_sql=check,
        timeout=60,
        require_backup_label=False,
        use_backup_pg_wal=True,
    )
    print(f"without backup_label, copy's pg_wal, recovery_target='immediate': {restored.summary()}")
    assert not restored.ok
    # PostgreSQL 12 starts anyway, and then the data checks fail instead.
    assert (
        "FATAL:  recovery ended before configured recovery target was reached" in restored.summary()
        or "invariant violated" in restored.summary()
    )

    # ... but replaying to the end of the archive, the server starts and has silently lost committed
    # rows: the invariant notices (amcheck usually too: index entries whose heap pages were lost).
    restored = verify_backup(
        unlabeled,
        b.archive,
        invariant_sql=check,
        timeout=60,
        require_backup_label=False,
        use_backup_pg_wal=True,
        recovery_target_immediate=False,
    )
    print(f"without backup_label, copy's pg_wal, to the end of the archive: {restored.summary()}")
    assert not restored.ok
    assert any(r.startswith("invariant violated: ledger: ") for r in restored.reasons), restored.reasons
    rows = int(re.match(r"ledger: (\d+) rows", restored.details["invariant_rows"][0][1]).group(1))
    assert rows < b.committed

    # The labelled copy passes, so the failure is the missing label's alone.
    assert_pass(verify_backup(b.copy, b.archive, invariant_sql=check, timeout=60))


def test_tablespace_restored_from_its_copy_never_from_the_original(backup, tmp_root):
    b = backup(tablespace=True)
    b.source.stop()
    original = snapshot(b.tablespace_location)
    before = snapshot(b.copy)
    assert (b.copy / "pg_tblspc" / str(b.tablespace_oid)).is_symlink()  # copied as the link rsync -a makes

    result = verify_backup(
        b.copy, b.archive, invariant_sql=invariant(b.committed, "ledger", "spaced"), timeout=60
    )

    assert_pass(result)
    space = result.details["tablespaces"][str(b.tablespace_oid)]
    assert space["original"] == str(b.tablespace_location)
    assert space["backup"] == str(tmp_root / f"backup_tablespaces/{b.tablespace_oid}")
    assert space["restored_to"].startswith(result.details["work_dir"])
    # UNION ALL guarantees no row order (PostgreSQL 17 returns them differently).
    assert any(r[1].startswith(f"spaced: {b.committed} rows") for r in result.details["invariant_rows"])
    assert snapshot(b.tablespace_location) == original, "the restore touched the original tablespace location"
    assert snapshot(b.copy) == before

    # Without the tablespace's copy the check refuses instead of using the original location.
    shutil.rmtree(tmp_root / "backup_tablespaces")
    missing = verify_backup(b.copy, b.archive, timeout=60)
    assert not missing.ok and f"tablespace {b.tablespace_oid} ({b.tablespace_location}" in missing.summary()
    assert "refusing to restore from the original location" in missing.summary()


def test_tablespace_map_paths_with_escapes_round_trip():
    from pg_safe_backup.files.tablespaces import escape_map_path, parse_tablespace_map

    odd = "/srv/with space/back\\slash/new\nline"
    text = f"16384 /srv/ts1\n16385 {escape_map_path(odd)}\n"
    assert parse_tablespace_map(text) == [("16384", "/srv/ts1"), ("16385", odd)]


def test_self_contained_backup_restores_without_an_archive(backup, tmp_root):
    """include_wal copies the backup's WAL (start segment through the one before the stop LSN) from the
    archive into the copy's pg_wal/: it then recovers with no restore_command, every row there."""
    b = backup()
    label = (b.copy / "backup_label").read_text()
    archive_only = tmp_root / "archive_without_one"
    shutil.copytree(b.archive, archive_only)
    copied = include_wal(b.copy, b.archive, backup_label=label, stop_lsn=b.stop_lsn)
    segments = [n for n in copied if not n.endswith(".history")]
    assert segments and all((b.copy / "pg_wal" / n).is_file() for n in copied)
    assert segments[0][8:] in label.split("(file ")[1], "the first segment holds the START WAL LOCATION"

    result = verify_backup(b.copy, None, invariant_sql=invariant(b.committed, "ledger"), timeout=60)

    assert_pass(result)
    assert result.details["wal_archive"] is None and result.details["wal_files_restored"] == 0

    (archive_only / segments[-1]).unlink()
    bare = tmp_root / "bare"
    shutil.copytree(b.copy, bare, ignore=lambda folder, names: names if folder.endswith("pg_wal") else [])
    with pytest.raises(WalMissing, match=f"WAL segment {segments[-1]}, which the backup needs"):
        include_wal(bare, archive_only, backup_label=label, stop_lsn=b.stop_lsn)
    assert not any((bare / "pg_wal").glob("0*")), "nothing is copied when a segment is missing"
    refused = verify_backup(bare, None, timeout=60)
    assert not refused.ok and "only a self-contained backup" in refused.summary()
