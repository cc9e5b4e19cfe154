"""A btrfs file system on a loop device, made and removed by the test: subvolumes for a data directory and a
tablespace, a folder for the snapshots. Needs root, losetup and btrfs-progs (scripts/prereqs.sh installs
them); a test is skipped with the reason otherwise."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

#: The image's size: btrfs needs over 100 MB; sparse, so it takes what is written.
IMAGE_MB = 1024


def btrfs_missing() -> str | None:
    """Why a btrfs volume cannot be made here, or None."""
    if os.geteuid() != 0:
        return "btrfs on a loop device needs root"
    for tool in ("losetup", "mkfs.btrfs", "btrfs", "mount", "umount"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (btrfs-progs, util-linux: scripts/prereqs.sh)"
    return None


def run(*cmd: str) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {done.stderr.strip() or done.returncode}")
    return done.stdout


def subvolumes(mount: Path) -> list[str]:
    """The paths (relative to the file system's top) of every subvolume and snapshot on it."""
    lines = run("btrfs", "subvolume", "list", str(mount)).splitlines()
    return sorted(line.split(" path ", 1)[1] for line in lines if " path " in line)


@contextlib.contextmanager
def btrfs_volume(prefix: str = "pgsb-btrfs-") -> Iterator[Path]:
    """A fresh btrfs file system mounted at the returned folder (entered by the server's OS user), on a loop
    device over a sparse image; unmounted, detached and removed on leaving, and checked to be gone."""
    if why := btrfs_missing():
        pytest.skip(why)
    root = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(root, 0o755)
    image, mount = root / "btrfs.img", root / "mnt"
    mount.mkdir()
    with open(image, "wb") as f:
        f.truncate(IMAGE_MB << 20)
    try:
        device = run("losetup", "--find", "--show", str(image)).strip()
    except RuntimeError as err:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"no loop device: {err}")
    try:
        run("mkfs.btrfs", "-q", device)
        run("mount", device, str(mount))
        os.chmod(mount, 0o755)
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)
        subprocess.run(["losetup", "-d", device], capture_output=True)
        attached = run("losetup", "-j", str(image)).strip()
        mounted = str(mount) in Path("/proc/self/mounts").read_text()
        shutil.rmtree(root, ignore_errors=True)
        assert not attached and not mounted, f"left behind: {attached or mount}"


def subvolume(path: Path, owner: str | None = None) -> Path:
    """A new btrfs subvolume at ``path`` (given to ``owner``, an OS user)."""
    run("btrfs", "subvolume", "create", str(path))
    if owner:
        run("chown", f"{owner}:", str(path))
    return path
