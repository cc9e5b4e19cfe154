"""`make demo` from any checkout: a private one (as /root is, mode 0700) included.

As root the demo's PostgreSQL runs as the ``postgres`` OS user, which cannot enter a private folder:
the demo's files go where that user can reach them, and a work directory it cannot reach is refused
in one line that names the fix.
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

from pg_safe_backup.local_cluster import LocalCluster

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
