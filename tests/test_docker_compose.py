"""docker-compose.yml and docker/Dockerfile: no Docker engine runs here, so check what can be checked
without one."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from packaging.version import Version

from conftest import airflow_floor

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def mounts(service: dict) -> dict[str, str]:
    """target path -> source volume name."""
    return {m.split(":")[1]: m.split(":")[0] for m in service.get("volumes", [])}


def test_volumes_are_declared_and_shared_where_the_backup_needs_them(compose):
    services, declared = compose["services"], set(compose["volumes"])
    for name, service in services.items():
        for source in mounts(service).values():
            assert source in declared, f"{name} mounts undeclared volume {source}"
    pg, airflow = mounts(services["postgres"]), mounts(services["airflow"])
    pgdata = services["postgres"]["environment"]["PGDATA"]
    data_volume = next(v for target, v in pg.items() if pgdata.startswith(target))
    copy_source = services["airflow"]["environment"]["PGDATA_SOURCE"]
    assert any(copy_source.startswith(t) and v == data_volume for t, v in airflow.items()), (
        "the copy task cannot see the PostgreSQL data directory"
    )
    archive_dir = re.search(r"cp %p (\S+)/%f", " ".join(services["postgres"]["command"])).group(1)
    assert pg.get(archive_dir) == "wal_archive" and airflow.get(archive_dir) == "wal_archive"
    assert "backups" in airflow.values()


def test_dependencies_exist_and_airflow_is_configured_for_the_example(compose):
    services = compose["services"]
    for name, service in services.items():
        for dep in service.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown service {dep}"
    env = services["airflow"]["environment"]
    example = (ROOT / "example_dags" / "pg_backup_example.py").read_text()
    for var in ("PGDATA_SOURCE", "BACKUP_ROOT"):
        assert var in env and var in example
    conn_id = re.search(r'"PG_BACKUP_CONN_ID", "(\w+)"', example).group(1)
    assert f"AIRFLOW_CONN_{conn_id.upper()}" in env
    assert (ROOT / services["airflow"]["build"]["dockerfile"]).is_file()
    assert services["airflow"]["user"].split(":")[0] == "999"  # the postgres image's uid: reads PGDATA


@pytest.mark.skipif(
    not shutil.which("docker-compose"), reason="docker-compose (Debian package) not installed"
)
def test_docker_compose_config_accepts_the_file():
    out = subprocess.run(
        ["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr


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
