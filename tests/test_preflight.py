"""``pg-safe-backup check`` and ``PostgresCheckBackupOperator`` on real clusters: a healthy one passes, each
broken setting fails naming it (archive_command failing, archiving off, a missing grant, the wrong table
owner, a full destination), data checksums off is a warning unless required, and no secret is printed.

Two module clusters that the tests only read (or change and put back): a healthy one archiving gzip-named
segments into a folder, and one whose archive_command fails; the archiving-off test has its own.
"""

from __future__ import annotations

import asyncio
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from demo.s3 import KEY as S3_KEY
from demo.s3 import REGION as S3_REGION
from demo.s3 import SECRET as S3_SECRET
from demo.s3 import local_s3
from pg_safe_backup.cli import NO_VERDICT
from pg_safe_backup.files.walarchive import IDENTITY_FILE, ArchiveIdentity, parse_stored_name
from pg_safe_backup.hooks.backup import PostgresBackupHook
from pg_safe_backup.hooks.server import backup_function_signatures
from pg_safe_backup.local_cluster import LocalCluster, as_server_user, give_to_server_user
from pg_safe_backup.preflight import CheckRequest, Level, redact, run_check

from backup_helpers import run_cli, wait_for
from conftest import PASSWORD
from pg_versions import client_bindir

#: What the failing archive_command carries in front of /bin/false: a secret no output may show.
SECRET = "hunter2-archive-secret"


@dataclass
class Server:
    """A running cluster and what the checks of it are given."""

    cluster: LocalCluster
    archive: Path

    def dsn(self, user: str = "postgres", password: str | None = None) -> str:
        """A libpq string: over 127.0.0.1 with a password, else the unix socket (trust)."""
        if password is not None:
            return f"host=127.0.0.1 port={self.cluster.port} dbname=postgres user={user} password={password}"
        return f"host={self.cluster.socket_dir} port={self.cluster.port} dbname=postgres user={user}"

    def check(
        self, *args: str | Path, user: str = "postgres", timeout: float = 30
    ) -> subprocess.CompletedProcess:
        """``pg-safe-backup check --dsn DSN ARGS``."""
        return run_cli("check", "--dsn", self.dsn(user), "--timeout", str(timeout), *args)


def _server(root: Path, archive_command: str, fresh: bool = False) -> Iterator[Server]:
    archive = root / "archive"
    archive.mkdir(parents=True)
    give_to_server_user(archive)
    cluster = (
        LocalCluster(root / "data")
        .init(
            password=PASSWORD,
            settings={
                "archive_mode": "on",
                "archive_command": f"'{archive_command.format(archive=archive)}'",
            },
            fresh=fresh,
        )
        .start()
    )
    try:
        yield Server(cluster, archive)
    finally:
        cluster.stop("immediate")


@pytest.fixture(scope="module")
def healthy(module_tmp_root: Path) -> Iterator[Server]:
    """Archives each segment gzipped under a temporary name, then renamed: ``%f.gz`` in the archive."""
    command = "gzip -c %p > {archive}/%f.gz.tmp && mv {archive}/%f.gz.tmp {archive}/%f.gz"
    yield from _server(module_tmp_root / "healthy", command)


@pytest.fixture(scope="module")
def failing(module_tmp_root: Path) -> Iterator[Server]:
    """archive_command fails on every segment (and carries a secret in an environment assignment)."""
    # fresh: a system identifier of its own, for the test of another cluster's data directory.
    yield from _server(module_tmp_root / "failing", f"AWS_SECRET_ACCESS_KEY={SECRET} /bin/false", fresh=True)


def lines(result: subprocess.CompletedProcess, level: str, check: str) -> list[str]:
    """The output lines of ``level`` about ``check`` (``PROBLEM``, ``ok``, ...)."""
    return [line for line in result.stdout.splitlines() if line.startswith(f"{level}: {check}: ")]


def test_a_healthy_cluster_passes_and_its_switched_segment_is_in_the_archive(healthy, tmp_root):
    destination = tmp_root / "backups"
    result = run_cli(
        "check",
        "--dsn",
        healthy.dsn(password=PASSWORD),
        "--archive",
        healthy.archive,
        "--pgdata",
        healthy.cluster.datadir,
        "--destination",
        destination,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ready (0 problems, 0 not checked" in result.stdout.splitlines()[-1]
    (arrived,) = lines(result, "ok", "WAL archived")
    segment = arrived.split("segment ")[1].split()[0]
    assert f"as {segment}.gz in" in arrived
    assert parse_stored_name(f"{segment}.gz").name == segment
    assert (healthy.archive / f"{segment}.gz").exists()
    for check in ("server version", "privileges", "wal_level", "archiving", "state table", "data directory"):
        assert lines(result, "ok", check), check
    assert lines(result, "ok", "free space")
    assert PASSWORD not in result.stdout + result.stderr


def test_an_object_store_archive_is_listed_with_the_stores_own_credentials(healthy, monkeypatch):
    """The archive in a real S3 API (moto), reached with the AWS tools' own environment variables; the
    cluster's segments are carried there from its archive folder as they arrive (complete files only)."""
    with local_s3("pgsb-check") as s3:
        for name, value in (
            ("AWS_ACCESS_KEY_ID", S3_KEY),
            ("AWS_SECRET_ACCESS_KEY", S3_SECRET),
            ("AWS_DEFAULT_REGION", S3_REGION),
            ("AWS_ENDPOINT_URL", s3.endpoint_url),
        ):
            monkeypatch.setenv(name, value)
        fs, carried, stop = s3.filesystem(), set(), threading.Event()

        def carry() -> None:
            while not stop.is_set():
                for path in sorted(healthy.archive.iterdir()):
                    if path.name not in carried and parse_stored_name(path.name):
                        fs.pipe(f"pgsb-check/wal/{path.name}", path.read_bytes())
                        carried.add(path.name)
                stop.wait(0.1)

        thread = threading.Thread(target=carry)
        thread.start()
        try:
            result = healthy.check("--archive", "s3://pgsb-check/wal")
        finally:
            stop.set()
            thread.join()
    assert result.returncode == 0, result.stdout + result.stderr
    (arrived,) = lines(result, "ok", "WAL archived")
    segment = arrived.split("segment ")[1].split()[0]
    assert f"reached archive s3://pgsb-check/wal as {segment}.gz" in arrived


def test_data_checksums_off_is_a_warning_unless_required(healthy):
    server = healthy.cluster
    if server.sql("SHOW data_checksums") == [("on",)]:  # PostgreSQL 18's initdb enables them
        # The npm packages hold server programs only: the client release of the same major, then.
        folder = next(
            f
            for f in (server.bindir, client_bindir(server.server_version() // 10000))
            if f and (f / "pg_checksums").exists()
        )
        server.stop()
        subprocess.run(
            as_server_user([str(folder / "pg_checksums"), "--disable", "-D", str(server.datadir)]), check=True
        )
        server.start()
    relaxed = healthy.check("--quiet")
    assert relaxed.returncode == 0, relaxed.stdout
    assert lines(relaxed, "warning", "data checksums")
    strict = healthy.check("--require-checksums", "--quiet")
    assert strict.returncode == 1, strict.stdout
    (problem,) = lines(strict, "PROBLEM", "data checksums")
    assert "pg_checksums --enable" in problem


def test_incremental_backups_want_summarize_wal_on_17_and_later(healthy):
    result = healthy.check("--incremental", "--quiet")
    assert result.returncode == 1, result.stdout
    (problem,) = lines(result, "PROBLEM", "summarize_wal")
    if healthy.cluster.server_version() < 170000:
        assert "incremental backups need PostgreSQL 17 or later" in problem
        return
    assert "summarize_wal = off" in problem and "ALTER SYSTEM SET summarize_wal = on" in problem
    healthy.cluster.sql("ALTER SYSTEM SET summarize_wal = on")
    healthy.cluster.sql("SELECT pg_reload_conf()")
    wait_for(lambda: healthy.cluster.sql("SHOW summarize_wal") == [("on",)], what="summarize_wal on")
    try:
        fixed = healthy.check("--incremental")
        assert fixed.returncode == 0, fixed.stdout
        assert lines(fixed, "ok", "summarize_wal")
    finally:
        healthy.cluster.sql("ALTER SYSTEM RESET summarize_wal")
        healthy.cluster.sql("SELECT pg_reload_conf()")
        wait_for(lambda: healthy.cluster.sql("SHOW summarize_wal") == [("off",)], what="summarize_wal off")


def test_a_failing_archive_command_fails_naming_it_and_the_archivers_last_failure(failing):
    result = failing.check("--archive", failing.archive, timeout=3)
    assert result.returncode == 1, result.stdout
    (problem,) = lines(result, "PROBLEM", "WAL archived")
    segment = problem.split("segment ")[1].split()[0]
    assert f"did not reach archive {failing.archive} within 3 s" in problem
    assert "archive_command = 'AWS_SECRET_ACCESS_KEY=*** /bin/false'" in problem
    assert f"last failed WAL {segment}" in problem
    assert SECRET not in result.stdout + result.stderr


def test_archiving_off_fails_naming_archive_mode(cluster):
    """The conftest cluster: archive_mode off."""
    dsn = f"host={cluster.socket_dir} port={cluster.port} dbname=postgres user=postgres"
    result = run_cli("check", "--dsn", dsn, "--timeout", "3")
    assert result.returncode == 1, result.stdout
    (problem,) = lines(result, "PROBLEM", "archiving")
    assert "has archive_mode=off" in problem and "archive_mode = on" in problem
    assert not lines(result, "ok", "WAL archived")  # nothing to wait for


def test_a_role_without_execute_on_the_backup_functions_fails_naming_the_grant(healthy):
    healthy.cluster.sql("CREATE ROLE check_weak LOGIN")
    result = healthy.check(user="check_weak")
    assert result.returncode == 1, result.stdout
    (problem,) = lines(result, "PROBLEM", "privileges")
    start, stop = backup_function_signatures(healthy.cluster.server_version())
    grant = f"GRANT EXECUTE ON FUNCTION pg_catalog.{start}, pg_catalog.{stop},"
    assert 'role "check_weak" may not execute' in problem and grant in problem
    assert 'pg_catalog.pg_switch_wal() TO "check_weak";' in problem
    (unchecked,) = lines(result, "NOT CHECKED", "WAL archived")  # cannot switch: no verdict on the archive
    assert "pg_switch_wal()" in unchecked
    healthy.cluster.sql(problem.split("as a superuser run: ")[1])  # the fix, as printed
    fixed = healthy.check(user="check_weak")
    assert lines(fixed, "ok", "privileges"), fixed.stdout
    assert lines(fixed, "ok", "WAL archived"), fixed.stdout


def test_a_state_table_owned_by_another_role_fails_naming_owner_and_fix(healthy):
    """The table a backup made, then handed to a role that could rewrite its triggers, which run with the
    superuser's rights: its own schema, so the other tests' table stays as it is."""
    healthy.cluster.sql("CREATE SCHEMA ops")
    hook = PostgresBackupHook("unused", schema="ops")

    async def create() -> None:
        import psycopg

        async with await psycopg.AsyncConnection.connect(
            **healthy.cluster.conninfo(), autocommit=True
        ) as conn:
            await hook.ensure_table(conn)

    asyncio.run(create())
    assert lines(healthy.check("--table-schema", "ops", "--quiet"), "PROBLEM", "state table") == []
    healthy.cluster.sql("CREATE ROLE intruder; ALTER TABLE ops.backup OWNER TO intruder")
    result = healthy.check("--table-schema", "ops")
    assert result.returncode == 1, result.stdout
    problems = lines(result, "PROBLEM", "state table")
    assert any('"ops"."backup" is owned by role "intruder"' in p and "ALTER TABLE" in p for p in problems)
    assert any('"ops"."pg_safe_backup_guard"() is owned by role "postgres"' in p for p in problems)


def test_a_full_destination_fails_naming_it(healthy, tmp_root):
    full = tmp_root / "small"
    full.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(full)], check=True)
    try:
        result = healthy.check("--destination", full / "main", "--quiet")
    finally:
        subprocess.run(["umount", str(full)], check=True)
    assert result.returncode == 1, result.stdout
    (problem,) = lines(result, "PROBLEM", "free space")
    assert f"destination {full / 'main'} (on {full}) has 1.0 MB free, the databases take" in problem


def test_another_clusters_data_directory_and_archive_are_problems(healthy, failing, tmp_root):
    other = tmp_root / "other-archive"
    other.mkdir()
    identity = ArchiveIdentity(system_identifier=1234, major=15, wal_segment_size=16 << 20)
    (other / IDENTITY_FILE).write_bytes(identity.to_bytes())
    result = healthy.check("--pgdata", failing.cluster.datadir, "--archive", other, "--quiet", timeout=1)
    assert result.returncode == 1, result.stdout
    (pgdata,) = lines(result, "PROBLEM", "data directory")
    assert f"pgdata '{failing.cluster.datadir}' belongs to system" in pgdata
    (archive,) = lines(result, "PROBLEM", "archive")
    assert f"archive {other} holds the WAL of system 1234" in archive


def test_an_unreachable_server_is_no_verdict(tmp_root):
    result = run_cli("check", "--dsn", f"host={tmp_root} port=1 user=x password={PASSWORD}", "--timeout", "2")
    assert result.returncode == NO_VERDICT, result.stdout
    assert result.stderr.startswith("pg-safe-backup check: error: --dsn: cannot connect to the server")
    assert PASSWORD not in result.stdout + result.stderr


def test_an_archive_that_cannot_be_opened_is_no_verdict(healthy):
    result = healthy.check("--archive", "nosuch://user:pw-in-url@bucket/wal", "--quiet")
    assert result.returncode == NO_VERDICT, result.stdout
    (unchecked,) = lines(result, "NOT CHECKED", "archive")
    assert unchecked.startswith("NOT CHECKED: archive: archive nosuch://user:***@bucket/wal: cannot open it")
    assert "pw-in-url" not in result.stdout + result.stderr
    assert "NOT CHECKED" in result.stdout.splitlines()[-1]


def test_redact_masks_url_passwords_and_secret_assignments():
    assert redact("s3://key:SeCr3t@bucket/wal") == "s3://key:***@bucket/wal"
    assert (
        redact("PGSB_KEY=abc AWS_SECRET_ACCESS_KEY=xyz wal-push %p")
        == "PGSB_KEY=*** AWS_SECRET_ACCESS_KEY=*** wal-push %p"
    )
    assert redact("cp %p /wal/%f") == "cp %p /wal/%f"


def test_the_operator_passes_on_a_healthy_cluster_and_fails_on_a_broken_one(
    healthy, failing, task_context, monkeypatch
):
    from airflow.providers.common.compat.sdk import AirflowFailException
    from airflow.sdk import DAG

    from pg_safe_backup.operators.check import PostgresCheckBackupOperator

    for name, server in (("healthy", healthy), ("failing", failing)):
        monkeypatch.setenv(
            f"AIRFLOW_CONN_PG_{name.upper()}", server.cluster.airflow_conn_uri(password=PASSWORD)
        )
    with DAG("preflight", schedule=None):
        tasks = {
            name: PostgresCheckBackupOperator(
                task_id=f"check_{name}",
                postgres_conn_id="{{ params.conn }}",
                wal_archive="{{ params.archive }}",
                archive_timeout="{{ params.timeout }}",
            )
            for name in ("healthy", "failing")
        }
    for name, server in (("healthy", healthy), ("failing", failing)):
        op = tasks[name]
        context = task_context(op, {"conn": f"pg_{name}", "archive": str(server.archive), "timeout": 3})
        op.render_template_fields(context)
        if server is healthy:
            result = op.execute(context)
            assert result["ok"] is True
            assert result["server"] == "'pg_healthy'"
            assert {f["level"] for f in result["findings"]} <= {Level.OK.value, Level.WARNING.value}
        else:
            with pytest.raises(AirflowFailException) as failed:
                op.execute(context)
            message = str(failed.value)
            assert "check of 'pg_failing': NOT READY (1 problems" in message
            assert "PROBLEM: WAL archived: segment" in message and "/bin/false" in message
            assert SECRET not in message


def test_run_check_reads_as_the_cli_prints(healthy):
    """The domain call itself: findings in order, the verdict as :meth:`Preflight.error` makes it."""
    preflight = run_check(healthy.dsn(), CheckRequest(archive=str(healthy.archive), timeout=30))
    checks = [f.check for f in preflight.findings]
    assert checks[:4] == ["server version", "privileges", "wal_level", "archiving"]
    assert checks[-1] == "WAL archived"
    assert preflight.error() is None
    assert all(f.level in (Level.OK, Level.WARNING) for f in preflight.findings)


def test_the_provider_metadata_lists_the_check_operator():
    import importlib

    from pg_safe_backup.get_provider_info import get_provider_info

    (operators,) = get_provider_info()["operators"]
    assert "pg_safe_backup.operators.check" in operators["python-modules"]
    module = importlib.import_module("pg_safe_backup.operators.check")
    assert module.PostgresCheckBackupOperator.template_fields[:4] == (
        "wal_archive",
        "pgdata",
        "destination",
        "archive_timeout",
    )
