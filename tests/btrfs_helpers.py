"""The tests' btrfs file system on a loop device (demo/btrfs.py): skipped with the reason where it cannot be
made (not root, no losetup or btrfs-progs, no free loop device)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from demo import btrfs
from demo.btrfs import subvolume, subvolumes

#: The image's size: btrfs needs over 100 MB; sparse, so it takes what is written.
IMAGE_MB = 1024


@contextlib.contextmanager
def btrfs_volume(prefix: str = "pgsb-btrfs-") -> Iterator[Path]:
    """:func:`demo.btrfs.btrfs_volume` of :data:`IMAGE_MB`, or the test skipped with the reason."""
    if why := btrfs.btrfs_missing():
        pytest.skip(why)
    try:
        volume = btrfs.btrfs_volume(IMAGE_MB, prefix)
        mount = volume.__enter__()
    except RuntimeError as err:
        pytest.skip(f"no btrfs volume here: {err}")
    try:
        yield mount
    finally:
        volume.__exit__(None, None, None)


__all__ = ["IMAGE_MB", "btrfs_volume", "subvolume", "subvolumes"]
