"""docker-compose.yml: no Docker engine runs here, so check what can be checked without one.

The file has the shape of Airflow's own docker-compose.yaml for Airflow 3 (CeleryExecutor, Redis, a
PostgreSQL metadata DB, airflow-init, healthchecks, DAGs paused at creation), plus ``pg-main``, the
PostgreSQL to back up. The restore drill's DAG is loaded with the environment the services give it: every
path its tasks name is mounted, writable, on the workers that run them, and the image has the server
binaries of pg-main's major.
"""

from __future__ import annotations

import re
import runpy
import shutil
import subprocess
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import pytest
import yaml
from packaging.version import Version

from conftest import airflow_floor

ROOT = Path(__file__).resolve().parents[1]
# Airflow's long-running components and the command each one runs.
COMPONENTS = {
    "airflow-apiserver": "api-server",
    "airflow-scheduler": "scheduler",
    "airflow-dag-processor": "dag-processor",
    "airflow-triggerer": "triggerer",
    "airflow-worker": "celery worker --queues default,pg-main",
}
AIRFLOW_SERVICES = [*COMPONENTS, "airflow-init"]
WORKER, TARGET, METADATA = "airflow-worker", "pg-main", "postgres"


@pytest.fixture(scope="module")
def compose() -> dict:
    """The file as Docker sees it: PyYAML resolves the ``&anchor`` / ``<<: *anchor`` merges."""
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def services(compose: dict) -> dict[str, dict]:
    return compose["services"]


def mounts(service: dict) -> dict[str, str]:
    """target path -> source volume name."""
    return {m.split(":")[1]: m.split(":")[0] for m in service.get("volumes", [])}


def volume_at(service: dict, path: str) -> tuple[str, str, bool] | None:
    """Where ``path`` is in the service: (the volume, the path inside it, writable), or None (not mounted)."""
    found = None
    for mount in service.get("volumes", []):
        source, target, *options = mount.split(":")
        if PurePosixPath(path).is_relative_to(target) and (found is None or len(target) > len(found[1])):
            found = (source, target, "ro" not in options)
    if found is None:
        return None
    source, target, writable = found
    return source, str(PurePosixPath(path).relative_to(target)), writable


def command(service: dict) -> str:
    cmd = service.get("command", "")
    return " ".join(cmd) if isinstance(cmd, list) else cmd


def test_the_services_of_airflows_own_compose_run_the_right_commands(services):
    for name, cmd in COMPONENTS.items():
        assert name in services, f"no {name} service"
        assert command(services[name]) == cmd, f"{name} runs {command(services[name])!r}, not {cmd!r}"
    assert "standalone" not in " ".join(command(s) for s in services.values())
    assert services["redis"]["image"].startswith("redis:")
    assert services[METADATA]["image"].startswith("postgres:")
    init = services["airflow-init"]
    assert init["user"] == "0:0" and init["entrypoint"] == "/bin/bash"
    script = command(init)
    assert "/entrypoint airflow version" in script and "airflow config list" in script
    assert init["environment"]["_AIRFLOW_DB_MIGRATE"] == "true"
    assert init["environment"]["_AIRFLOW_WWW_USER_CREATE"] == "true"


def test_airflow_uses_celery_redis_and_the_postgres_metadata_db(services):
    meta_env = services[METADATA]["environment"]
    for name in AIRFLOW_SERVICES:
        service = services[name]
        env = service["environment"]
        assert service["image"] == services["airflow-apiserver"]["image"], f"{name} runs another image"
        assert (ROOT / service["build"]["dockerfile"]).is_file()
        assert service["user"] == "0:0" if name == "airflow-init" else service["user"].split(":")[0] == "999"
        assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor", name
        for var in ("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "AIRFLOW__CELERY__RESULT_BACKEND"):
            url = urlsplit(env[var])
            assert url.hostname == METADATA, f"{name}: {var} does not point at the metadata DB"
            assert (url.username, url.password, url.path.lstrip("/")) == (
                meta_env["POSTGRES_USER"],
                meta_env["POSTGRES_PASSWORD"],
                meta_env["POSTGRES_DB"],
            ), f"{name}: {var} does not match the metadata DB's credentials"
        broker = urlsplit(env["AIRFLOW__CELERY__BROKER_URL"])
        assert broker.scheme == "redis" and broker.hostname == "redis" and broker.port in (None, 6379)
        api = urlsplit(env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"])
        assert api.hostname == "airflow-apiserver" and api.port == 8080 and api.path == "/execution/"
        assert env["AIRFLOW_CONFIG"].startswith(
            next(t for t in mounts(service) if t == "/opt/airflow/config") + "/"
        ), f"{name}: its config file is not on the shared config volume (the JWT secret)"
        assert (
            mounts(service)["/opt/airflow/logs"] == mounts(services["airflow-apiserver"])["/opt/airflow/logs"]
        )
    assert "127.0.0.1:8080:8080" in services["airflow-apiserver"]["ports"]


def test_every_long_running_service_has_a_healthcheck_that_fits_it(services):
    for name, service in services.items():
        if name in ("airflow-init", "volume-init"):
            assert "healthcheck" not in service and "restart" not in service, f"{name} runs once"
            continue
        check = service.get("healthcheck")
        assert check and check["test"][0] in ("CMD", "CMD-SHELL"), f"{name} has no healthcheck"
        assert service.get("restart") == "always", name
    test = {
        name: " ".join(services[name]["healthcheck"]["test"][1:]) for name in services if name in COMPONENTS
    }
    assert "http://localhost:8080/api/v2/version" in test["airflow-apiserver"]
    assert "http://localhost:8974/health" in test["airflow-scheduler"]
    assert services["airflow-scheduler"]["environment"]["AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK"] == "true"
    assert "--job-type DagProcessorJob" in test["airflow-dag-processor"]
    assert "--job-type TriggererJob" in test["airflow-triggerer"]
    assert "inspect ping" in test[WORKER] and "celery@$${HOSTNAME}" in test[WORKER]
    assert services["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    for name in (METADATA, TARGET):
        user = services[name]["environment"].get("POSTGRES_USER", "postgres")
        assert services[name]["healthcheck"]["test"] == ["CMD", "pg_isready", "-U", user]


def test_depends_on_waits_for_health_and_for_the_init_services(services):
    for name, service in services.items():
        for dep, spec in service.get("depends_on", {}).items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            condition = spec["condition"]
            if condition == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep}'s health, which has no check"
            else:
                assert condition == "service_completed_successfully", f"{name} -> {dep}: {condition}"
                assert "restart" not in services[dep], f"{name} waits for {dep} to end, which restarts"
    for name in AIRFLOW_SERVICES:
        deps = services[name]["depends_on"]
        assert deps["redis"] == {"condition": "service_healthy"}, name
        assert deps[METADATA] == {"condition": "service_healthy"}, name
        if name != "airflow-init":
            assert deps["airflow-init"] == {"condition": "service_completed_successfully"}, name
    for name in (WORKER, "airflow-triggerer"):  # the copy and the held session reach pg-main
        assert services[name]["depends_on"][TARGET] == {"condition": "service_healthy"}
    assert services[WORKER]["depends_on"]["airflow-apiserver"] == {"condition": "service_healthy"}
    assert services[TARGET]["depends_on"]["volume-init"] == {"condition": "service_completed_successfully"}


def test_volumes_are_declared_and_shared_where_the_backup_needs_them(compose, services):
    declared = set(compose["volumes"])
    for name, service in services.items():
        for source in mounts(service).values():
            assert source in declared, f"{name} mounts undeclared volume {source}"
    pg, worker = mounts(services[TARGET]), mounts(services[WORKER])
    pgdata = services[TARGET]["environment"]["PGDATA"]
    data_volume = next(v for target, v in pg.items() if pgdata.startswith(target))
    copy_source = services[WORKER]["environment"]["PGDATA_SOURCE"]
    assert any(copy_source.startswith(t) and v == data_volume for t, v in worker.items()), (
        "the copy task (on the worker) cannot see the PostgreSQL data directory"
    )
    archive_dir = re.search(r"cp %p (\S+)/%f", command(services[TARGET])).group(1)
    assert pg.get(archive_dir) == "wal_archive" and worker.get(archive_dir) == "wal_archive"
    assert "wal_level=replica" in command(services[TARGET]) and "archive_mode=on" in command(services[TARGET])
    backup_root = services[WORKER]["environment"]["BACKUP_ROOT"]
    assert worker.get(backup_root) == "backups"
    init = mounts(services["volume-init"])
    assert init.get(archive_dir) == "wal_archive" and init.get(backup_root) == "backups"
    assert f"chown -R 999:0 {archive_dir} {backup_root}" in command(services["volume-init"])
    for name in AIRFLOW_SERVICES:  # only the worker reads pg-main's files
        if name != WORKER:
            assert data_volume not in mounts(services[name]).values(), f"{name} mounts the data volume"
    assert mounts(services[METADATA])["/var/lib/postgresql/data"] != data_volume
    # The copy is pinned (queue=) to a queue that only a worker seeing the data directory serves.
    queue = services[WORKER]["environment"]["PG_BACKUP_COPY_QUEUE"]
    for name in AIRFLOW_SERVICES:
        serves = re.search(r"--queues (\S+)", command(services[name]))
        if serves and queue in serves.group(1).split(","):
            assert data_volume in mounts(services[name]).values(), f"{name} serves {queue} without the data"
    assert queue in re.search(r"--queues (\S+)", command(services[WORKER])).group(1).split(",")


def test_airflow_is_configured_for_the_example(services):
    example = (ROOT / "example_dags" / "pg_backup_example.py").read_text()
    conn_id = re.search(r'"PG_BACKUP_CONN_ID", "(\w+)"', example).group(1)
    for name in AIRFLOW_SERVICES:  # the dag-processor and the worker both parse the DAG
        env = services[name]["environment"]
        for var in ("PGDATA_SOURCE", "BACKUP_ROOT"):
            assert var in env and var in example
        conn = urlsplit(env[f"AIRFLOW_CONN_{conn_id.upper()}"])
        assert (
            conn.hostname == TARGET and conn.password == services[TARGET]["environment"]["POSTGRES_PASSWORD"]
        )
        assert env["AIRFLOW__CORE__DAGS_FOLDER"] == "/opt/pg-safe-backup/example_dags"
        # As Airflow's own file: nothing runs before someone unpauses it.
        assert env["AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION"] == "true", name
    dockerfile = (ROOT / services[WORKER]["build"]["dockerfile"]).read_text()
    assert "/opt/pg-safe-backup" in dockerfile and "rsync" in dockerfile


def test_every_path_of_the_drill_dag_is_mounted_writable_where_its_tasks_run(services, monkeypatch):
    """The drill DAG as the services parse it (their environment): each absolute path a task of it names
    (the backups' root, the WAL archive) is on a writable volume of every worker serving its queue (the
    drill records its result beside the backup, retention deletes backups and WAL), and its WAL archive is
    the one pg-main's archive_command writes."""
    for var, value in services[WORKER]["environment"].items():
        monkeypatch.setenv(var, str(value))
    dags_folder = ROOT / "example_dags"
    monkeypatch.syspath_prepend(str(dags_folder))  # as Airflow parses it: its folder's modules importable
    dag = runpy.run_path(str(dags_folder / "pg_restore_drill_example.py"))["dag"]
    archive_dir = re.search(r"cp %p (\S+)/%f", command(services[TARGET])).group(1)
    pg_main_archive = volume_at(services[TARGET], archive_dir)
    checked = []
    for task in dag.tasks:
        runners = [
            name
            for name in AIRFLOW_SERVICES
            if (serves := re.search(r"--queues (\S+)", command(services[name])))
            and task.queue in serves.group(1).split(",")
        ]
        assert runners, f"no worker serves {task.task_id}'s queue {task.queue!r}"
        for field in task.template_fields:
            path = getattr(task, field)
            if not (isinstance(path, str) and path.startswith("/")):
                continue
            for name in runners:
                where = volume_at(services[name], path)
                assert where, f"{task.task_id}.{field} = {path} is not mounted in {name}"
                assert where[2], f"{task.task_id}.{field} = {path} is mounted read-only in {name}"
                if field == "wal_archive":
                    archived = pg_main_archive[:2]
                    assert where[:2] == archived, (
                        f"{task.task_id} reads {where[:2]}, pg-main archives {archived}"
                    )
            checked.append(f"{task.task_id}.{field}")
    assert sorted(checked) == [
        "restore_drill.root",
        "restore_drill.wal_archive",
        "retention.root",
        "retention.wal_archive",
    ]


def test_the_image_has_the_server_binaries_of_the_backed_up_cluster_s_major(services):
    """The drill restores pg-main's backups on a temporary server of the same major: the image installs
    Debian's postgresql-MAJOR (initdb, pg_ctl, postgres, amcheck; pg_verifybackup by its client package)
    for the major of pg-main's image, passed as the build argument PG_MAJOR."""
    major = re.fullmatch(r"postgres:(\d+)(?:[.-].*)?", services[TARGET]["image"]).group(1)
    for name in AIRFLOW_SERVICES:
        assert str(services[name]["build"]["args"]["PG_MAJOR"]) == major, name
    dockerfile = (ROOT / services[WORKER]["build"]["dockerfile"]).read_text()
    lines = dockerfile.splitlines()
    base = next(i for i, line in enumerate(lines) if line.startswith("FROM "))
    declared = next(i for i, line in enumerate(lines) if re.fullmatch(r"ARG PG_MAJOR(=\d+)?", line))
    assert declared > base, "ARG PG_MAJOR before FROM is not seen by the RUN lines"
    install = re.search(r"apt-get install [^&]*\"postgresql-\$\{PG_MAJOR\}\"", dockerfile)
    assert install, "the Dockerfile does not install postgresql-${PG_MAJOR}"
    assert install.start() > dockerfile.index(lines[declared]), (
        "postgresql-${PG_MAJOR} installed before its ARG"
    )
    # No idle cluster made by the package in the image (the postgres image's own setting).
    assert re.search(r"create_main_cluster.*= false", dockerfile), "the package would make a cluster"


@pytest.mark.skipif(
    not shutil.which("docker-compose"),
    reason="docker-compose is not installed: `make prereqs` installs it (Debian package docker-compose)",
)
def test_docker_compose_config_accepts_the_file(services):
    out = subprocess.run(
        ["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    resolved = yaml.safe_load(out.stdout)["services"]
    assert set(resolved) == {*AIRFLOW_SERVICES, "redis", METADATA, TARGET, "volume-init"}
    assert resolved[WORKER]["environment"]["DUMB_INIT_SETSID"] == "0"
    assert resolved[WORKER]["environment"]["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert resolved["airflow-scheduler"]["depends_on"]["airflow-init"]["condition"] == (
        "service_completed_successfully"
    )
    assert resolved[WORKER]["build"]["args"]["PG_MAJOR"] == str(services[WORKER]["build"]["args"]["PG_MAJOR"])


def test_the_image_s_airflow_is_supported_and_installs_with_its_constraints():
    """docker/Dockerfile: an Airflow at or above the floor pyproject.toml states, and the constraints file
    CI tests that Airflow with (same Airflow, same Python)."""
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    base = re.search(r"^FROM apache/airflow:(\d+\.\d+\.\d+)-python(\d+\.\d+)$", dockerfile, re.M)
    assert base, "the Dockerfile does not build on an apache/airflow:X.Y.Z-pythonA.B image"
    airflow, python = Version(base.group(1)), base.group(2)
    assert airflow >= airflow_floor(), f"the image's Airflow {airflow} is below the floor {airflow_floor()}"
    used = re.search(r"pip install .*-c /opt/pg-safe-backup/(constraints/\w+\.txt)", dockerfile)
    assert used, "the Dockerfile installs the package without a constraints file"
    header = (ROOT / used.group(1)).read_text().splitlines()[0]
    assert header.startswith(f"# pip constraints: Airflow {airflow} "), header
    assert f", Python {python}." in header, header
