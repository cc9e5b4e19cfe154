"""A btrfs file system on a loop device, made and removed on the spot: the snapshot tests
(tests/btrfs_helpers.py) and the snapshot benchmark (bench/snapshotbench.py) put data directories and
tablespaces on its subvolumes. Needs root, losetup and btrfs-progs (scripts/prereqs.sh installs them)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

TOOLS = ("losetup", "mkfs.btrfs", "btrfs", "mount", "umount")


def btrfs_missing() -> str | None:
    """Why a btrfs volume cannot be made here, or None."""
    if os.geteuid() != 0:
        return "btrfs on a loop device needs root"
    for tool in TOOLS:
        if shutil.which(tool) is None:
            return f"{tool} is not installed (btrfs-progs, util-linux: scripts/prereqs.sh)"
    return None


def run(*cmd: str) -> str:
    """``cmd``'s output; RuntimeError with its error line when it fails."""
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {done.stderr.strip() or done.returncode}")
    return done.stdout


@contextlib.contextmanager
def btrfs_volume(size_mb: int, prefix: str = "pgsb-btrfs-", where: Path | None = None) -> Iterator[Path]:
    """A fresh btrfs file system of ``size_mb`` MB mounted at the returned folder (entered by the server's OS
    user), on a loop device over a sparse image in a temporary folder (of ``where``, default TMPDIR);
    unmounted, detached and removed on leaving, and checked to be gone.

    :raises RuntimeError: it cannot be made here (:func:`btrfs_missing`, or no free loop device).
    """
    if why := btrfs_missing():
        raise RuntimeError(why)
    root = Path(tempfile.mkdtemp(prefix=prefix, dir=where))
    os.chmod(root, 0o755)
    image, mount = root / "btrfs.img", root / "mnt"
    mount.mkdir()
    device = None
    try:
        with open(image, "wb") as f:
            f.truncate(size_mb << 20)
        device = run("losetup", "--find", "--show", str(image)).strip()
        run("mkfs.btrfs", "-q", device)
        run("mount", device, str(mount))
        os.chmod(mount, 0o755)
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)
        if device:
            subprocess.run(["losetup", "-d", device], capture_output=True)
        attached = run("losetup", "-j", str(image)).strip() if image.exists() else ""
        mounted = f" {mount} " in Path("/proc/self/mounts").read_text()
        shutil.rmtree(root, ignore_errors=True)
        if attached or mounted:
            raise RuntimeError(f"left behind: {attached or mount}")


def subvolume(path: Path, owner: str | None = None) -> Path:
    """A new btrfs subvolume at ``path`` (given to ``owner``, an OS user)."""
    run("btrfs", "subvolume", "create", str(path))
    if owner:
        run("chown", f"{owner}:", str(path))
    return path


def subvolumes(mount: Path) -> list[str]:
    """The paths (relative to the file system's top) of every subvolume and snapshot on it."""
    lines = run("btrfs", "subvolume", "list", str(mount)).splitlines()
    return sorted(line.split(" path ", 1)[1] for line in lines if " path " in line)
