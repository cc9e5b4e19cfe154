"""Fixtures: throwaway PostgreSQL clusters (initdb into a temp dir, 127.0.0.1 / unix socket only)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pg_safe_backup.hooks.backup import PostgresBackupHook
from pg_safe_backup.local_cluster import LocalCluster
from pg_versions import select_major

_BINARIES = select_major()
PASSWORD = "s3cret-Pa55"
CONN_ID = "pg_test"


def pytest_report_header() -> str:
    return _BINARIES


@pytest.fixture
def tmp_root() -> Iterator[Path]:
    """A temp folder the postgres OS user can enter (pytest's tmp_path lives under /tmp/pytest-of-root)."""
    root = Path(tempfile.mkdtemp(prefix="pgsb-test-"))
    os.chmod(root, 0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def cluster(tmp_root: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalCluster]:
    """A running cluster, reachable through the Airflow connection ``pg_test``; logs every statement."""
    c = LocalCluster(tmp_root / "data").init(password=PASSWORD, settings={"log_statement": "'all'"}).start()
    monkeypatch.setenv(f"AIRFLOW_CONN_{CONN_ID.upper()}", c.airflow_conn_uri(password=PASSWORD))
    try:
        yield c
    finally:
        c.stop("immediate")


@pytest.fixture
def hook(cluster: LocalCluster) -> PostgresBackupHook:
    return PostgresBackupHook(CONN_ID)
