"""`make demo`: back up a local demo cluster through a real Airflow, then prove the backup restores.

Steps: a demo PostgreSQL cluster with WAL archiving and a small write load; Airflow as production runs
it (loopback only): api-server, scheduler, dag-processor, two triggerers, CeleryExecutor with a Redis
broker, a default worker and a worker on the database host's queue, metadata in PostgreSQL; the example
DAG ``pg_backup_example`` triggered and followed, its copy pinned to that queue; the restore check on the
stored backup, recorded in its catalog entry (``<backup>.backup_info.json``, beside it); then
``pg-safe-backup list`` of the demo's backups; last, the commands that list, verify and restore that
backup by hand (the CLI by its path in this venv). The long waits (Airflow's start and stop, the DAG run)
say what they wait for every 10 s.

The demo cluster archives its WAL with ``pg-safe-backup wal-push`` (gzip) and the restore check reads it
back with ``wal-fetch``, both run by the server as its OS user: they import this package from a copy in
the work directory (put first on PYTHONPATH), so a private checkout works too.

Point it at a real cluster instead with DEMO_PG_URI (an Airflow connection URI), DEMO_PGDATA (its
data directory, readable here) and DEMO_WAL_ARCHIVE (its WAL archive).
Everything it starts is stopped at the end (also on Ctrl-C or failure) unless --keep is given: then it
prints the UI's address and login, and stops everything on Ctrl-C. The work directory stays, with the
backups and the WAL archive the printed commands use.

Its files go to a work directory the PostgreSQL server's OS user can reach (as root, the server runs
as ``postgres``, which cannot enter a private checkout such as one under /root): by default
/var/tmp/pg-safe-backup-demo-<hash of the checkout's path>, or --workdir / DEMO_WORKDIR.
--setup-only makes the work directory and the demo cluster, checks them, and removes them again.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pg_safe_backup
from demo.load import Writer, invariant_sql, wait_archived
from demo.stack import DEFAULT_QUEUE, AirflowStack
from pg_safe_backup.local_cluster import (
    LocalCluster,
    as_server_user,
    command_for_server,
    find_bindir,
    give_to_server_user,
    unreachable_by_server_user,
)
from pg_safe_backup.restore import quote_setting
from pg_safe_backup.verify import check_backup, record_check

ROOT = Path(__file__).resolve().parents[1]
DAG_ID = "pg_backup_example"
PASSWORD = "demo-password"
#: The queue of the worker that sees the data directory, named for the database host (here: this machine).
COPY_QUEUE = f"pg-{socket.gethostname()}"


def say(text: str) -> None:
    print(f"[demo] {text}", flush=True)


def make_demo_cluster(work: Path) -> tuple[LocalCluster, Path]:
    archive = work / "wal_archive"
    archive.mkdir(parents=True)
    give_to_server_user(archive)
    push = command_for_server("wal-push", "--archive", str(archive), "--compress", "gzip") + " %p"
    cluster = (
        LocalCluster(work / "pg" / "data")
        .init(
            password=PASSWORD,
            settings={"archive_mode": "on", "archive_command": quote_setting(push), "archive_timeout": 0},
        )
        .start()
    )
    cluster.sql("CREATE TABLE ledger (id bigint PRIMARY KEY, v text NOT NULL)")
    cluster.sql(
        "CREATE TABLE accounts AS SELECT g AS id, md5(g::text) AS owner, 0::bigint AS balance"
        " FROM generate_series(1, 100000) g"
    )
    cluster.sql("CREATE INDEX ON accounts (owner)")
    return cluster, archive


class DemoSetupError(Exception):
    """The demo cannot run here; the message says why and how to fix it, in one line."""


def default_workdir() -> Path:
    """/var/tmp (or the temp folder) / pg-safe-backup-demo-<hash of this checkout's path>: a place the
    server's OS user can reach wherever the checkout is, and one per checkout."""
    base = Path("/var/tmp") if os.access("/var/tmp", os.W_OK | os.X_OK) else Path(tempfile.gettempdir())
    return base / f"pg-safe-backup-demo-{hashlib.sha256(str(ROOT).encode()).hexdigest()[:8]}"


def prepare_workdir(work: Path) -> None:
    """
    Wipe and create ``work`` (ours, mode 0755) and check the server's OS user can enter it.

    :param work: the demo's work directory.
    :raises DemoSetupError: it cannot be made, or the server cannot reach it.
    """
    fix = "set --workdir (make demo ARGS=--workdir=DIR) or DEMO_WORKDIR to a directory it can reach"
    try:
        find_bindir()
        cleanup_previous(work)
        work.mkdir(parents=True)
    except FileNotFoundError as err:
        raise DemoSetupError(f"{err} (`make prereqs` installs it)") from None
    except OSError as err:
        raise DemoSetupError(f"cannot make the work directory {work}: {err.strerror}; {fix}") from None
    os.chmod(work, 0o755)
    why = unreachable_by_server_user(work)
    if why:
        shutil.rmtree(work, ignore_errors=True)
        raise DemoSetupError(f"cannot use the work directory {work}: {why}; {fix}, e.g. under /var/tmp")
    share_package(work)


def share_package(work: Path) -> None:
    """Copy this package into ``work``/lib and put it first on PYTHONPATH (the servers started from here
    inherit it), so that the server's OS user runs wal-push and wal-fetch from a checkout it cannot enter.

    :raises DemoSetupError: that user cannot run this interpreter (one under a private folder).
    """
    lib = work / "lib"
    package = Path(pg_safe_backup.__file__).parent  # the one imported here: this checkout's
    shutil.copytree(package, lib / "pg_safe_backup", ignore=shutil.ignore_patterns("__pycache__"))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(lib), os.environ.get("PYTHONPATH")) if p)
    probe = [sys.executable, "-m", "pg_safe_backup", "wal-push", "--help"]
    if subprocess.run(as_server_user(probe), capture_output=True).returncode != 0:
        shutil.rmtree(work, ignore_errors=True)
        raise DemoSetupError(
            f"the server's OS user cannot run {sys.executable} (its archive_command runs pg-safe-backup"
            " wal-push): install Python where that user can reach it, or run `make prereqs` as root"
        )


def cleanup_previous(work: Path) -> None:
    """A previous run killed hard may have left servers behind: stop them, then start afresh."""
    for datadir in (work / "pg" / "data",):
        if (datadir / "postmaster.pid").exists():
            LocalCluster(datadir).stop("immediate")
    shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--keep", action="store_true", help="leave Airflow and the demo cluster running")
    parser.add_argument(
        "--workdir",
        default=os.environ.get("DEMO_WORKDIR") or str(default_workdir()),
        help="where everything goes (wiped first); default $DEMO_WORKDIR or %(default)s",
    )
    parser.add_argument(
        "--setup-only",
        action="store_true",
        help="make the work directory and the demo cluster, check them, then remove them",
    )
    args = parser.parse_args(argv)
    work = Path(args.workdir).resolve()
    try:
        prepare_workdir(work)
    except DemoSetupError as err:
        print(f"[demo] cannot run: {err}", file=sys.stderr)
        return 2
    say(f"work directory: {work}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(130))

    cluster = writer = stack = None
    closing: list[str] = []  # told last: how to reach what the demo left (and, with --keep, still runs)
    try:
        if os.environ.get("DEMO_PG_URI") and not args.setup_only:
            conn_uri, pgdata = os.environ["DEMO_PG_URI"], Path(os.environ["DEMO_PGDATA"])
            archive = Path(os.environ["DEMO_WAL_ARCHIVE"])
            say(f"using your cluster: data directory {pgdata}, WAL archive {archive}")
        else:
            say("creating the demo PostgreSQL cluster (WAL archiving on, 100k rows)")
            cluster, archive = make_demo_cluster(work)
            if args.setup_only:
                wait_archived(cluster)  # the server writes into the work directory's WAL archive
                say(f"set-up OK: cluster in {cluster.datadir} started, WAL archived into {archive}")
                return 0
            conn_uri, pgdata = cluster.airflow_conn_uri(password=PASSWORD), cluster.datadir
            writer = Writer(cluster)
            writer.start()
            say(f"cluster on 127.0.0.1:{cluster.port}; a writer inserts into ledger during the whole backup")

        backups = work / "backups"
        backups.mkdir()
        say(
            "starting Airflow: api-server, scheduler, dag-processor, 2 triggerers, CeleryExecutor (Redis)"
            f" with workers on queues {DEFAULT_QUEUE!r} and {COPY_QUEUE!r}, metadata in PostgreSQL"
        )
        stack = AirflowStack(
            work / "airflow",
            ROOT / "example_dags",
            extra_env={
                "AIRFLOW_CONN_PG_MAIN": conn_uri,
                "PGDATA_SOURCE": str(pgdata),
                "BACKUP_ROOT": str(backups),
                "PG_BACKUP_FAST_CHECKPOINT": "1",
                "PG_BACKUP_COPY_QUEUE": COPY_QUEUE,
            },
            triggerers=2,
            workers={DEFAULT_QUEUE: [DEFAULT_QUEUE], COPY_QUEUE: [COPY_QUEUE]},
            progress=say,
        )
        stack.start()
        run_id = stack.trigger(DAG_ID)
        say(f"triggered {DAG_ID} run {run_id}")

        def progress(states: dict[str, str]) -> None:
            say("  " + ", ".join(f"{task}={state}" for task, state in sorted(states.items())))

        state = stack.wait_for_run(DAG_ID, run_id, timeout=600, on_progress=progress)
        committed = writer.stop() if writer else 0
        say(f"queues: {stack.task_queues(DAG_ID, run_id)}")
        if state != "success":
            for task in stack.task_states(DAG_ID, run_id):
                print(stack.task_log(DAG_ID, run_id, task)[-3000:])
            return 1
        stored = stack.xcom(DAG_ID, run_id, "store_backup_label")
        backup_dir = Path(stored["backup_label"]).parent
        label = (backup_dir / "backup_label").read_text()
        if cluster:
            wait_archived(cluster)
        say(
            "checks: page LSNs, pg_verifybackup against the backup_manifest, then a temporary server recovers"
            " the copy from the archive (amcheck + data checks)"
        )
        began = time.monotonic()
        result = check_backup(
            backup_dir,
            archive,
            recovery_target_immediate=not writer,
            invariant_sql=invariant_sql(writer.tables, committed) if writer else None,
        )
        record_check(backup_dir, result, time.monotonic() - began, "make demo")
        print("\nbackup_label stored with the backup:\n" + label)
        for step in result.steps:
            print(step.line())
        print(f"verdict: {result.summary().splitlines()[0]}")
        print(f"backup: {backup_dir}")
        print(f"wal archive: {archive}")
        cli = cli_command()
        steps = next_steps(cli, backups, backup_dir, archive, work)
        listed = steps[0][1]
        print(f"\n$ {shlex.join(listed)}", flush=True)
        closing += tell_next_steps(cli, steps, work)
        if args.keep:
            user, password = stack.login
            closing.append(
                f"Airflow is still running: open {stack.api_url} and log in as {user} / {password}; the demo"
                + (f" cluster listens on 127.0.0.1:{cluster.port}" if cluster else "")
                + ". Ctrl-C stops everything."
            )
        return 0 if subprocess.run(listed).returncode == 0 and result.ok else 1
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    finally:
        if args.keep:
            print("\n".join(closing), flush=True)
            _wait_for_ctrl_c()
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not interrupt the clean-up
        if writer and writer.is_alive():
            writer.stop()
        if stack:
            stack.stop()
        if cluster:
            cluster.stop()
        if args.setup_only:
            shutil.rmtree(work, ignore_errors=True)
        if not args.keep and closing:
            print("\n" + "\n".join(closing), flush=True)


def cli_command() -> list[str]:
    """``pg-safe-backup`` by its absolute path: the console script pip installed beside this Python (the
    venv's, on no PATH until the venv is activated), else this Python running the module."""
    script = Path(sys.executable).parent / "pg-safe-backup"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "pg_safe_backup"]


def next_steps(
    cli: list[str], backups: Path, backup: Path, archive: Path, work: Path
) -> list[tuple[str, list[str]]]:
    """What a person does next with the demo's backup, each step with its command, runnable as it stands.

    :param cli: the CLI's command (:func:`cli_command`).
    :param backups: the root the backups are stored under.
    :param backup: the demo's backup (a folder under ``backups``).
    :param archive: the WAL archive the backup needs.
    :param work: the work directory (the restore's new data directory goes there).
    """
    return [
        ("list the backups", [*cli, "list", str(backups)]),
        (
            "verify this one: page LSNs, pg_verifybackup, then a restore on a temporary server",
            [*cli, "verify", str(backup), str(archive)],
        ),
        (
            "restore it into a new data directory (it says how to start it)",
            [*cli, "restore", "--wal-archive", str(archive), str(backup), str(work / "restored")],
        ),
    ]


def tell_next_steps(cli: list[str], steps: list[tuple[str, list[str]]], work: Path) -> list[str]:
    """The lines that give :func:`next_steps` to a person, and say where the CLI is."""
    where = (
        "on your PATH"
        if shutil.which("pg-safe-backup") == cli[0]
        else f"not on your PATH: call it by this path, or `. {Path(sys.executable).parent}/activate` first"
    )
    lines = [f"The CLI is {shlex.join(cli)} ({where}). Next, by hand:"]
    for what, command in steps:
        lines += [f"  # {what}", f"  {shlex.join(command)}"]
    lines.append(f"(the backups, the WAL archive and the logs stay in {work} until the next make demo)")
    return lines


def _wait_for_ctrl_c() -> None:
    try:
        while True:
            time.sleep(3600)
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C, or a TERM (see main): then everything is stopped
        pass


if __name__ == "__main__":
    sys.exit(main())
