"""Tar members of any size: a member of 8 GiB or more gets a GNU base-256 size field, as PostgreSQL's
print_tar_number() writes it (src/port/tar.c); GNU tar, Python's tarfile and restore's extraction read it.
Apart from the object-store tests: nothing here touches Airflow (not in the floor Airflow's run)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from pg_safe_backup.files.tarball import TRAILER, with_base256_size, write_tar_backup
from pg_safe_backup.restore import _extract, _Progress

GIB = 1 << 30


def streamed_sha256(path: Path) -> str:
    """SHA-256 of ``path``, read 8 MB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def test_a_member_of_8_gib_or_more_has_a_header_gnu_tar_and_python_read(tmp_root):
    """The header :class:`TarWriter` writes for a member past the ustar size field's 8 GiB, in an archive
    whose member is a hole (seeked over by both readers): GNU tar and Python's tarfile list its size."""
    info = tarfile.TarInfo("base/5/16384")
    info.mtime = 1764149400
    archive = tmp_root / "large.tar"
    with open(archive, "wb") as f:
        f.write(with_base256_size(info.tobuf(tarfile.USTAR_FORMAT), 9 * GIB))
        f.seek(9 * GIB, os.SEEK_CUR)
        f.write(TRAILER)
    with tarfile.open(archive) as tar:
        assert [(m.name, m.size) for m in tar.getmembers()] == [("base/5/16384", 9 * GIB)]
    listed = subprocess.run(["tar", "-tvf", str(archive)], capture_output=True, text=True, check=True)
    assert f" {9 * GIB} " in listed.stdout
    assert listed.stdout.rstrip().endswith(" base/5/16384")


def test_a_9_gib_file_is_copied_into_a_zstd_tar_and_extracted_by_restore_byte_for_byte(cluster, tmp_root):
    """A sparse 9 GiB file in a live data directory (as a relation segment of the postgres database; the
    server never opens it), copied by the tar engine with zstd (the archive stays small), extracted by
    restore's extraction: the same bytes as the original, and the tar engine's checksum of them."""
    database = cluster.sql("SELECT oid FROM pg_database WHERE datname = 'postgres'")[0][0]
    path = f"base/{database}/4294967290"
    big = cluster.datadir / path
    with open(big, "wb") as f:
        f.truncate(9 * GIB - 8)
        f.seek(0, os.SEEK_END)
        f.write(b"pgsb-end")  # the member's last bytes are not zeros: a cut member shows
    try:
        original = streamed_sha256(big)
        result = write_tar_backup(cluster.datadir, tmp_root / "tar", compression="zstd")
    finally:
        big.unlink()
    assert result.sizes[path] == 9 * GIB
    assert result.checksums[path] == original
    assert result.archives["base.tar.zst"] < 64 << 20
    # 9 GiB written out: on a disk (/var/tmp), whatever TMPDIR says (`make test` may put it on tmpfs),
    # and freed at once.
    on_disk = Path(tempfile.mkdtemp(prefix="pgsb-9gib-", dir="/var/tmp"))
    try:
        _extract(tmp_root / "tar" / "base.tar.zst", on_disk, set(), _Progress(0, None))
        extracted = on_disk / path
        assert extracted.stat().st_size == 9 * GIB
        assert streamed_sha256(extracted) == original
    finally:
        shutil.rmtree(on_disk)
