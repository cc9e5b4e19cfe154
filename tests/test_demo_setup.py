"""`make demo` from any checkout: a private one (as /root is, mode 0700) included; what it installs first;
what it tells at its end.

As root the demo's PostgreSQL runs as the ``postgres`` OS user, which cannot enter a private folder:
the demo's files go where that user can reach them, and a work directory it cannot reach is refused
in one line that names the fix. ``make demo`` installs from Debian only what the demo uses (``make test``
what the tests use, CI what all it runs uses), and ends with the commands that list, verify and restore its
backup, which run as printed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from demo.load import wait_archived
from demo.run import cli_command, next_steps
from pg_safe_backup.local_cluster import LocalCluster

from backup_helpers import catalogued_backup, cluster_with_space, recovered

ROOT = Path(__file__).resolve().parents[1]
as_root_only = pytest.mark.skipif(
    os.geteuid() != 0, reason="only root runs PostgreSQL as another OS user (postgres)"
)


@pytest.fixture
def private_dir() -> Iterator[Path]:
    """A folder only its owner can enter, like a root user's home."""
    folder = Path(tempfile.mkdtemp(prefix="pgsb-private-"))
    assert folder.stat().st_mode & 0o777 == 0o700
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def run_demo(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("DEMO_")}
    environ["PYTHONPATH"] = f"{cwd / 'provider'}{os.pathsep}{cwd}"
    return subprocess.run(
        [sys.executable, "-m", "demo.run", *args],
        cwd=cwd,
        env={**environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_demo_sets_up_from_a_checkout_in_a_private_directory(private_dir: Path) -> None:
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: nothing to clone")
    checkout = private_dir / "pg-safe-backup"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(checkout)], check=True, timeout=120)
    # The clone has the committed tree; bring the working tree's changes along.
    diff = subprocess.run(
        ["git", "-C", str(ROOT), "diff", "HEAD", "--binary"], capture_output=True, check=True
    )
    if diff.stdout:
        subprocess.run(["git", "-C", str(checkout), "apply"], input=diff.stdout, check=True)

    out = run_demo(checkout, "--setup-only")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    work = Path(re.search(r"\[demo\] work directory: (\S+)", out.stdout).group(1))
    assert private_dir not in work.parents, "the demo's files went into the private checkout"
    assert f"set-up OK: cluster in {work / 'pg' / 'data'} started" in out.stdout
    assert not work.exists(), "--setup-only left its work directory behind"


@as_root_only
@pytest.mark.parametrize("how", ["--workdir", "DEMO_WORKDIR"])
def test_an_unreachable_work_directory_is_refused_in_one_line_naming_the_fix(
    private_dir: Path, how: str
) -> None:
    work = private_dir / "demo"
    out = (
        run_demo(ROOT, "--setup-only", f"--workdir={work}")
        if how == "--workdir"
        else run_demo(ROOT, "--setup-only", DEMO_WORKDIR=str(work))
    )
    assert out.returncode == 2, out.stdout + out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert f"cannot use the work directory {work}" in lines[0]
    assert (
        f"'postgres' when started by root, and that user cannot enter {private_dir} (mode 0700)" in lines[0]
    )
    assert "--workdir" in lines[0] and "DEMO_WORKDIR" in lines[0] and "/var/tmp" in lines[0]
    assert not work.exists()


@as_root_only
def test_a_cluster_in_a_private_folder_is_refused_naming_the_folder(private_dir: Path) -> None:
    datadir = private_dir / "pg" / "data"
    with pytest.raises(PermissionError, match=rf"cannot enter {re.escape(str(private_dir))} \(mode 0700\)"):
        LocalCluster(datadir).init()
    assert not datadir.exists()


# ------------------------------------------------------------------------------- what is installed first


def dry_run(target: str) -> list[str]:
    """The commands ``make TARGET`` would run (``make -n``: none is run)."""
    out = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def prereqs_asked_by(target: str) -> list[str]:
    """The purposes ``make TARGET`` asks scripts/prereqs.sh for."""
    calls = [line for line in dry_run(target) if "scripts/prereqs.sh" in line]
    assert len(calls) == 1, calls
    return calls[0].split("scripts/prereqs.sh", 1)[1].split()


def packages_for(*purposes: str) -> set[str]:
    """The Debian packages scripts/prereqs.sh installs (when missing) for ``purposes``."""
    command = ["bash", "scripts/prereqs.sh", "--list", *purposes]
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return set(out.stdout.split())


#: What only the tests, the version matrix or the benchmarks use (scripts/prereqs.sh gives each one's reason).
NOT_FOR_THE_DEMO = {"npm", "docker-compose", "strace", "btrfs-progs", "pgbackrest", "zstd", "pgbouncer"}


def test_make_demo_installs_only_what_the_demo_uses():
    asked = prereqs_asked_by("demo")
    assert asked == ["demo"]
    demo = packages_for(*asked)
    assert not demo & NOT_FOR_THE_DEMO, demo & NOT_FOR_THE_DEMO
    assert "rsync" not in demo  # only the rsync example DAG copies with it, and the demo runs the other
    assert {"postgresql", "redis-server", "python3-venv"} <= demo  # its cluster, Celery's broker, the venv


def test_make_test_installs_what_the_tests_call_and_not_the_benchmarks_tools():
    test = packages_for(*prereqs_asked_by("test"))
    # docker-compose config, pgbouncer, strace -f, mkfs.btrfs, rsync -a, the e2e stacks' broker
    assert {"docker-compose", "pgbouncer", "strace", "btrfs-progs", "rsync", "redis-server"} <= test
    assert not test & {"zstd", "pgbackrest", "npm"}
    assert "npm" in packages_for(*prereqs_asked_by("test-matrix"))  # the majors Debian does not ship
    assert {"zstd", "pgbackrest"} <= packages_for(*prereqs_asked_by("bench"))


def test_ci_installs_what_every_make_target_it_runs_asks_for():
    """.ci/run installs first (test-matrix and test-floor then run side by side) all its targets need."""
    script = (ROOT / ".ci" / "run").read_text()
    ci = re.search(r"^bash scripts/prereqs\.sh\b(.*)$", script, re.M)
    assert ci, "CI does not run scripts/prereqs.sh"
    installed = packages_for(*ci.group(1).split())
    targets = re.findall(r"^\s*make ([\w-]+)", script, re.M)
    assert {"test", "test-matrix", "test-floor"} <= set(targets), targets
    for target in targets:
        if not any("scripts/prereqs.sh" in line for line in dry_run(target)):  # lint, dist: the venv only
            continue
        missing = packages_for(*prereqs_asked_by(target)) - installed
        assert not missing, f"make {target} needs {missing}, which .ci/run does not install first"


def test_an_unknown_purpose_is_refused_in_one_line_naming_it():
    command = ["bash", "scripts/prereqs.sh", "demo", "tests"]
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "prereqs.sh: unknown purpose 'tests': name demo, test, matrix or bench"
    ]


# ------------------------------------------------------------------------------------ what it tells last


def test_the_commands_the_demo_prints_list_verify_and_restore_its_backup_as_printed(tmp_root: Path):
    """The demo's closing commands, run exactly as printed (the CLI by its absolute path), on a backup stored
    as the demo's is: the list shows it, the verify passes, the restore makes a data directory that
    recovers to the backup's rows."""
    backups = tmp_root / "backups"
    backups.mkdir()
    backup = backups / "demo"
    with cluster_with_space(tmp_root) as (cluster, archive, _location):
        cluster.sql("CREATE TABLE t AS SELECT g AS n FROM generate_series(1, 300) g")
        catalogued_backup(cluster, backup, "pg_backup_example/manual__demo/backup")
        wait_archived(cluster)
    cli = cli_command()
    assert Path(cli[0]).is_absolute()
    steps = next_steps(cli, backups, backup, archive, tmp_root)
    assert [command[len(cli)] for _, command in steps] == ["list", "verify", "restore"]
    for what, command in steps:
        out = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, f"{what}: {out.stdout}{out.stderr}"
        if command[len(cli)] == "list":
            assert "demo" in out.stdout, out.stdout
    with recovered(tmp_root / "restored") as server:
        assert server.sql("SELECT count(*) FROM t") == [(300,)]
