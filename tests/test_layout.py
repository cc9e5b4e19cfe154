"""files/layout.py: what a base backup leaves out, checked against PostgreSQL's own pg_basebackup."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from pg_safe_backup.files.layout import (
    CONTROL_FILE,
    EXCLUDED_DIR_CONTENTS,
    contents_excluded,
    excluded,
    rsync_exclude_args,
    walk,
)
from pg_safe_backup.local_cluster import as_server_user, give_to_server_user


@pytest.mark.parametrize(
    ("folder", "name", "siblings", "why"),
    [
        ("", "postmaster.pid", (), "lock file"),
        ("", "postmaster.opts", (), "command line"),
        ("global", "pg_internal.init", (), "relation cache"),
        ("base/5", "pg_internal.init.1234", (), "relation cache"),
        ("", "backup_label", (), "earlier backup"),
        ("", "tablespace_map", (), "earlier backup"),
        ("", "backup_manifest", (), "another backup"),
        ("", "postgresql.auto.conf.tmp", (), "ALTER SYSTEM"),
        ("", "current_logfiles.tmp", (), "logging collector"),
        ("base", "pgsql_tmp", (), "temporary file"),
        ("base/5", "t3_16384", (), "temporary relation"),
        ("pg_tblspc/16390/PG_15_202209061/5", "t12_16391.1", (), "temporary relation"),
        ("base/5", "16384", ("16384", "16384_init", "16384_fsm"), "unlogged"),
        ("base/5", "16384_fsm", ("16384", "16384_init", "16384_fsm"), "unlogged"),
        ("base/5", "16384.1", ("16384", "16384.1", "16384_init"), "unlogged"),
    ],
)
def test_files_a_base_backup_leaves_out_say_why(folder, name, siblings, why):
    assert why in excluded(folder, name, False, siblings)


@pytest.mark.parametrize(
    ("folder", "name", "siblings"),
    [
        ("base/5", "16384_init", ("16384", "16384_init")),  # an unlogged relation's init fork is kept
        ("base/5", "16384", ("16384", "16384_fsm", "16384_vm")),  # a logged relation
        ("base/5", "PG_VERSION", ()),
        ("global", "pg_filenode.map", ()),
        ("", "postgresql.auto.conf", ()),
        ("", "t3_16384", ()),  # not a database folder: not a temporary relation
        ("global", "1262", ("1262", "1262_init")),  # global/ is no database folder (basebackup.c)
    ],
)
def test_files_a_base_backup_keeps(folder, name, siblings):
    assert excluded(folder, name, False, siblings) is None


def test_folders_kept_empty_and_wal_only_at_the_top():
    for name in EXCLUDED_DIR_CONTENTS:
        assert contents_excluded("", name)
    assert contents_excluded("", "pg_wal")
    assert contents_excluded("base", "pg_wal") is None
    assert contents_excluded("", "base") is None


def test_rsync_options_cover_the_table_and_leave_pg_control_for_last():
    args = rsync_exclude_args()
    assert all(a.startswith("--exclude=") for a in args)
    assert f"--exclude=/{CONTROL_FILE}" in args
    assert "--exclude=pg_internal.init*" in args and "--exclude=/pg_wal/*" in args
    assert {f"--exclude={name}/*" for name in EXCLUDED_DIR_CONTENTS} <= set(args)


def test_walk_lists_what_pg_basebackup_puts_in_its_manifest(cluster, tmp_root):
    """Our table against PostgreSQL's: the files of pg_basebackup's manifest of the same cluster, with an
    unlogged table, a temporary table held open, a tablespace, a stale backup_label and a pgsql_tmp file."""
    basebackup = cluster.bindir / "pg_basebackup"
    if not basebackup.exists():
        pytest.skip(f"no pg_basebackup in {cluster.bindir} (the npm binaries have only the server)")
    space = tmp_root / "space"
    space.mkdir()
    give_to_server_user(space)
    cluster.sql(f"CREATE TABLESPACE space LOCATION '{space}'")
    cluster.sql("CREATE TABLE logged (i int) TABLESPACE space")
    cluster.sql("INSERT INTO logged SELECT generate_series(1, 100)")
    cluster.sql("CREATE UNLOGGED TABLE scratch (i int); INSERT INTO scratch SELECT generate_series(1, 100)")
    (cluster.datadir / "backup_label").write_text("an earlier backup's\n")
    (cluster.datadir / "base" / "pgsql_tmp").mkdir(exist_ok=True)
    (cluster.datadir / "base" / "pgsql_tmp" / "pgsql_tmp1.0").write_text("sort spill")
    give_to_server_user(cluster.datadir / "base" / "pgsql_tmp")
    with cluster.connect() as held:
        held.execute("CREATE TEMP TABLE t (i int); INSERT INTO t VALUES (1)")
        held.execute("CHECKPOINT")
        ours = {e.path for e in walk(cluster.datadir) if not e.is_dir}
        target = tmp_root / "basebackup"
        done = subprocess.run(
            as_server_user(
                [str(basebackup), "-h", str(cluster.socket_dir), "-p", str(cluster.port), "-U", "postgres"]
                + ["-D", str(target), "-X", "none", "-c", "fast", "--manifest-checksums=NONE"]
                + [f"--tablespace-mapping={space}={tmp_root / 'space_copy'}"]
            ),
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr
    (cluster.datadir / "backup_label").unlink()
    manifest = json.loads((target / "backup_manifest").read_text())
    theirs = {f["Path"] for f in manifest["Files"]}
    # pg_basebackup writes its own backup_label: the label files are the store's, never the copy's.
    theirs -= {"backup_label", "tablespace_map"}
    assert not any(p.endswith("pg_internal.init") for p in ours)
    assert "postmaster.pid" not in ours and "backup_label" not in ours
    assert not any("pgsql_tmp" in p for p in ours)
    assert any(p.startswith("pg_tblspc/") for p in ours), "the tablespace's files are in the backup"
    # Files the server creates or removes on its own between the two listings may differ; nothing else.
    volatile = ("pg_stat/", "pg_logical/", "pg_xact/", "pg_multixact/", "pg_commit_ts/")
    assert {p for p in ours ^ theirs if not p.startswith(volatile)} == set(), sorted(ours ^ theirs)
    assert CONTROL_FILE in ours


def test_walk_yields_pg_control_last_and_pg_wal_empty(cluster):
    entries = list(walk(cluster.datadir))
    assert entries[-1].path == CONTROL_FILE
    wal = [e.path for e in entries if e.path.startswith("pg_wal")]
    assert wal == ["pg_wal", "pg_wal/archive_status"]
    for name in EXCLUDED_DIR_CONTENTS:
        if (cluster.datadir / name).is_dir():
            assert [e.path for e in entries if e.path.startswith(name + "/") or e.path == name] == [name]
    assert all(Path(e.source).is_relative_to(cluster.datadir) or "pg_tblspc" in e.path for e in entries)
