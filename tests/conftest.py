"""Fixtures: throwaway PostgreSQL clusters (initdb into a temp dir, 127.0.0.1 / unix socket only)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

try:
    import tomllib
except ImportError:  # Python 3.10: pytest's own dependency
    import tomli as tomllib

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from pg_safe_backup.hooks.backup import PostgresBackupHook
from pg_safe_backup.local_cluster import (
    SERVER_USER,
    TEMPLATES_ENV,
    LocalCluster,
    as_server_user,
    free_port,
    give_to_server_user,
)

from pg_versions import select_major

_BINARIES = select_major()
PASSWORD = "s3cret-Pa55"
ROOT = Path(__file__).resolve().parents[1]
CONN_ID = "pg_test"


def pytest_report_header() -> str:
    return _BINARIES


def pytest_configure(config: pytest.Config) -> None:
    """One initdb per binaries folder and password, every other cluster a copy of it (see
    :meth:`LocalCluster.init`; ``fresh=True`` where a test needs another system identifier). The
    templates live in a folder of this run's own, which the postgres OS user can enter."""
    if not os.environ.get(TEMPLATES_ENV):
        templates = tempfile.mkdtemp(prefix="pgsb-templates-")
        os.chmod(templates, 0o755)
        os.environ[TEMPLATES_ENV] = templates
        config.add_cleanup(
            lambda: (shutil.rmtree(templates, ignore_errors=True), os.environ.pop(TEMPLATES_ENV))
        )


def pyproject(folder: Path = ROOT) -> dict[str, Any]:
    """The provider's pyproject.toml (default) or the core distribution's (``ROOT / "core"``), parsed."""
    return tomllib.loads((folder / "pyproject.toml").read_text())


def airflow_floor() -> Version:
    """The lowest Airflow the package allows: X of its ``apache-airflow>=X`` dependency."""
    for line in pyproject()["project"]["dependencies"]:
        req = Requirement(line)
        if req.name == "apache-airflow":
            (spec,) = req.specifier
            assert spec.operator == ">=", f"the Airflow floor is stated as >=X, not {req}"
            return Version(spec.version)
    raise AssertionError("pyproject.toml does not depend on apache-airflow")


def serialization_round_trip(dag: Any) -> Any:
    """``dag`` serialized and read back as the scheduler reads it.

    :param dag: the DAG to serialize.
    """
    try:
        from airflow.serialization.serialized_objects import DagSerialization
    except ImportError:  # Airflow < 3.2 names it SerializedDAG
        from airflow.serialization.serialized_objects import SerializedDAG as DagSerialization
    return DagSerialization.from_dict(DagSerialization.to_dict(dag))


def _server_reachable_root() -> Iterator[Path]:
    """A temp folder the postgres OS user can enter (pytest's tmp_path lives under /tmp/pytest-of-root)."""
    root = Path(tempfile.mkdtemp(prefix="pgsb-test-"))
    os.chmod(root, 0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def tmp_root() -> Iterator[Path]:
    yield from _server_reachable_root()


@pytest.fixture(scope="module")
def module_tmp_root() -> Iterator[Path]:
    """The same, shared by the tests of a module (for the clusters and copies they only read)."""
    yield from _server_reachable_root()


@pytest.fixture(scope="session")
def session_tmp_root() -> Iterator[Path]:
    """The same, shared by the whole session (for what several modules read and none changes)."""
    yield from _server_reachable_root()


@pytest.fixture(scope="session")
def taken() -> Iterator[Any]:
    """One backup with its manifest, shared by test_manifest and test_checks (a
    :class:`backup_helpers.Taken`; see :func:`backup_helpers.taken_backup`): built once per session."""
    from backup_helpers import taken_backup  # backup_helpers imports this module

    with taken_backup() as backup:
        yield backup


@pytest.fixture(scope="session")
def other_archive(session_tmp_root: Path) -> Path:
    """A WAL archive of another cluster (test_restore, test_checks): the first segment initdb wrote."""
    from backup_helpers import another_clusters_archive

    return another_clusters_archive(session_tmp_root)


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


class PgBouncer:
    """A real pgbouncer on 127.0.0.1 in front of ``cluster`` (as the postgres OS user when root), registered
    as the Airflow connection ``conn_id``; md5 with the test password on both of its sides.

    :param pool_mode: ``session`` or ``transaction``.
    :param ignore_options: accept (and drop) the ``options`` startup parameter, as deployments that pass
        libpq options through pgbouncer configure it; without it pgbouncer refuses such a client.
    """

    def __init__(
        self, cluster: LocalCluster, folder: Path, conn_id: str, pool_mode: str, ignore_options: bool = True
    ) -> None:
        self.cluster, self.folder, self.conn_id, self.pool_mode = cluster, folder, conn_id, pool_mode
        self.ignore_options = ignore_options
        self.port = free_port()
        self.logfile = folder / "pgbouncer.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30) -> PgBouncer:
        binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
        if not os.path.exists(binary):
            raise RuntimeError("pgbouncer is not installed: run `make prereqs` (Debian package pgbouncer)")
        self.folder.mkdir(parents=True)
        (self.folder / "userlist.txt").write_text(f'"{SERVER_USER}" "{PASSWORD}"\n')
        ignored = "extra_float_digits" + (",options" if self.ignore_options else "")
        (self.folder / "pgbouncer.ini").write_text(
            f"[databases]\n* = host=127.0.0.1 port={self.cluster.port}\n"
            f"[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {self.port}\nunix_socket_dir =\n"
            f"auth_type = md5\nauth_file = {self.folder / 'userlist.txt'}\npool_mode = {self.pool_mode}\n"
            f"ignore_startup_parameters = {ignored}\nlogfile = {self.logfile}\n"
            f"pidfile = {self.folder / 'pgbouncer.pid'}\n"
        )
        give_to_server_user(self.folder)
        # Its own process group, so stop() ends pgbouncer and not only the runuser in front of it.
        self.proc = subprocess.Popen(
            as_server_user([binary, str(self.folder / "pgbouncer.ini")]),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"pgbouncer did not start listening on {self.port}:\n{self.log_text()}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(15)

    def log_text(self) -> str:
        return self.logfile.read_text(errors="replace") if self.logfile.exists() else ""

    def airflow_conn_uri(self, **extra: str) -> str:
        """The Airflow connection URI through this pgbouncer; ``extra`` becomes the connection's extra."""
        query = f"?{urlencode(extra)}" if extra else ""
        return f"postgres://{SERVER_USER}:{quote(PASSWORD, safe='')}@127.0.0.1:{self.port}/postgres{query}"


@pytest.fixture
def pgbouncer(
    cluster: LocalCluster, tmp_root: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., PgBouncer]]:
    """Start pgbouncers in front of ``cluster``: ``pgbouncer(pool_mode, conn_id=..., ignore_options=...,
    **extra)`` returns a running one, reachable through the Airflow connection ``conn_id`` (with
    ``extra``); all are stopped at the end."""
    started: list[PgBouncer] = []

    def start(
        pool_mode: str = "session", conn_id: str = "pg_pooled", ignore_options: bool = True, **extra: str
    ) -> PgBouncer:
        bouncer = PgBouncer(
            cluster, tmp_root / f"pgbouncer-{len(started)}", conn_id, pool_mode, ignore_options
        )
        started.append(bouncer)
        bouncer.start()
        monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", bouncer.airflow_conn_uri(**extra))
        return bouncer

    yield start
    for bouncer in started:
        bouncer.stop()


@pytest.fixture
def task_context() -> Callable[..., dict]:
    """``task_context(task, conf=None, try_number=1)``: the context the Task SDK gives ``task`` when it runs
    in a manual DAG run with ``conf`` (``params`` merged from it), built as the worker builds it, without a
    server: templates render through it; XCom and task states, which ask the server, do not work."""
    import uuid

    import pendulum

    from airflow.sdk.api.datamodels._generated import DagRun, DagRunState, DagRunType, TIRunContext
    from airflow.sdk.execution_time.task_runner import RuntimeTaskInstance

    def make(task: Any, conf: dict | None = None, try_number: int = 1) -> dict:
        now = pendulum.now("UTC")
        # partition_key: Task SDK 1.2+ (Airflow 3.2) has it and requires it; 1.1 forbids it.
        extra = {"partition_key": None} if "partition_key" in DagRun.model_fields else {}
        run = DagRun(
            dag_id=task.dag_id,
            run_id="manual__templating",
            logical_date=now,
            data_interval_start=now,
            data_interval_end=now,
            run_after=now,
            start_date=now,
            end_date=None,
            run_type=DagRunType.MANUAL,
            state=DagRunState.RUNNING,
            conf=conf or {},
            consumed_asset_events=[],
            **extra,
        )
        ti = RuntimeTaskInstance.model_construct(
            id=uuid.uuid4(),
            task_id=task.task_id,
            dag_id=task.dag_id,
            run_id=run.run_id,
            try_number=try_number,
            dag_version_id=uuid.uuid4(),
            map_index=-1,
            task=task,
            bundle_instance=None,
            _ti_context_from_server=TIRunContext(dag_run=run, max_tries=task.retries),
            max_tries=task.retries,
            start_date=now,
        )
        return ti.get_template_context()

    return make
