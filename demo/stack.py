"""A real local Airflow for end-to-end tests and the demo, shaped as production runs it.

The metadata DB is a throwaway PostgreSQL cluster (:class:`~pg_safe_backup.local_cluster.LocalCluster`,
reached over 127.0.0.1 with ``postgresql+psycopg2``); the executor is CeleryExecutor with a real Redis broker
(Debian's ``redis-server`` on 127.0.0.1, nothing persisted) and the metadata DB as result backend, or
LocalExecutor. Components: api-server, scheduler, dag-processor, ``triggerers`` triggerers and one Celery
worker per entry of ``workers`` (name -> the queues it listens on). Every component is its own process (and
process group) and logs to ``home/logs/<component>.log``. Everything listens on / talks to 127.0.0.1 only.

    with AirflowStack(tmp / "airflow", dags_folder, extra_env={"AIRFLOW_CONN_PG": uri}) as stack:
        run_id = stack.trigger("my_dag")
        assert stack.wait_for_run("my_dag", run_id) == "success"

    # production shape: two triggerers, the copy pinned to the worker of the database host's queue
    AirflowStack(home, dags, triggerers=2, workers={"default": ["default"], "pg-db1": ["pg-db1"]})

Reads and writes go through the public REST API (simple auth manager, a generated admin password);
task logs are read from the files under ``home/logs``. Nothing here imports Airflow: the caller's process
keeps its own configuration.
"""

from __future__ import annotations

import ast
import atexit
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

import psutil

from pg_safe_backup.local_cluster import LocalCluster

#: The Airflow CLI command of each kind of component. Task logs are read from the files; serve-logs would
#: listen on all interfaces (8793/8794).
COMMANDS: dict[str, list[str]] = {
    "api-server": ["api-server"],  # host/port/workers come from the AIRFLOW__API__* environment
    "scheduler": ["scheduler", "--skip-serve-logs"],
    "dag-processor": ["dag-processor"],
    "triggerer": ["triggerer", "--skip-serve-logs"],
    "worker": ["celery", "worker", "--skip-serve-logs", "--without-mingle", "--without-gossip"],
}
#: Environment variable set in every process of a stack (inherited by executors, task and bash processes),
#: so that :meth:`AirflowStack.stop` finds processes that left the components' process groups.
STACK_ID_VAR = "PGSB_AIRFLOW_STACK_ID"
#: Environment variable naming the component a process belongs to (``worker-pg-db1``, ``triggerer-2``...):
#: a task can tell which worker ran it.
COMPONENT_VAR = "PGSB_AIRFLOW_COMPONENT"
FINAL_RUN_STATES = frozenset({"success", "failed"})
#: Task states after which a task instance of the run does nothing more.
TASK_ENDED = frozenset({"success", "failed", "skipped", "upstream_failed", "removed"})
#: Seconds a REST call may take before it is given up.
API_TIMEOUT_S = 60
#: The queue of tasks that name none (Airflow's [operators] default_queue), and the default worker's.
DEFAULT_QUEUE = "default"
_USER = "admin"
#: Seconds between two "still waiting" lines of a long wait (see ``AirflowStack(progress=...)``).
PROGRESS_EVERY_S = 10.0


class AirflowStackError(RuntimeError):
    """The stack failed to start, a component died, or the REST API refused a request."""


class ApiError(AirflowStackError):
    """The REST API answered with an HTTP error."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class DagImportError(AirflowStackError):
    """A file of the DAGs folder failed to import (the message has Airflow's tracebacks)."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _might_contain_dag(path: Path) -> bool:
    """Airflow's safe-mode heuristic: only files mentioning both 'airflow' and 'dag' are parsed."""
    try:
        content = path.read_bytes().lower()
    except OSError:
        return False
    return b"airflow" in content and b"dag" in content


def _names_dag(path: Path) -> bool:
    """Whether the file's code names ``DAG`` or ``dag`` (called, imported, decorating): a module beside the
    DAGs that they import (a notifier) is parsed too, and yields neither a DAG nor an error."""
    try:
        tree = ast.parse(path.read_bytes())
    except (OSError, SyntaxError, ValueError):
        return True  # Airflow reports it as an import error: wait for that
    for node in ast.walk(tree):
        if isinstance(node, ast.alias):
            names = {node.name.rpartition(".")[2], node.asname}
        else:
            names = {getattr(node, "id", None), getattr(node, "attr", None)}
        if names & {"DAG", "dag"}:
            return True
    return False


class _Wait:
    """One long wait told to a person: a line as it begins, "still waiting for X (N s)" every
    PROGRESS_EVERY_S seconds while it lasts (called from the wait's own polling), one line at its end."""

    def __init__(self, say: Callable[[str], None] | None, begins: str) -> None:
        self.say = say
        self.began = time.monotonic()
        self.next_at = self.began + PROGRESS_EVERY_S
        if say:
            say(begins)

    def seconds(self) -> float:
        return time.monotonic() - self.began

    def until_next(self) -> float:
        """Seconds to the next line: the longest a blocking call of the wait should block."""
        return max(0.1, self.next_at - time.monotonic())

    def still(self, waiting_for: str) -> None:
        if self.say and time.monotonic() >= self.next_at:
            self.next_at = time.monotonic() + PROGRESS_EVERY_S
            self.say(f"still waiting for {waiting_for} ({self.seconds():.0f} s)")

    def ended(self, what: str) -> None:
        if self.say:
            self.say(f"{what} ({self.seconds():.0f} s)")


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _render_log_line(line: str) -> str:
    """Turn one structured (JSON) task-log line into ``timestamp LEVEL logger - event key=value``."""
    try:
        rec = json.loads(line)
    except ValueError:
        return line
    if not isinstance(rec, dict):
        return line
    rec = dict(rec)
    head = " ".join(str(rec.pop(k)) for k in ("timestamp", "level", "logger") if rec.get(k) is not None)
    event = rec.pop("event", "")
    rest = " ".join(f"{k}={v}" for k, v in rec.items())
    return f"{head} - {event}" + (f" {rest}" if rest else "")


class AirflowStack:
    """Starts, drives and stops a local Airflow 3 rooted at ``home`` (metadata in a throwaway PostgreSQL).

    :param home: AIRFLOW_HOME (logs under ``home/logs``).
    :param dags_folder: the DAGs folder.
    :param extra_env: environment of every component (added last: it may override Airflow settings).
    :param executor: ``CeleryExecutor`` (Redis broker, one Celery worker per entry of ``workers``) or
        ``LocalExecutor``.
    :param triggerers: how many triggerers run (named ``triggerer``, ``triggerer-2``, ...).
    :param workers: Celery worker name -> the queues it listens on (component ``worker-<name>``); the
        default is one worker on the default queue. Ignored with LocalExecutor.
    :param progress: told, one line at a time, what a long wait (the start, the stop, a DAG run) waits
        for: as it begins and every ``PROGRESS_EVERY_S`` seconds; None: nothing is told.
    """

    def __init__(
        self,
        home: Path,
        dags_folder: Path,
        extra_env: dict[str, str] | None = None,
        executor: str = "CeleryExecutor",
        triggerers: int = 1,
        workers: dict[str, list[str]] | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        if executor not in ("CeleryExecutor", "LocalExecutor"):
            raise ValueError(f"executor must be CeleryExecutor or LocalExecutor, not {executor!r}")
        if triggerers < 1:
            raise ValueError(f"triggerers must be at least 1, not {triggerers}")
        self.home = Path(home).resolve()
        self.dags_folder = Path(dags_folder).resolve()
        self.extra_env = dict(extra_env or {})
        self.executor = executor
        self.progress = progress
        self.logs_dir = self.home / "logs"
        self.port = _free_port()
        self.api_url = f"http://127.0.0.1:{self.port}"
        self.stack_id = secrets.token_hex(8)
        self._password = secrets.token_urlsafe(16)
        self._db_password = secrets.token_hex(16)
        self._token: str | None = None
        # Component name -> its command line after ``python -m airflow`` (redis-server: the whole line).
        self.components: dict[str, list[str]] = {
            name: COMMANDS[name] for name in ("api-server", "scheduler", "dag-processor")
        }
        for i in range(1, triggerers + 1):
            self.components["triggerer" if i == 1 else f"triggerer-{i}"] = COMMANDS["triggerer"]
        self.redis_port: int | None = None
        if executor == "CeleryExecutor":
            self.redis_port = _free_port()
            for name, queues in (workers or {DEFAULT_QUEUE: [DEFAULT_QUEUE]}).items():
                if not queues:
                    raise ValueError(f"worker {name!r} listens on no queue")
                self.components[f"worker-{name}"] = [
                    *COMMANDS["worker"],
                    "--queues",
                    ",".join(queues),
                    "--celery-hostname",
                    f"{name}@%h",
                ]
        # The metadata DB's cluster lives in a folder of its own that the server's OS user can enter,
        # wherever ``home`` is (a pytest tmp_path is private to root).
        self._db_root: Path | None = None
        self.metadata_db: LocalCluster | None = None
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._started = False
        # Loopback only, whatever proxy the caller's environment configures.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    # ----------------------------------------------------------------------------------------- lifecycle

    @property
    def login(self) -> tuple[str, str]:
        """The UI's and REST API's user and its generated password (simple auth manager; also in
        ``home/passwords.json``)."""
        return _USER, self._password

    @property
    def sql_alchemy_conn(self) -> str:
        """The metadata DB's SQLAlchemy URL (psycopg2, 127.0.0.1); valid once :meth:`start` created it."""
        port = self.metadata_db.port if self.metadata_db else 0
        return f"postgresql+psycopg2://postgres:{self._db_password}@127.0.0.1:{port}/airflow"

    @property
    def env(self) -> dict[str, str]:
        """The environment of every Airflow process of this stack."""
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("AIRFLOW__") and k not in ("AIRFLOW_HOME", "AIRFLOW_CONFIG")
        }
        env.update(
            {
                "AIRFLOW_HOME": str(self.home),
                "AIRFLOW__CORE__DAGS_FOLDER": str(self.dags_folder),
                "AIRFLOW__CORE__EXECUTOR": self.executor,
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self.sql_alchemy_conn,
                "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                "AIRFLOW__CORE__PARALLELISM": "4",
                "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "3",
                "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.api_url}/execution/",
                "AIRFLOW__API_AUTH__JWT_SECRET": f"jwt-{self.stack_id}-{self._password}",
                "AIRFLOW__API__SECRET_KEY": f"api-{self.stack_id}-{self._password}",
                "AIRFLOW__API__HOST": "127.0.0.1",
                "AIRFLOW__API__PORT": str(self.port),
                "AIRFLOW__API__WORKERS": "1",
                "AIRFLOW__API__BASE_URL": self.api_url,
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{_USER}:admin",
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(self.home / "passwords.json"),
                # The default (getfqdn) may ask a DNS server; the hostname is all a single machine needs.
                "AIRFLOW__CORE__HOSTNAME_CALLABLE": "socket.gethostname",
                "AIRFLOW__OPERATORS__DEFAULT_QUEUE": DEFAULT_QUEUE,
                # A held backup whose finish ended unseen (a test's fault) fails within 10 s, not 30.
                "AIRFLOW__PG_SAFE_BACKUP__HOLDER_CHECK_PERIOD": "10",
                "NO_PROXY": "127.0.0.1,localhost",
                "no_proxy": "127.0.0.1,localhost",
                "PYTHONUNBUFFERED": "1",
                STACK_ID_VAR: self.stack_id,
            }
        )
        if self.redis_port:
            env.update(
                {
                    "AIRFLOW__CELERY__BROKER_URL": f"redis://127.0.0.1:{self.redis_port}/0",
                    "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + self.sql_alchemy_conn,
                }
            )
        env.update(self.extra_env)
        if self.redis_port and "AIRFLOW__CELERY__WORKER_CONCURRENCY" not in env:
            # Each worker can run as many tasks at once as the whole stack may.
            env["AIRFLOW__CELERY__WORKER_CONCURRENCY"] = env["AIRFLOW__CORE__PARALLELISM"]
        return env

    def start(self, timeout: float = 180, expect_dag_ids: Iterable[str] = ()) -> AirflowStack:
        """Create the metadata DB, start the broker and every component, wait until all are ready.

        Waits for the API, every triggerer and Celery worker, and every ``*.py`` file of the DAGs folder
        that Airflow would parse (it mentions both 'airflow' and 'dag') to yield a DAG or an import error,
        and for ``expect_dag_ids``. Raises :class:`DagImportError` or :class:`AirflowStackError` (with the
        component logs) otherwise; nothing is left running when it raises.
        """
        if self._started:
            return self
        self._started = True
        atexit.register(self.stop)
        wait = _Wait(self.progress, f"starting Airflow (its logs: {self.logs_dir})")
        try:
            deadline = time.monotonic() + timeout
            self.logs_dir.mkdir(parents=True, exist_ok=True)
            (self.home / "passwords.json").write_text(json.dumps({_USER: self._password}) + "\n")
            self._start_metadata_db()
            if self.redis_port:
                self._spawn_redis()
            self._migrate(timeout, wait)
            for name in self.components:
                if name not in self._procs:  # redis already runs
                    self._spawn(name)
            self._wait_ready(deadline, set(expect_dag_ids), wait)
        except BaseException:
            self.stop()
            raise
        wait.ended(f"Airflow ready at {self.api_url}")
        return self

    def _start_metadata_db(self) -> None:
        self._db_root = Path(tempfile.mkdtemp(prefix="pgsb-airflow-db-"))
        os.chmod(self._db_root, 0o755)
        # max_connections: every component's pool, the Celery result backend, and the tests' own queries.
        self.metadata_db = (
            LocalCluster(self._db_root / "data")
            .init(password=self._db_password, settings={"max_connections": 200})
            .start()
        )
        self.metadata_db.sql("CREATE DATABASE airflow")

    def _spawn_redis(self) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not os.path.exists(binary):
            raise AirflowStackError("redis-server is not installed: run `make prereqs` (Debian redis-server)")
        assert self._db_root is not None
        redis_dir = self._db_root / "redis"
        redis_dir.mkdir()
        # Loopback only, nothing persisted (no RDB snapshots, no AOF), in the foreground.
        self.components["redis"] = [
            binary,
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.redis_port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(redis_dir),
            "--daemonize",
            "no",
        ]
        self._spawn("redis")

    def metadata_sql(self, query: str, params: Any = None) -> list[tuple]:
        """Rows of one query on the metadata DB (for checks the REST API does not offer)."""
        if self.metadata_db is None:
            raise AirflowStackError("the stack is not started: it has no metadata DB")
        return self.metadata_db.sql(query, params, dbname="airflow")

    def _migrate(self, timeout: float, wait: _Wait) -> None:
        log = self.logs_dir / "db-migrate.log"
        deadline = time.monotonic() + timeout
        with log.open("ab") as out:
            migrate = subprocess.Popen(
                [sys.executable, "-m", "airflow", "db", "migrate"],
                env=self.env,
                cwd=self.home,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            while True:
                try:
                    rc = migrate.wait(min(wait.until_next(), max(0.0, deadline - time.monotonic())))
                    break
                except subprocess.TimeoutExpired:
                    if time.monotonic() >= deadline:
                        migrate.kill()
                        migrate.wait()
                        raise AirflowStackError(
                            f"airflow db migrate did not end in {timeout:g}s:\n{self._tail(log, 60)}"
                        ) from None
                    wait.still("the metadata DB's migration (airflow db migrate)")
        if rc != 0:
            raise AirflowStackError(f"airflow db migrate failed ({rc}):\n{self._tail(log, 60)}")

    def _spawn(self, name: str) -> None:
        command = self.components[name]
        if name != "redis":
            command = [sys.executable, "-m", "airflow", *command]
        with (self.logs_dir / f"{name}.log").open("ab") as out:
            self._procs[name] = subprocess.Popen(
                command,
                env={**self.env, COMPONENT_VAR: name},
                cwd=self.home,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def _check_alive(self) -> None:
        dead = {n: p.returncode for n, p in self._procs.items() if p.poll() is not None}
        if dead:
            raise AirflowStackError(f"Airflow component(s) exited: {dead}\n{self.dump_logs()}")

    def _wait_ready(self, deadline: float, expect_dag_ids: set[str], wait: _Wait) -> None:
        waiting_for = "the api-server"
        while True:
            self._check_alive()
            try:
                waiting_for = self._not_ready(expect_dag_ids)
            except (OSError, ApiError) as exc:  # api-server not up yet
                waiting_for = f"the api-server ({exc})"
            if not waiting_for:
                return
            if time.monotonic() > deadline:
                raise AirflowStackError(
                    f"Airflow not ready in time, waiting for {waiting_for}\n{self.dump_logs()}"
                )
            wait.still(waiting_for)
            time.sleep(0.5)

    def _not_ready(self, expect_dag_ids: set[str]) -> str:
        """What the stack still waits for ('' when ready); raises on DAG import errors."""
        health = self._api("GET", "/api/v2/monitor/health", auth=False)
        unhealthy = [
            c
            for c in ("metadatabase", "scheduler", "triggerer", "dag_processor")
            if (health.get(c) or {}).get("status") != "healthy"
        ]
        if unhealthy:
            return f"healthy components: {unhealthy}"
        triggerers = [n for n in self.components if n.startswith("triggerer")]
        running = self.metadata_sql(
            "SELECT count(*) FROM job WHERE job_type = 'TriggererJob' AND state = 'running'"
        )[0][0]
        if running < len(triggerers):
            return f"triggerers: {running} of {len(triggerers)} running"
        # Celery logs "<node name> ready." once the worker consumes its queues.
        workers = [n for n in self.components if n.startswith("worker-")]
        not_ready = [n for n in workers if " ready." not in self._tail(self.logs_dir / f"{n}.log", 10**6)]
        if not_ready:
            return f"Celery workers {not_ready}"
        errors = self._get_all("/api/v2/importErrors", "import_errors")
        if errors:
            text = "\n".join(f"--- {e['filename']}\n{e['stack_trace']}" for e in errors)
            raise DagImportError(f"DAG import errors in {self.dags_folder}:\n{text}")
        dags = self._get_all("/api/v2/dags", "dags")
        parsed = {d.get("relative_fileloc") or "" for d in dags} | {d["fileloc"] for d in dags}
        missing = [
            str(p.relative_to(self.dags_folder))
            for p in self.dag_files()
            if str(p.relative_to(self.dags_folder)) not in parsed and str(p) not in parsed
        ]
        missing += sorted(expect_dag_ids - {d["dag_id"] for d in dags})
        return f"DAGs parsed from {missing}" if missing else ""

    def dag_files(self) -> list[Path]:
        """The files of the DAGs folder the dag-processor parses (safe-mode heuristic, no .airflowignore)
        whose code names a DAG."""
        files = (
            p
            for p in self.dags_folder.rglob("*.py")
            if not any(
                part.startswith((".", "__pycache__")) for part in p.relative_to(self.dags_folder).parts
            )
        )
        return sorted(p for p in files if _might_contain_dag(p) and _names_dag(p))

    def pids(self) -> dict[str, int]:
        """Component name -> pid of its (running or dead) main process."""
        return {name: p.pid for name, p in self._procs.items()}

    def processes(self) -> list[psutil.Process]:
        """Every live process of this stack: the components, their descendants, and anything carrying its
        id."""
        found: dict[int, psutil.Process] = {}
        for p in self._procs.values():
            if p.poll() is not None:  # reaped: its pid may belong to someone else by now
                continue
            try:
                proc = psutil.Process(p.pid)
                found[proc.pid] = proc
                found.update((c.pid, c) for c in proc.children(recursive=True))
            except psutil.NoSuchProcess:
                pass
        marker = f"{STACK_ID_VAR}={self.stack_id}".encode()
        for pid in psutil.pids():
            if pid == os.getpid() or pid in found:
                continue
            try:
                if marker in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                    found[pid] = psutil.Process(pid)
            except (OSError, psutil.Error):
                pass
        return [p for p in found.values() if _alive(p)]

    def kill_component(self, name: str) -> None:
        """SIGKILL the component's whole process group (a crash); its task processes may live on."""
        proc = self._procs[self._name(name)]
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(30)

    def restart_component(self, name: str, timeout: float = 60) -> None:
        """Stop the component if it still runs (SIGTERM, then SIGKILL) and start it again."""
        name = self._name(name)
        proc = self._procs[name]
        if proc.poll() is None:
            self._terminate_groups([proc])
        self._spawn(name)
        if name == "api-server":
            deadline = time.monotonic() + timeout
            while True:
                try:
                    self._api("GET", "/api/v2/monitor/health", auth=False)
                    return
                except (OSError, ApiError):
                    if time.monotonic() > deadline:
                        raise AirflowStackError(f"api-server did not come back\n{self.dump_logs()}") from None
                    time.sleep(0.5)

    def _name(self, name: str) -> str:
        name = name.replace("_", "-")
        if name not in self.components:
            raise ValueError(f"unknown component {name!r}, one of {list(self.components)}")
        return name

    def _terminate_groups(
        self, procs: list[subprocess.Popen[bytes]], grace: float = 10, wait: _Wait | None = None
    ) -> None:
        # Only leaders not reaped yet: the pid of a reaped leader with an empty group may be reused.
        procs = [p for p in procs if p.poll() is None]
        names = {p.pid: name for name, p in self._procs.items()}
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for p in procs:
                try:
                    os.killpg(p.pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
            deadline = time.monotonic() + (grace if sig == signal.SIGTERM else 30)
            for p in procs:
                while p.poll() is None and time.monotonic() < deadline:
                    told = wait.until_next() if wait else grace  # a line every PROGRESS_EVERY_S meanwhile
                    try:
                        p.wait(max(0.1, min(deadline - time.monotonic(), told)))
                    except subprocess.TimeoutExpired:
                        if wait:
                            running = [names.get(q.pid, str(q.pid)) for q in procs if q.poll() is None]
                            wait.still(f"{', '.join(running)} to exit")
            if all(p.poll() is not None for p in procs):
                # The leaders are gone; whatever else is left in their groups gets killed below.
                for p in procs:
                    try:
                        os.killpg(p.pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
                return

    def stop(self) -> None:
        """Stop every component (SIGTERM to the groups, SIGKILL after ~10 s) and kill any leftover process."""
        atexit.unregister(self.stop)
        wait = _Wait(self.progress if self._procs else None, "stopping Airflow")
        leftovers = self.processes()  # before the leaders die: task processes sit in groups of their own
        self._terminate_groups(list(self._procs.values()), wait=wait)
        for _ in range(3):
            leftovers = [p for p in {q.pid: q for q in leftovers + self.processes()}.values() if _alive(p)]
            if not leftovers:
                break
            for p in leftovers:
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass
            psutil.wait_procs(leftovers, timeout=10)
        self._token = None
        self._started = False
        self._procs = {}
        if self.metadata_db is not None:
            self.metadata_db.stop("immediate")
            self.metadata_db = None
        if self._db_root is not None:
            shutil.rmtree(self._db_root, ignore_errors=True)
            self._db_root = None
        wait.ended("Airflow stopped")

    def __enter__(self) -> AirflowStack:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # ---------------------------------------------------------------------------------------- REST API

    def _api(self, method: str, path: str, body: Any = None, auth: bool = True, _retry: bool = True) -> Any:
        """One JSON request to the api-server; raises ApiError on HTTP errors (an HTTP 500 with the
        api-server's own log of the error), OSError if unreachable."""
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if auth:
            headers["Authorization"] = f"Bearer {self._get_token()}"
        req = urllib.request.Request(self.api_url + path, data=data, headers=headers, method=method)
        try:
            with self._opener.open(req, timeout=API_TIMEOUT_S) as resp:
                raw = resp.read()
            return json.loads(raw) if raw else None
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")
            if exc.code == 401 and auth and _retry:
                self._token = None
                return self._api(method, path, body, auth, _retry=False)
            raise ApiError(
                f"{method} {path}: HTTP {exc.code} {detail}{self._server_error(detail)}", exc.code
            ) from None

    def _server_error(self, detail: str) -> str:
        """The api-server log's lines about the error id an HTTP 500 answer names ("look for ID ..."), if
        any."""
        match = re.search(r"look for ID (\w+)", detail)
        if not match:
            return ""
        lines = (self.logs_dir / "api-server.log").read_text(errors="replace").splitlines()
        for i, line in enumerate(lines):
            if f"Error with id {match.group(1)}" in line:
                return "\napi-server log:\n" + "\n".join(lines[i : i + 40])
        return ""

    def _get_token(self) -> str:
        if self._token is None:
            resp = self._api(
                "POST", "/auth/token", {"username": _USER, "password": self._password}, auth=False
            )
            self._token = resp["access_token"]
        return self._token

    def _get_all(self, path: str, field: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        sep = "&" if "?" in path else "?"
        while True:
            page = self._api("GET", f"{path}{sep}limit=100&offset={len(items)}")
            items += page[field]
            if not page[field] or len(items) >= page["total_entries"]:
                return items

    @staticmethod
    def _q(value: str) -> str:
        return urllib.parse.quote(value, safe="")

    def trigger(self, dag_id: str, conf: dict[str, Any] | None = None, run_id: str | None = None) -> str:
        """Unpause the DAG and start a manual run; returns its run_id."""
        self._api("PATCH", f"/api/v2/dags/{self._q(dag_id)}", {"is_paused": False})
        run_id = run_id or f"stack__{time.strftime('%Y%m%dT%H%M%S')}_{secrets.token_hex(3)}"
        resp = self._api(
            "POST",
            f"/api/v2/dags/{self._q(dag_id)}/dagRuns",
            {"dag_run_id": run_id, "logical_date": None, "conf": conf or {}},
        )
        return resp["dag_run_id"]

    def add_pool(self, name: str, slots: int, include_deferred: bool = True) -> None:
        """Create the pool ``name`` (POST /api/v2/pools), counting deferred tasks by default."""
        body = {"name": name, "slots": slots, "include_deferred": include_deferred}
        self._api("POST", "/api/v2/pools", body)

    def run_state(self, dag_id: str, run_id: str) -> str:
        """The DAG run's state ('queued', 'running', 'success', 'failed')."""
        return self._api("GET", f"/api/v2/dags/{self._q(dag_id)}/dagRuns/{self._q(run_id)}")["state"]

    def task_states(self, dag_id: str, run_id: str) -> dict[str, str]:
        """task_id (``task_id[i]`` for mapped instances) -> state; 'none' before the scheduler set one."""
        tis = self._get_all(
            f"/api/v2/dags/{self._q(dag_id)}/dagRuns/{self._q(run_id)}/taskInstances", "task_instances"
        )
        return {
            (ti["task_id"] if ti.get("map_index", -1) < 0 else f"{ti['task_id']}[{ti['map_index']}]"): (
                ti["state"] or "none"
            )
            for ti in tis
        }

    def task_queues(self, dag_id: str, run_id: str) -> dict[str, str]:
        """task_id -> the queue its task instance was sent to (the Celery workers listening on it ran it)."""
        tis = self._get_all(
            f"/api/v2/dags/{self._q(dag_id)}/dagRuns/{self._q(run_id)}/taskInstances", "task_instances"
        )
        return {ti["task_id"]: ti["queue"] for ti in tis}

    def wait_for_run(
        self,
        dag_id: str,
        run_id: str,
        timeout: float = 300,
        on_progress: Callable[[dict[str, str]], None] | None = None,
        poll_interval: float = 1.0,
    ) -> str:
        """Poll until the run ends; returns its final state. ``on_progress(states)`` gets every change.

        An api-server that is down or answers 5xx (e.g. during a fault test) is waited for, not an error.
        """
        deadline = time.monotonic() + timeout
        last: dict[str, str] | None = None
        state = "unknown"
        wait = _Wait(self.progress, f"waiting for the {dag_id} run {run_id} to end")
        while True:
            try:
                states = self.task_states(dag_id, run_id)
                if on_progress and states != last:
                    on_progress(states)
                last = states
                state = self.run_state(dag_id, run_id)
                if state in FINAL_RUN_STATES:
                    final = self.task_states(dag_id, run_id)
                    if on_progress and final != last:
                        on_progress(final)
                    wait.ended(f"the {dag_id} run ended: {state}")
                    return state
            except (OSError, ApiError) as exc:
                if isinstance(exc, ApiError) and exc.status < 500:
                    raise
                state = f"unknown ({exc})"
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{dag_id} run {run_id} still {state} after {timeout}s; tasks {last}\n{self.dump_logs()}"
                )
            going = ", ".join(
                f"{t}={s}" for t, s in sorted((last or {}).items()) if s not in TASK_ENDED and s != "none"
            )
            wait.still(f"the {dag_id} run ({state}{'; ' + going if going else ''})")
            time.sleep(poll_interval)

    def xcom(
        self, dag_id: str, run_id: str, task_id: str, key: str = "return_value", map_index: int = -1
    ) -> Any:
        """The XCom value as stored (JSON); Airflow-serialized types (tuples, ...) come back in serde form."""
        path = (
            f"/api/v2/dags/{self._q(dag_id)}/dagRuns/{self._q(run_id)}/taskInstances/{self._q(task_id)}"
            f"/xcomEntries/{self._q(key)}?map_index={map_index}"
        )
        return self._api("GET", path)["value"]

    # -------------------------------------------------------------------------------------------- logs

    def task_log_files(self, dag_id: str, run_id: str, task_id: str) -> list[Path]:
        """The task's log files (all attempts, all map indexes), oldest attempt first."""
        base = self.logs_dir / f"dag_id={dag_id}" / f"run_id={run_id}" / f"task_id={task_id}"

        def order(p: Path) -> tuple[str, int, int]:
            # attempt=1.log, attempt=1.log.trigger.<id>.log (the triggerer's part), attempt=2.log, ...
            m = re.fullmatch(r"attempt=(\d+)\.log(?:\.trigger\.(\d+)\.log)?", p.name)
            return (str(p.parent), int(m[1]), int(m[2] or -1)) if m else (str(p.parent), 1 << 30, 0)

        return sorted(base.rglob("attempt=*.log"), key=order) if base.is_dir() else []

    def task_log(self, dag_id: str, run_id: str, task_id: str, raw: bool = False) -> str:
        """The text of all the task's log files; structured (JSON) lines rendered readable unless ``raw``."""
        parts = []
        for path in self.task_log_files(dag_id, run_id, task_id):
            text = path.read_text(errors="replace")
            if not raw:
                text = "\n".join(_render_log_line(line) for line in text.splitlines())
            parts.append(f"==> {path.relative_to(self.logs_dir)} <==\n{text}\n")
        return "".join(parts)

    @staticmethod
    def _tail(path: Path, lines: int) -> str:
        try:
            return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        except OSError as exc:
            return f"({exc})"

    def dump_logs(self, lines: int = 40) -> str:
        """The last ``lines`` lines of each component log, for failure messages."""
        logs = [self.logs_dir / f"{name}.log" for name in ("db-migrate", *self.components)]
        return "\n".join(
            f"===== {log.name} (last {lines} lines) =====\n{self._tail(log, lines)}"
            for log in logs
            if log.exists()
        )
