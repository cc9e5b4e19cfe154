"""A real local Airflow (api-server, scheduler, dag-processor, triggerer) for end-to-end tests and the demo.

LocalExecutor on a SQLite metadata DB under ``home``; every component is its own process (and process
group) and logs to ``home/logs/<component>.log``. Everything listens on / talks to 127.0.0.1 only.

    with AirflowStack(tmp / "airflow", dags_folder, extra_env={"AIRFLOW_CONN_PG": uri}) as stack:
        run_id = stack.trigger("my_dag")
        assert stack.wait_for_run("my_dag", run_id) == "success"

Reads and writes go through the public REST API (simple auth manager, a generated admin password);
task logs are read from the files under ``home/logs``. Nothing here imports Airflow: the caller's process
keeps its own configuration.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

import psutil

COMPONENTS: dict[str, list[str]] = {
    "api-server": ["api-server"],  # host/port/workers come from the AIRFLOW__API__* environment
    # Task logs are read from the files; serve-logs would listen on all interfaces (8793/8794).
    "scheduler": ["scheduler", "--skip-serve-logs"],
    "dag-processor": ["dag-processor"],
    "triggerer": ["triggerer", "--skip-serve-logs"],
}
#: Environment variable set in every process of a stack (inherited by executors, task and bash processes),
#: so that :meth:`AirflowStack.stop` finds processes that left the components' process groups.
STACK_ID_VAR = "PGSB_AIRFLOW_STACK_ID"
FINAL_RUN_STATES = frozenset({"success", "failed"})
# SQLite busy timeout of every Airflow process (Python's default, 5 s, is short for four components and
# LocalExecutor workers writing one file on a busy 2-core machine), and retries of an API call that still
# hit a database error.
SQLITE_BUSY_TIMEOUT_S = 60
API_DB_ERROR_RETRIES = 3
#: Seconds a REST call may take: longer than the SQLite busy timeout, so that a request the api-server
#: holds while it waits for the database lock is answered (or fails with its database error), not cut off.
API_TIMEOUT_S = SQLITE_BUSY_TIMEOUT_S + 30
_USER = "admin"


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
    """Starts, drives and stops a local Airflow 3 (LocalExecutor, SQLite) rooted at ``home``."""

    def __init__(self, home: Path, dags_folder: Path, extra_env: dict[str, str] | None = None) -> None:
        self.home = Path(home).resolve()
        self.dags_folder = Path(dags_folder).resolve()
        self.extra_env = dict(extra_env or {})
        self.logs_dir = self.home / "logs"
        self.db_path = self.home / "airflow.db"
        self.port = _free_port()
        self.api_url = f"http://127.0.0.1:{self.port}"
        self.stack_id = secrets.token_hex(8)
        self._password = secrets.token_urlsafe(16)
        self._token: str | None = None
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._started = False
        # Loopback only, whatever proxy the caller's environment configures.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    # ----------------------------------------------------------------------------------------- lifecycle

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
                "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{self.db_path}?timeout={SQLITE_BUSY_TIMEOUT_S}",
                "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                "AIRFLOW__CORE__PARALLELISM": "4",
                "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "3",
                "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.api_url}/execution/",
                # Tasks' and triggers' calls to the execution API (default 5 s) also wait on the SQLite lock:
                # cut
                # off and retried, a state change already made comes back 409 and fails a healthy task.
                "AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT": str(API_TIMEOUT_S),
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
                "NO_PROXY": "127.0.0.1,localhost",
                "no_proxy": "127.0.0.1,localhost",
                "PYTHONUNBUFFERED": "1",
                STACK_ID_VAR: self.stack_id,
            }
        )
        env.update(self.extra_env)
        return env

    def start(self, timeout: float = 120, expect_dag_ids: Iterable[str] = ()) -> AirflowStack:
        """Migrate the DB, start the four components and wait until the API answers and the DAGs are parsed.

        Waits for every ``*.py`` file of the DAGs folder that Airflow would parse (it mentions both
        'airflow' and 'dag') to yield a DAG or an import error, and for ``expect_dag_ids``. Raises
        :class:`DagImportError` or :class:`AirflowStackError` (with the component logs) otherwise; nothing is
        left
        running when it raises.
        """
        if self._started:
            return self
        self._started = True
        atexit.register(self.stop)
        try:
            deadline = time.monotonic() + timeout
            self.logs_dir.mkdir(parents=True, exist_ok=True)
            (self.home / "passwords.json").write_text(json.dumps({_USER: self._password}) + "\n")
            self._migrate(timeout)
            for name in COMPONENTS:
                self._spawn(name)
            self._wait_ready(deadline, set(expect_dag_ids))
        except BaseException:
            self.stop()
            raise
        return self

    def _migrate(self, timeout: float) -> None:
        log = self.logs_dir / "db-migrate.log"
        with log.open("ab") as out:
            rc = subprocess.run(
                [sys.executable, "-m", "airflow", "db", "migrate"],
                env=self.env,
                cwd=self.home,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                start_new_session=True,
            ).returncode
        if rc != 0:
            raise AirflowStackError(f"airflow db migrate failed ({rc}):\n{self._tail(log, 60)}")

    def _spawn(self, name: str) -> None:
        with (self.logs_dir / f"{name}.log").open("ab") as out:
            self._procs[name] = subprocess.Popen(
                [sys.executable, "-m", "airflow", *COMPONENTS[name]],
                env=self.env,
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

    def _wait_ready(self, deadline: float, expect_dag_ids: set[str]) -> None:
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
        """The files of the DAGs folder the dag-processor parses (safe-mode heuristic, no .airflowignore)."""
        files = (
            p
            for p in self.dags_folder.rglob("*.py")
            if not any(
                part.startswith((".", "__pycache__")) for part in p.relative_to(self.dags_folder).parts
            )
        )
        return sorted(p for p in files if _might_contain_dag(p))

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

    @staticmethod
    def _name(name: str) -> str:
        name = name.replace("_", "-")
        if name not in COMPONENTS:
            raise ValueError(f"unknown component {name!r}, one of {list(COMPONENTS)}")
        return name

    def _terminate_groups(self, procs: list[subprocess.Popen[bytes]], grace: float = 10) -> None:
        # Only leaders not reaped yet: the pid of a reaped leader with an empty group may be reused.
        procs = [p for p in procs if p.poll() is None]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for p in procs:
                try:
                    os.killpg(p.pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
            deadline = time.monotonic() + (grace if sig == signal.SIGTERM else 30)
            for p in procs:
                try:
                    p.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
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
        if not self._procs:
            return
        leftovers = self.processes()  # before the leaders die: task processes sit in groups of their own
        self._terminate_groups(list(self._procs.values()))
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

    def __enter__(self) -> AirflowStack:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # ---------------------------------------------------------------------------------------- REST API

    def _api(self, method: str, path: str, body: Any = None, auth: bool = True, _retry: bool = True) -> Any:
        """One JSON request to the api-server; raises ApiError on HTTP errors, OSError if unreachable.

        A "Database error" (HTTP 500: the api-server's transaction failed and was rolled back, e.g. SQLite
        still locked by another component after its busy timeout) is retried a few times before it is raised,
        with the api-server's own log of the error in the message.
        """
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        for attempt in range(API_DB_ERROR_RETRIES + 1):
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
                if exc.code == 500 and '"Database error"' in detail and attempt < API_DB_ERROR_RETRIES:
                    time.sleep(2**attempt)
                    continue
                raise ApiError(
                    f"{method} {path}: HTTP {exc.code} {detail}{self._server_error(detail)}", exc.code
                ) from None
        raise AssertionError("unreachable")

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
                    return state
            except (OSError, ApiError) as exc:
                if isinstance(exc, ApiError) and exc.status < 500:
                    raise
                state = f"unknown ({exc})"
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{dag_id} run {run_id} still {state} after {timeout}s; tasks {last}\n{self.dump_logs()}"
                )
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
        logs = [self.logs_dir / f"{name}.log" for name in ("db-migrate", *COMPONENTS)]
        return "\n".join(
            f"===== {log.name} (last {lines} lines) =====\n{self._tail(log, lines)}"
            for log in logs
            if log.exists()
        )
