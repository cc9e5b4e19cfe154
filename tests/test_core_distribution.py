"""The core distribution (core/, ``pg-safe-backup``): installed alone, without Airflow, its CLI lists and
restores a backup the provider took; and nothing in it imports Airflow or the provider's half."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import venv
from collections.abc import Iterator
from pathlib import Path

import pytest

import pg_safe_backup
from demo.load import wait_archived
from pg_safe_backup.local_cluster import give_to_server_user

from backup_helpers import catalogued_backup, cluster_with_space, recovered
from conftest import pyproject
from test_task_group import CORE, PACKAGE, module_name

ROOT = Path(__file__).resolve().parents[1]


def imported_names(path: Path) -> set[str]:
    """Every module ``path`` imports, at its top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_the_core_half_imports_neither_airflow_nor_the_providers_half():
    provider_only = {module_name(p) for p in PACKAGE.rglob("*.py")}
    for path in CORE.rglob("*.py"):
        for name in imported_names(path):
            assert name.split(".")[0] != "airflow", f"{path.relative_to(ROOT)} imports {name}"
            assert not any(name == m or name.startswith(m + ".") for m in provider_only), (
                f"{path.relative_to(ROOT)} imports {name}, which only the provider distribution ships"
            )


def test_both_distributions_carry_one_version_and_the_provider_pins_the_core():
    core, provider = pyproject(ROOT / "core")["project"], pyproject()["project"]
    assert core["dynamic"] == ["version"]  # read from pg_safe_backup.__version__
    assert provider["version"] == pg_safe_backup.__version__
    assert f"pg-safe-backup=={pg_safe_backup.__version__}" in [
        d.split(" ")[0] for d in provider["dependencies"]
    ]
    assert not any(d.startswith("apache-airflow") for d in core["dependencies"])
    assert core["scripts"] == {"pg-safe-backup": "pg_safe_backup.__main__:main"}
    assert "scripts" not in provider  # one owner of the console script


@pytest.fixture(scope="module")
def bare_venv(module_tmp_root: Path) -> Iterator[Path]:
    """A fresh venv with only ``pip install core/`` (a built wheel, as from PyPI) in it: its bin folder.

    The core's dependencies come at the versions CI's constraints pin."""
    wheels, source = module_tmp_root / "wheels", module_tmp_root / "core"
    # Built from a copy: setuptools leaves build/ and an egg-info in the folder it builds.
    leftovers = shutil.ignore_patterns("build", "*.egg-info", "__pycache__")
    shutil.copytree(ROOT / "core", source, ignore=leftovers)
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "-w",
            wheels,
            source,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = wheels.glob("pg_safe_backup-*.whl")
    home = module_tmp_root / "bare"
    venv.create(home, with_pip=True)
    installed = subprocess.run(
        [
            home / "bin" / "python",
            "-m",
            "pip",
            "install",
            "-q",
            "-c",
            ROOT / "constraints" / "newest.txt",
            wheel,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_REQUIRE_VIRTUALENV")},
    )
    assert installed.returncode == 0, installed.stderr
    yield home / "bin"


def bare(bin_dir: Path, *args: str | Path) -> subprocess.CompletedProcess:
    """``pg-safe-backup ARGS`` of the bare venv, with no PYTHONPATH pointing back into this checkout."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [bin_dir / "pg-safe-backup", *map(str, args)], capture_output=True, text=True, env=env, timeout=300
    )


def test_the_core_installs_without_airflow(bare_venv: Path):
    probe = subprocess.run(
        [bare_venv / "python", "-c", "import importlib.util as u; print(u.find_spec('airflow'))"],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    assert probe.stdout.strip() == "None", probe.stdout + probe.stderr
    shown = bare(bare_venv, "--help")
    assert shown.returncode == 0 and "restore" in shown.stdout, shown.stderr


def test_the_cli_without_airflow_lists_and_restores_a_backup(bare_venv: Path, tmp_root: Path):
    root = tmp_root / "backups"
    root.mkdir()
    with cluster_with_space(tmp_root) as (cluster, archive, _location):
        cluster.sql("CREATE TABLE t (n int)")
        cluster.sql("INSERT INTO t SELECT g FROM generate_series(1, 300) g")
        catalogued_backup(cluster, root / "nightly", "nightly/run1/backup")
        cluster.sql("INSERT INTO t SELECT g FROM generate_series(301, 400) g")
        wait_archived(cluster)

        listed = bare(bare_venv, "list", root)
        assert listed.returncode == 0, listed.stderr
        assert "nightly" in listed.stdout and "1 backup" in listed.stdout, listed.stdout

        scratch = tmp_root / "restores"
        scratch.mkdir()
        give_to_server_user(scratch)  # the restored server writes its log beside its data
        target = scratch / "restored"
        done = bare(
            bare_venv, "restore", root / "nightly", target, "--wal-archive", archive, "--archive-mode", "off"
        )
        assert done.returncode == 0, done.stderr
    with recovered(target) as server:
        assert server.sql("SELECT count(*), sum(n) FROM t") == [(400, sum(range(1, 401)))]
