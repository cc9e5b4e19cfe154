"""The tests' clusters: one initdb per binaries folder and password, every other cluster a copy of it
(conftest sets $PGSB_CLUSTER_TEMPLATES); ``fresh=True`` runs initdb for a cluster of its own."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pg_safe_backup.local_cluster import TEMPLATES_ENV, LocalCluster

from conftest import PASSWORD


def system_identifier(cluster: LocalCluster) -> int:
    return cluster.sql("SELECT system_identifier FROM pg_control_system()")[0][0]


def test_copies_of_the_template_are_working_clusters_with_their_settings_and_one_identity(tmp_root: Path):
    a = LocalCluster(tmp_root / "a" / "data").init(password=PASSWORD, settings={"work_mem": "'7MB'"}).start()
    b = LocalCluster(tmp_root / "b" / "data").init(password=PASSWORD).start()
    fresh = LocalCluster(tmp_root / "c" / "data").init(password=PASSWORD, fresh=True).start()
    try:
        assert a.sql("SHOW work_mem") == [("7MB",)]
        assert b.sql("SHOW work_mem") == [("4MB",)]  # the template's own postgresql.conf, untouched
        a.sql("CREATE TABLE only_in_a (i int)")
        assert b.sql("SELECT to_regclass('only_in_a') IS NULL") == [(True,)]
        assert system_identifier(a) == system_identifier(b)
        assert system_identifier(fresh) != system_identifier(a)
        assert (a.datadir.stat().st_mode & 0o777) == 0o700
    finally:
        for c in (a, b, fresh):
            c.stop("immediate")
    templates = Path(os.environ[TEMPLATES_ENV])
    names = [p.name for p in templates.iterdir()]
    assert names and not any(PASSWORD in n or n.startswith(".") for n in names)  # digests, none half-built


def test_a_folder_with_files_is_refused_as_initdb_refuses_it(tmp_root: Path):
    datadir = tmp_root / "data"
    datadir.mkdir()
    (datadir / "keep.txt").write_text("mine")
    with pytest.raises(
        FileExistsError, match=f"cannot create a cluster in {datadir}: the folder is not empty"
    ):
        LocalCluster(datadir).init()
    assert [p.name for p in datadir.iterdir()] == ["keep.txt"]
