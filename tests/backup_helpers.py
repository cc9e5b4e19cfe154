"""Helpers of the session-level tests (holder, gate and finish functions on real PostgreSQL, no Airflow)."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from psycopg import sql

from demo.load import Writer, wait_archived
from pg_safe_backup.catalog import BackupInfo, info_for_backup, write_info
from pg_safe_backup.files.copier import copy_data_directory, is_local_path
from pg_safe_backup.files.crypt import EncryptionKey, encrypt_chunks
from pg_safe_backup.files.label import store_label
from pg_safe_backup.files.layout import CONTROL_FILE, Entry, walk
from pg_safe_backup.files.manifest import (
    ManifestSummary,
    manifest_version,
    wal_ranges_for,
    write_backup_manifest,
    write_manifest,
)
from pg_safe_backup.files.pgcontrol import CRC_OFFSET, crc32c
from pg_safe_backup.files.wal import WAL_SEGMENT, segment_system_identifier
from pg_safe_backup.files.walarchive import IDENTITY_FILE, ArchiveIdentity, StoredName, parse_stored_name
from pg_safe_backup.hooks.backup import PostgresBackupHook
from pg_safe_backup.local_cluster import LocalCluster, free_port, give_to_server_user
from pg_safe_backup.pgverify import VerifyRun, run_pg_verifybackup
from pg_safe_backup.session import COMPLETE, STARTED, HoldRequest, finish_backup, hold_backup, wait_for_start
from pg_safe_backup.state import format_lsn, parse_lsn

from conftest import CONN_ID, PASSWORD
from pg_versions import verifier_for

OWNER = "nightly/scheduled__2026-11-24/backup"


def attempt_of(owner: str, try_number: int = 1) -> str:
    """A stand-in for a hold task instance's UUID: unique per owner and try."""
    return f"{owner}#try{try_number}"


ATTEMPT = attempt_of(OWNER)


def req(owner: str = OWNER, **kw) -> HoldRequest:
    """A hold request; the fixture's cluster does not archive WAL, so by default it opts out of the wait."""
    return HoldRequest(
        **{
            "owner": owner,
            "attempt": attempt_of(owner),
            "label": f"test {owner}",
            "fast_checkpoint": True,
            "poll_interval": 1.0,
            "wait_for_archive": False,
            **kw,
        }
    )


def backup_starts_in(log: str) -> int:
    """How many times a server log (log_statement = all) shows a request to enter backup mode, in either
    spelling: pg_backup_start (PostgreSQL 15+) or pg_start_backup (12-14).

    :param log: the server log, or a part of it (see e2e_helpers.log_since).
    """
    return sum(
        ("pg_backup_start(" in line or "pg_start_backup(" in line)
        for line in log.splitlines()
        if "LOG:" in line  # the statement as logged, not an ERROR's "STATEMENT:" echo of it
    )


def backup_starts(cluster: LocalCluster) -> int:
    """How many times ``cluster`` was asked to enter backup mode (log_statement = all; both spellings)."""
    return backup_starts_in(cluster.log_text())


#: What :func:`backup_row` reads: the backup's identity and outcome (no timestamps, which a heartbeat moves).
ROW_COLUMNS = (
    "state",
    "pid",
    "owner",
    "attempt",
    "label",
    "start_lsn",
    "stop_lsn",
    "timeline",
    "backup_label",
    "tablespace_map",
    "error",
    "system_identifier",
)


def backup_row(cluster: LocalCluster, table: str = "backup") -> dict:
    """The backup table's row (it holds one at most) by column name, state as text; {} when it is empty.

    :param cluster: the cluster the table is on.
    :param table: the table's name.
    """
    query = sql.SQL("SELECT {}::text, {} FROM {}").format(
        sql.Identifier(ROW_COLUMNS[0]),
        sql.SQL(", ").join(map(sql.Identifier, ROW_COLUMNS[1:])),
        sql.Identifier(table),
    )
    found = cluster.sql(query)
    return dict(zip(ROW_COLUMNS, found[0], strict=True)) if found else {}


def holder_sessions(cluster: LocalCluster) -> int:
    """How many holder sessions (application_name 'pg_safe_backup holder') are connected to ``cluster``."""
    return cluster.sql(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pg_safe_backup holder'"
    )[0][0]


def session_alive(cluster: LocalCluster, pid: int) -> bool:
    return bool(cluster.sql("SELECT 1 FROM pg_stat_activity WHERE pid = %s", [pid]))


def session_ended(cluster: LocalCluster, pid: int, timeout: float = 10) -> bool:
    """Whether the backend ``pid`` is gone within ``timeout`` s: a backend exits a moment after its client
    closed the connection (it has to notice), so a check right after the close can still see it."""
    deadline = time.monotonic() + timeout
    while session_alive(cluster, pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


async def wait_until(predicate: Callable[[], bool], timeout: float = 15, what: str = "condition") -> None:
    """Wait, in the event loop, until ``predicate()`` (run in a thread: it may query a server) holds.

    :param predicate: the condition.
    :param timeout: seconds before the test fails, naming ``what``.
    :param what: what is waited for.
    """
    deadline = asyncio.get_running_loop().time() + timeout
    while not await asyncio.to_thread(predicate):
        assert asyncio.get_running_loop().time() < deadline, f"{what} not reached in {timeout} s"
        await asyncio.sleep(0.1)


def wait_for(predicate: Callable[[], bool], timeout: float = 60, what: str = "condition") -> None:
    """The same for a plain test: poll ``predicate()`` until it holds, or fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} not reached in {timeout} s"
        time.sleep(0.1)


async def gate(
    hook: PostgresBackupHook, attempt: str = ATTEMPT, timeout: float = 60, gate_timeout: float = 3600
) -> dict:
    return await asyncio.wait_for(
        wait_for_start(hook, attempt, poll_interval=0.5, timeout=gate_timeout), timeout
    )


async def started(hook: PostgresBackupHook, r: HoldRequest) -> tuple[asyncio.Task, dict]:
    """Start a holder and wait for the gate to open."""
    holder = asyncio.create_task(hold_backup(hook, r))
    opened = await gate(hook, r.attempt)
    assert opened["status"] == STARTED, opened
    return holder, opened


async def finish(
    hook: PostgresBackupHook, attempt: str = ATTEMPT, start_lsn: str | None = None, timeout: float = 60, **kw
) -> dict:
    """The finish of ``attempt``; the copy "began" under ``start_lsn`` (default: that attempt's, from the
    table)."""
    if start_lsn is None:
        async with hook.connect() as conn:
            found = await hook.read(conn)
        start_lsn = found.start_lsn if found and found.attempt == attempt and found.start_lsn else "0/0"
    return await asyncio.wait_for(finish_backup(hook, attempt, start_lsn, poll_interval=0.5, **kw), timeout)


def copy_data_dir(
    source: Path,
    dest: Path,
    pg_control_first: bool = False,
    meanwhile: Callable[[], None] = lambda: None,
    tablespace_links: bool = False,
) -> None:
    """A file-system copy of what a base backup of ``source`` holds, as a user's script makes it, in two
    steps: every entry of :func:`~pg_safe_backup.files.layout.walk` (the table of what a backup leaves out,
    which every copy engine reads) but global/pg_control, then pg_control alone, last, as the README says
    (``pg_control_first`` swaps the steps, to show what the rule prevents). ``meanwhile`` runs between them.

    :param source: a data directory (of a running server: files that vanish meanwhile are left out).
    :param dest: the copy's folder, created.
    :param pg_control_first: copy pg_control first instead of last.
    :param meanwhile: what happens between the two steps.
    :param tablespace_links: keep each ``pg_tblspc/<oid>`` link as a link, as ``rsync -a`` does (the
        caller copies the tablespace), instead of copying the tablespace into the copy's tree.
    """
    rest = [e for e in walk(source) if e.path != CONTROL_FILE]
    links = {e.path for e in rest if tablespace_links and e.is_dir and e.source.is_symlink()}

    def put(entries: list[Entry]) -> None:
        for entry in entries:
            target = dest / entry.path
            if entry.path in links:
                target.symlink_to(os.readlink(entry.source))
            elif any(entry.path.startswith(f"{link}/") for link in links):
                continue  # inside a tablespace kept as a link
            elif entry.is_dir:
                target.mkdir(parents=True, exist_ok=True)
                shutil.copystat(entry.source, target)
            else:
                with contextlib.suppress(FileNotFoundError):  # dropped meanwhile: WAL replay agrees
                    shutil.copy2(entry.source, target)

    dest.mkdir(parents=True, exist_ok=True)
    shutil.copystat(source, dest)  # the server refuses a data directory others may read
    control = [Entry(CONTROL_FILE, source / CONTROL_FILE, False)]
    first, last = (control, rest) if pg_control_first else (rest, control)
    if pg_control_first:
        (dest / "global").mkdir(exist_ok=True)
    put(first)
    meanwhile()
    put(last)


async def backup_events(
    hook: PostgresBackupHook, r: HoldRequest, copy: Callable[[], None] = lambda: None, timeout: float = 60
) -> tuple[dict, dict]:
    """One whole backup through the session functions (hold, gate, ``copy()`` in a thread, finish),
    whatever its outcome: the holder's and the finish's events."""
    holder, opened = await started(hook, r)
    await asyncio.to_thread(copy)
    done = await finish(hook, r.attempt, opened["backup"]["start_lsn"], timeout)
    return await asyncio.wait_for(holder, timeout), done


def run_backup(hook: PostgresBackupHook, owner: str, copy: Callable[[], None]) -> dict:
    """One whole backup (see :func:`backup_events`) that must complete: the completed backup's row
    (backup_label, start_lsn, stop_lsn, system_identifier, ...)."""
    held, done = asyncio.run(backup_events(hook, req(owner, poll_interval=0.5), copy))
    assert done["status"] == held["status"] == COMPLETE, (held, done)
    return done["backup"]


def store_backup_label(destination: Any, backup: dict, local_copy: Path | None = None) -> dict[str, str]:
    """:func:`store_label` of a completed backup's row (see :func:`run_backup`) into ``destination``.

    :param destination: the copy's folder, or an ObjectStoragePath.
    :param backup: the completed backup's row.
    :param local_copy: the copy as a local folder, to check its pg_control (default: ``destination`` when it
        is a local ``Path``; None for an object store).
    """
    if local_copy is None and is_local_path(destination):
        local_copy = destination
    return store_label(
        destination,
        {"backup_label": backup["backup_label"], "tablespace_map": backup["tablespace_map"]},
        local_copy=local_copy,
        system_identifier=backup["system_identifier"],
        stop_lsn=backup["stop_lsn"],
    )


def catalogued_backup(cluster: LocalCluster, destination: Path, owner: str) -> tuple[dict, BackupInfo]:
    """A whole backup of ``cluster`` copied into ``destination`` by the copy engine, its label stored, its
    backup_manifest and catalog entry written, as the store task leaves a backup: the backup's row and its
    info.

    :param cluster: the cluster (reachable as the ``pg_test`` connection, e.g. :func:`cluster_with_space`).
    :param destination: a new local folder.
    :param owner: the backup's owner (its DAG run and group).
    """
    copied = {}

    def copy() -> None:
        copied["result"] = copy_data_directory(cluster.datadir, destination, fsync=False)

    backup = run_backup(PostgresBackupHook(CONN_ID), owner, copy)
    store_backup_label(destination, backup)
    manifest = write_backup_manifest(
        destination,
        backup_label=backup["backup_label"],
        stop_lsn=backup["stop_lsn"],
        system_identifier=backup["system_identifier"],
    )
    info = info_for_backup(
        backup_label=backup["backup_label"],
        stop_lsn=backup["stop_lsn"],
        tablespace_map=backup["tablespace_map"],
        system_identifier=backup["system_identifier"],
        pg_major=cluster.server_version() // 10000,
        bytes=copied["result"].bytes,
        files=copied["result"].files,
        manifest_checksum=manifest.checksum,
    )
    write_info(destination, info)
    return backup, info


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system
        shutil.copy2(src, dst)


def linked_copy(source: Path, target: Path) -> Path:
    """``source`` copied as hard links (cheap; a test replaces a file rather than write into it, see
    :func:`reforge_backup`), links inside kept as links.

    :param source: a folder.
    :param target: a new folder.
    """
    shutil.copytree(source, target, symlinks=True, copy_function=_link_or_copy)
    return target


def reforge_backup(
    folder: Path,
    *,
    label: str | None = None,
    system_identifier: int | None = None,
    stop_lsn: str | None = None,
) -> None:
    """Change a stored local plain backup as another cluster or another time would have made it, and write
    its backup_manifest again, so that it still proves itself: ``label`` as its backup_label,
    ``system_identifier`` in its global/pg_control (CRC recomputed; a little-endian host), ``stop_lsn`` as
    its manifest's End-LSN.

    :param folder: the backup's folder (a copy of a :func:`catalogued_backup`).
    :param label: the new backup_label.
    :param system_identifier: the new system identifier.
    :param stop_lsn: the new stop LSN.
    """
    from pg_safe_backup.proof import prove_backup

    before = prove_backup(folder)
    assert before.ok, before.status
    if label is not None:
        (folder / "backup_label").unlink()  # never through a hard link into the original
        (folder / "backup_label").write_text(label)
    control = folder / "global" / "pg_control"
    if system_identifier is not None:
        raw = bytearray(control.read_bytes())
        struct.pack_into("<Q", raw, 0, system_identifier)
        end = CRC_OFFSET[struct.unpack_from("<I", raw, 8)[0]]
        struct.pack_into("<I", raw, end, crc32c(bytes(raw[:end])))
        control.unlink()
        control.write_bytes(bytes(raw))
    write_backup_manifest(
        folder,
        backup_label=(folder / "backup_label").read_text(),
        stop_lsn=stop_lsn or str(before.stop_lsn),
        system_identifier=system_identifier or before.system_identifier,
    )


def hand_over_row(cluster: LocalCluster, sets: str, params: list) -> None:
    """``UPDATE backup SET <sets>`` that gives the row to another session (a new pid) while it stays the
    same attempt's, as a test needs it. The table's guard clears our columns when the pid changes but the
    attempt does not (the old pre-script's takeover), so the attempt is first set aside, in one transaction:
    nobody sees the step between."""
    with cluster.connect() as conn, conn.transaction():
        conn.execute("UPDATE backup SET attempt = NULL")
        conn.execute(f"UPDATE backup SET {sets}", params)


def big_endian_pg_control(raw: bytes, pg_control_version: int) -> bytes:
    """A little-endian pg_control as a big-endian server would write it, as far as the byte-order tests
    need: system identifier, versions, checkpoint, blcksz and WAL segment size swapped, the CRC recomputed.

    :param raw: the little-endian file.
    :param pg_control_version: its version (where its CRC is).
    """
    swapped = bytearray(raw)
    for offset, fmt in ((0, "Q"), (8, "I"), (12, "I"), (32, "Q"), (216, "I"), (228, "I")):
        (value,) = struct.unpack_from("<" + fmt, swapped, offset)
        struct.pack_into(">" + fmt, swapped, offset, value)
    end = CRC_OFFSET[pg_control_version]
    struct.pack_into(">I", swapped, end, crc32c(bytes(swapped[:end])))
    return bytes(swapped)


# ------------------------------------------------------------------------------ the command line
#: The checkout: its provider/ (the package) and demo/ go first on a command's PYTHONPATH.
ROOT_DIR = Path(__file__).resolve().parent.parent


def cli_env() -> dict[str, str]:
    """The environment a command of this checkout runs in: its provider/ (the package) and the checkout
    (demo/) first on PYTHONPATH."""
    path = os.pathsep.join(
        p for p in (f"{ROOT_DIR / 'provider'}", f"{ROOT_DIR}", os.environ.get("PYTHONPATH")) if p
    )
    return {**os.environ, "PYTHONPATH": path}


def run_cli(*args: str | Path, timeout: float = 300, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``pg-safe-backup ARGS`` (``python -m pg_safe_backup``) as a DBA runs it, this checkout's package first.

    :param args: the subcommand and its arguments.
    :param timeout: seconds before the test fails.
    :param cwd: where it runs.
    """
    return subprocess.run(
        [sys.executable, "-m", "pg_safe_backup", *map(str, args)],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=timeout,
        cwd=cwd,
    )


def restore(*args: str | Path) -> subprocess.CompletedProcess:
    """``pg-safe-backup restore ARGS``."""
    return run_cli("restore", *args)


@contextlib.contextmanager
def recovered(target: Path, timeout: float = 120) -> Iterator[LocalCluster]:
    """The restored data directory started (a free port, its socket beside it) and out of recovery."""
    server = LocalCluster(target, port=free_port())
    with open(target / "postgresql.auto.conf", "a") as f:
        f.write(f"unix_socket_directories = '{server.socket_dir}'\n")
    server.start()
    try:
        deadline = time.monotonic() + timeout
        while server.sql("SELECT pg_is_in_recovery()") != [(False,)]:
            assert time.monotonic() < deadline, server.log_text()[-3000:]
            time.sleep(0.2)
        yield server
    finally:
        server.stop("immediate")


# ------------------------------------------------------------------------- a backup with its manifest
@dataclass
class Taken:
    """A backup's copy with its manifest, and what checks it."""

    cluster: LocalCluster
    major: int
    copy: Path
    archive: Path
    backup: dict
    root: Path
    relation: str  # a table's file in the default tablespace, relative to the copy
    spaced_relation: str  # a table's file in the tablespace space1, relative to the copy

    def verify(self, copy: Path | None = None, *, wal: bool = False) -> VerifyRun:
        """pg_verifybackup of ``copy`` (default: the backup's) by :func:`verifier_for`; the WAL is parsed
        only when ``wal`` and the verifier is of the same major."""
        found = verifier_for(self.major)
        assert found is not None, f"no pg_verifybackup reads a PostgreSQL {self.major} manifest"
        bindir, same_major = found
        # A newer verifier refuses another release's pg_control in a version 2 manifest ("unexpected
        # control file version"), before comparing anything: leave that one file out.
        ignore = () if same_major or manifest_version(self.major) == 1 else ("global/pg_control",)
        return run_pg_verifybackup(
            copy or self.copy,
            bindir=bindir,
            wal_path=self.archive,
            skip_wal=not (wal and same_major),
            ignore=ignore,
            timeout=120,
        )

    def write(self, copy: Path | None = None, **kwargs) -> ManifestSummary:
        """Write the manifest of ``copy`` (default: the backup's) for this backup."""
        b = self.backup
        ranges = wal_ranges_for(b["start_lsn"], b["timeline"], b["stop_lsn"], b["timeline"], None, self.major)
        return write_manifest(
            copy or self.copy,
            major=self.major,
            system_identifier=b["system_identifier"],
            wal_ranges=ranges,
            **kwargs,
        )


def _relation(cluster: LocalCluster, table: str) -> str:
    """``table``'s first file relative to the data directory; a tablespace's through pg_tblspc."""
    return cluster.sql("SELECT pg_relation_filepath(%s)", [table])[0][0]


@contextlib.contextmanager
def taken_backup() -> Iterator[Taken]:
    """One backup (conftest.py's session fixture ``taken``): an archiving cluster with a tablespace, backed
    up through the session functions, copied with the tablespace as a real folder under pg_tblspc/<oid>,
    label stored, manifest written; stopped and removed on leaving."""
    root = Path(tempfile.mkdtemp(prefix="pgsb-manifest-"))
    os.chmod(root, 0o755)
    archive, location = root / "archive", root / "space1"
    for folder in (archive, location):
        folder.mkdir()
        give_to_server_user(folder)
    cluster = LocalCluster(root / "data").init(
        password=PASSWORD,
        settings={"archive_mode": "on", "archive_command": f"'cp %p {archive}/%f'", "autovacuum": "off"},
    )
    cluster.start()
    env = pytest.MonkeyPatch()
    env.setenv(f"AIRFLOW_CONN_{CONN_ID.upper()}", cluster.airflow_conn_uri(password=PASSWORD))
    try:
        major = cluster.server_version() // 10000
        cluster.sql(f"CREATE TABLESPACE space1 LOCATION '{location}'")
        cluster.sql("CREATE TABLE ledger (id bigint PRIMARY KEY, v text)")
        cluster.sql("CREATE TABLE spaced (id bigint, v text) TABLESPACE space1")
        for table in ("ledger", "spaced"):
            cluster.sql(f"INSERT INTO {table} SELECT g, md5(g::text) FROM generate_series(1, 5000) g")
        cluster.sql("CHECKPOINT")
        copy = root / "backup"
        # copy_data_dir follows the pg_tblspc link: the tablespace lands in the copy as a folder.
        backup = run_backup(
            PostgresBackupHook(CONN_ID), "d/r/backup", lambda: copy_data_dir(cluster.datadir, copy)
        )
        env.undo()  # the connection was for the backup only: the fixture lives for the whole session
        store_backup_label(copy, backup)
        wait_archived(cluster)
        t = Taken(
            cluster,
            major,
            copy,
            archive,
            backup,
            root,
            _relation(cluster, "ledger"),
            _relation(cluster, "spaced"),
        )
        t.write()
        yield t
    finally:
        env.undo()
        cluster.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)


def another_clusters_archive(root: Path) -> Path:
    """A WAL archive of another cluster in ``root``: the first segment initdb wrote for a new one.

    :param root: a folder the postgres OS user can enter.
    """
    other = LocalCluster(root / "other" / "data").init(fresh=True)
    archive = root / "other" / "archive"
    archive.mkdir()
    first = min(p.name for p in (other.datadir / "pg_wal").iterdir() if WAL_SEGMENT.match(p.name))
    shutil.copy2(other.datadir / "pg_wal" / first, archive / first)
    give_to_server_user(archive)
    return archive


# ------------------------------------------------------------------------------ a primary and a standby
def archiving_cluster(
    datadir: Path, archive: Path, password: str, fresh: bool = False, **settings: str
) -> LocalCluster:
    """A started cluster in ``datadir`` whose WAL is archived into ``archive``.

    log_statement=all: every pg_backup_start is in the server log, so the tests can count them.

    :param fresh: a system identifier of its own (:meth:`LocalCluster.init`), for tests of several clusters.
    :param settings: more postgresql.conf settings.
    """
    return (
        LocalCluster(datadir)
        .init(
            fresh=fresh,
            password=password,
            settings={
                "archive_mode": "on",
                "archive_command": f"'cp %p {archive}/%f'",
                "log_statement": "'all'",
                **settings,
            },
        )
        .start()
    )


def backup_into(hook: PostgresBackupHook, dest: Path, owner: str, copy: Callable[[], None]) -> dict:
    """One backup through the hook, ``copy()`` while it is held; its backup_label written into ``dest``."""
    backup = run_backup(hook, owner, copy)
    (dest / "backup_label").write_text(backup["backup_label"])
    return backup


@dataclass
class Pair:
    """A primary archiving into ``archive``, a streaming hot standby made from it, and a writer on the
    primary (started only if the pair was made with one)."""

    primary: LocalCluster
    standby: LocalCluster
    archive: Path
    writer: Writer
    base: dict  # the backup of the primary the standby was made from

    @property
    def hook(self) -> PostgresBackupHook:
        """The standby backed up, its state on the primary."""
        return PostgresBackupHook("pg_standby", state_conn_id="pg_primary")

    def stop_segment(self, stop_lsn: str) -> str:
        """The primary's name of the WAL segment holding the last byte before ``stop_lsn``."""
        return self.primary.sql("SELECT pg_walfile_name(%s::pg_lsn)", [format_lsn(parse_lsn(stop_lsn) - 1)])[
            0
        ][0]

    def replayed(self, timeout: float = 60) -> None:
        """Wait until the standby replayed everything the primary wrote so far."""
        ((lsn,),) = self.primary.sql("SELECT pg_current_wal_lsn()::text")
        deadline = time.monotonic() + timeout
        while self.standby.sql("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", [lsn]) != [(True,)]:
            assert time.monotonic() < deadline, f"the standby did not replay up to {lsn}"
            time.sleep(0.1)

    def write_to_disk(self) -> None:
        """A checkpoint on the primary, replayed, then one on the standby: a restartpoint, which writes
        every page the standby changed so far to its disk (and moves its minimum recovery point)."""
        self.primary.sql("CHECKPOINT")
        self.replayed()
        self.standby.sql("CHECKPOINT")

    def more_rows_on_disk(self) -> None:
        """Let the writer commit 300 more rows, then write them to the standby's disk."""
        target = self.writer.committed + 300
        deadline = time.monotonic() + 60
        while self.writer.committed < target:
            assert self.writer.is_alive() and time.monotonic() < deadline, "the writer stopped"
            time.sleep(0.05)
        self.write_to_disk()


@contextlib.contextmanager
def pair_maker(root: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Pair]]:
    """Make a :class:`Pair` in ``root`` (connections ``pg_primary``, ``pg_standby``); everything it started
    is stopped on leaving.

    The maker's ``writing=True`` starts the pair's writer once the standby runs; its other keywords go into
    the standby's configuration.

    :param root: a folder the postgres OS user can enter.
    :param monkeypatch: where the two Airflow connections are set.
    """
    started: list[LocalCluster] = []
    writers: list[Writer] = []

    def make(writing: bool = False, **standby_settings: str) -> Pair:
        archive = root / "archive"
        archive.mkdir()
        give_to_server_user(archive)
        primary = archiving_cluster(root / "primary", archive, PASSWORD)
        started.append(primary)
        writers.append(writer := Writer(primary))
        primary.sql("CREATE TABLE ledger (id bigint PRIMARY KEY, v text)")
        monkeypatch.setenv("AIRFLOW_CONN_PG_PRIMARY", primary.airflow_conn_uri(password=PASSWORD))
        base = backup_into(
            PostgresBackupHook("pg_primary"),
            root / "standby",
            "make/standby/base",
            lambda: copy_data_dir(primary.datadir, root / "standby"),
        )

        standby = LocalCluster(root / "standby")
        (standby.datadir / "standby.signal").touch()
        standby.configure(
            {
                "primary_conninfo": f"'host={primary.socket_dir} port={primary.port} user=postgres'",
                "restore_command": f"'cp {archive}/%f %p'",
                "archive_mode": "off",
                "port": standby.port,
                "log_statement": "'all'",
                **standby_settings,
            }
        )
        give_to_server_user(standby.datadir)
        standby.start()
        started.append(standby)
        if writing:
            writer.start()
        deadline = time.monotonic() + 60
        while standby.sql("SELECT count(*) FROM pg_stat_wal_receiver WHERE status = 'streaming'") != [(1,)]:
            assert time.monotonic() < deadline, "the standby does not stream"
            time.sleep(0.2)
        assert standby.sql("SELECT pg_is_in_recovery()") == [(True,)]
        monkeypatch.setenv("AIRFLOW_CONN_PG_STANDBY", standby.airflow_conn_uri(password=PASSWORD))
        return Pair(primary, standby, archive, writer, base)

    try:
        yield make
    finally:
        for writer in writers:
            if writer.is_alive():
                writer.stop()
        for cluster in reversed(started):
            cluster.stop("immediate")


def standby_backup(
    s: Pair, dest: Path, owner: str, pg_control_first: bool, meanwhile: Callable[[], None]
) -> dict:
    """The backup proper: session on the standby, state table on the primary; ``meanwhile`` runs
    between the two copy steps."""
    return backup_into(
        s.hook, dest, owner, lambda: copy_data_dir(s.standby.datadir, dest, pg_control_first, meanwhile)
    )


@contextlib.contextmanager
def cluster_with_space(root: Path, fresh: bool = False) -> Iterator[tuple[LocalCluster, Path, Path]]:
    """An archiving cluster in ``root``/data (autovacuum off), reachable as the ``pg_test`` connection, with
    its WAL archive ``root``/archive and an empty tablespace location ``root``/space1; stopped on leaving.

    :param root: a folder the postgres OS user can enter.
    :param fresh: a system identifier of its own (another cluster than one made without it).
    :returns: the cluster, its archive and the tablespace location.
    """
    archive, location = root / "archive", root / "space1"
    for folder in (archive, location):
        folder.mkdir()
        give_to_server_user(folder)
    cluster = archiving_cluster(root / "data", archive, PASSWORD, fresh=fresh, autovacuum="off")
    env = pytest.MonkeyPatch()
    env.setenv(f"AIRFLOW_CONN_{CONN_ID.upper()}", cluster.airflow_conn_uri(password=PASSWORD))
    try:
        yield cluster, archive, location
    finally:
        env.undo()
        cluster.stop("immediate")


# ------------------------------------------------------------------------ an archive wal-push manages
#: A key for the encrypted archives of the tests (never a real one).
TEST_KEY = EncryptionKey(bytes(range(32)))


def stored_bytes(data: bytes, compression: str, key: EncryptionKey | None) -> bytes:
    """``data`` as a managed archive stores it: compressed, then encrypted with ``key`` (None: not)."""
    if compression == "gzip":
        data = gzip.compress(data)
    elif compression == "zstd":
        import zstandard

        data = zstandard.ZstdCompressor().compress(data)
    elif compression == "lz4":
        import lz4.frame

        data = lz4.frame.compress(data)
    return b"".join(encrypt_chunks([data], key)) if key is not None else data


def managed_archive(
    plain: Path,
    into: Path,
    major: int,
    key: EncryptionKey | None = None,
    compressions: tuple[str, ...] = ("zstd", "gzip"),
) -> Path:
    """A copy of the ``cp`` archive ``plain`` as ``wal-push`` stores one (files/walarchive.py): its identity
    file at the top, and each archived file under its stored name, compressed in turn with ``compressions``
    and encrypted with ``key``; readable by the server's OS user.

    :param plain: a cp archive (names as PostgreSQL gave them).
    :param into: the new archive's folder (absent).
    :param major: the cluster's PostgreSQL major.
    :param key: encrypt with it (None: not encrypted).
    :param compressions: a cycle of keys of walarchive.COMPRESSIONS.
    """
    into.mkdir()
    names = sorted(p.name for p in plain.iterdir() if parse_stored_name(p.name) is not None)
    first = next(n for n in names if WAL_SEGMENT.match(n))
    size = (plain / first).stat().st_size
    identity = ArchiveIdentity(segment_system_identifier(plain / first), major, size)
    (into / IDENTITY_FILE).write_bytes(identity.to_bytes())
    for i, name in enumerate(names):
        compression = compressions[i % len(compressions)]
        stored = StoredName(name, compression, key is not None).stored
        (into / stored).write_bytes(stored_bytes((plain / name).read_bytes(), compression, key))
    give_to_server_user(into)
    return into
