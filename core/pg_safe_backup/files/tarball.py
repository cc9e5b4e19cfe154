"""A base backup written as tar archives, as ``pg_basebackup -Ft`` writes them: the tar format.

Layout (what ``pg_verifybackup -F t`` of PostgreSQL 18 reads, beside a ``backup_manifest``):

* ``base.tar`` (``.gz``, ``.zst``): the data directory, ``global/pg_control`` its last member;
* ``<oid>.tar`` (``.gz``, ``.zst``) per tablespace: the tablespace's ``PG_<major>_<catversion>/`` folder,
  as ``pg_tblspc/<oid>/`` holds it in the plain format.

``backup_label`` and ``tablespace_map`` come from pg_backup_stop(), after the copy, so they are not in
base.tar (pg_basebackup, whose server knows them first, puts them in): the store writes them beside
the archives. A restore extracts base.tar, then each ``<oid>.tar`` into ``pg_tblspc/<oid>/``, then
places the two label files in the top folder; that tree is exactly the plain format's. The verifier
is told to pass over the two files beside the archives: ``pg_verifybackup -F t -i backup_label -i
tablespace_map`` (they are checked against the manifest once extracted).

A member's tar header holds its size (of 8 GiB or more in GNU's base-256 form, as pg_basebackup writes
it), taken when the file is opened: a file that shrinks meanwhile is
padded with zeros to that size and one that grows is cut at it (basebackup.c ``sendFile()`` does the
same); WAL replay repairs both. A file that vanished before it was opened is left out and counted.
The SHA-256 of each member's bytes as written (padding included) is returned for the manifest.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import tarfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

from pg_safe_backup.files.copier import (
    Copied,
    CopyResult,
    Progress,
    ProgressReporter,
    empty_destination,
    is_local_path,
    sync_paths,
)
from pg_safe_backup.files.crypt import SUFFIX, EncryptingWriter, EncryptionKey
from pg_safe_backup.files.layout import Entry, walk
from pg_safe_backup.files.objects import (
    CHUNK_SIZE,
    BackgroundWriter,
    Target,
    close_durably,
    open_for_writing,
    open_source,
)

#: compression -> suffix of the archives' names (pg_basebackup's).
COMPRESSIONS = {"none": "", "gzip": ".gz", "zstd": ".zst"}
#: The tar format's block; every member is padded to it.
BLOCK = 512
#: The largest member size a ustar header holds in octal; larger ones: :func:`with_base256_size`.
USTAR_SIZE_MAX = 8**11 - 1
#: The end of an archive: two zero blocks (pg_basebackup writes no more).
TRAILER = bytes(2 * BLOCK)
_ZEROS = bytes(CHUNK_SIZE)
_log = logging.getLogger(__name__)


def archive_name(tablespace_oid: str | None, compression: str = "none") -> str:
    """``base.tar`` or ``<oid>.tar``, with the compression's suffix.

    :param tablespace_oid: the tablespace's OID, or None for the data directory.
    :param compression: none, gzip or zstd.
    """
    if compression not in COMPRESSIONS:
        raise ValueError(f"unknown compression {compression!r}: one of {', '.join(COMPRESSIONS)}")
    return f"{tablespace_oid or 'base'}.tar{COMPRESSIONS[compression]}"


def check_compression(compression: str) -> None:
    """Fail early, before anything is written, on a compression that is unknown or not installed.

    :param compression: none, gzip or zstd.
    :raises ValueError: unknown.
    :raises ImportError: zstd without the ``zstandard`` package.
    """
    archive_name(None, compression)
    if compression == "zstd":
        try:
            import zstandard  # noqa: F401
        except ImportError as exc:
            raise ImportError(
                "zstd compression needs the zstandard package:"
                " pip install 'airflow-provider-pg-safe-backup[zstd]'"
            ) from exc


def split_path(path: str) -> tuple[str | None, str]:
    """The archive (tablespace OID, or None for base.tar) and the member name of a backup path.

    :param path: ``/``-separated, relative to the data directory (``pg_tblspc/<oid>/PG_.../...``).
    """
    parts = path.split("/", 2)
    if parts[0] == "pg_tblspc" and len(parts) == 3:
        return parts[1], parts[2]
    return None, path


def with_base256_size(header: bytes, size: int) -> bytes:
    """``header`` (a ustar header block) with its size field in GNU's base-256 form, its checksum redone.

    A ustar size field holds 11 octal digits: less than 8 GiB. For a larger member PostgreSQL's
    ``print_tar_number()`` (src/port/tar.c, which pg_basebackup's tar writer uses) writes ``\\200``, then
    the size in binary, big-endian, in the rest of the field; its ``read_tar_number()`` (pg_verifybackup),
    GNU tar and Python's tarfile all read that back.

    :param header: one 512-byte header block.
    :param size: the member's size.
    """
    block = bytearray(header)
    block[124:136] = b"\x80" + size.to_bytes(11, "big")
    block[148:156] = b" " * 8  # the checksum is of the block with its own field as spaces
    block[148:155] = b"%06o\0" % sum(block[:BLOCK])
    return bytes(block)


class _Counted:
    """Counts the bytes written through it (an archive's stored size)."""

    def __init__(self, out: IO[bytes] | BackgroundWriter) -> None:
        self.out = out
        self.count = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self.out.write(data)
        self.count += len(data)
        return len(data)

    def flush(self) -> None:
        self.out.flush()


class TarWriter:
    """One tar archive streamed into ``out``, compressed on the way; :meth:`close` ends it.

    Memory is bounded: files are read :data:`~pg_safe_backup.files.objects.CHUNK_SIZE` at a time.

    :param out: where the archive goes (a local file, or an object opened ``"wb"``); not closed here.
    :param compression: none, gzip or zstd (the ``zstandard`` package: ``pip install ...[zstd]``).
    :param level: the compression level (default: gzip 6, zstd 3).
    :param threads: zstd's compression threads (default: the CPU count); gzip uses one.
    """

    def __init__(
        self, out: IO[bytes], compression: str = "none", level: int | None = None, threads: int | None = None
    ) -> None:
        check_compression(compression)
        self.stored = _Counted(out)
        self._stream: Any
        if compression == "gzip":
            self._stream = gzip.GzipFile(fileobj=self.stored, mode="wb", compresslevel=level or 6, mtime=0)
        elif compression == "zstd":
            import zstandard

            compressor = zstandard.ZstdCompressor(level=level or 3, threads=threads or os.cpu_count() or 1)
            self._stream = compressor.stream_writer(self.stored, closefd=False)
        else:
            self._stream = self.stored

    def _header(self, name: str, st: os.stat_result, size: int, kind: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.size = size
        info.mode = st.st_mode & 0o7777
        info.mtime = int(st.st_mtime)
        info.uid, info.gid = st.st_uid, st.st_gid
        # ustar, as pg_basebackup writes: its readers (pg_verifybackup) know no pax or GNU headers.
        large = size > USTAR_SIZE_MAX
        if large:
            info.size = 0  # written below, in base-256
        header = info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
        self._stream.write(with_base256_size(header, size) if large else header)

    def add_folder(self, name: str, st: os.stat_result) -> None:
        """A folder member.

        :param name: its name in the archive.
        :param st: its ``stat`` (mode, time, owner).
        """
        self._header(name, st, 0, tarfile.DIRTYPE)

    def add_file(self, name: str, source: IO[bytes]) -> tuple[Copied, bool]:
        """A file member: ``source`` from where it is, as long as its size when this is called.

        :param name: its name in the archive.
        :param source: the file, open for reading.
        :returns: the member's size, SHA-256 of its bytes and time; whether it was padded (it shrank).
        """
        st = os.fstat(source.fileno())
        self._header(name, st, st.st_size, tarfile.REGTYPE)
        digest = hashlib.sha256()
        remaining = st.st_size
        while remaining:
            chunk = source.read(min(CHUNK_SIZE, remaining))
            if not chunk:
                break
            digest.update(chunk)
            self._stream.write(chunk)
            remaining -= len(chunk)
        shrunk = remaining > 0
        while remaining:  # the header says how long the member is: pad with zeros (sendFile)
            zeros = _ZEROS[: min(CHUNK_SIZE, remaining)]
            digest.update(zeros)
            self._stream.write(zeros)
            remaining -= len(zeros)
        self._stream.write(bytes(-st.st_size % BLOCK))
        return Copied(st.st_size, digest.hexdigest(), st.st_mtime_ns), shrunk

    def close(self) -> int:
        """Write the archive's end and flush the compressor.

        :returns: the bytes stored (after compression).
        """
        self._stream.write(TRAILER)
        if self._stream is not self.stored:
            self._stream.close()
        self.stored.flush()
        return self.stored.count


class _Archive:
    """An archive being written into the destination: its writer and the file or object under it."""

    def __init__(
        self,
        destination: Target,
        name: str,
        compression: str,
        level: int | None,
        threads: int,
        key: EncryptionKey | None = None,
    ):
        self.name = name
        self.local = is_local_path(destination)
        self.raw = open_for_writing(destination / (name + SUFFIX if key else name))
        # An object's upload part is sent while the next files are read and compressed.
        self.out = self.raw if self.local else BackgroundWriter(self.raw)
        # Compressed, then encrypted (encrypted bytes do not compress).
        self.sealer = EncryptingWriter(self.out, key) if key else None
        self.tar = TarWriter(self.sealer or self.out, compression, level, threads)  # type: ignore[arg-type]

    def close(self) -> int:
        stored = self.tar.close()
        if self.sealer is not None:
            self.sealer.close()
        if isinstance(self.out, BackgroundWriter):
            self.out.close()
        else:
            close_durably(self.raw, self.local)
        return stored

    def abandon(self) -> None:
        """After a failure: stop writing, raising nothing over the first error."""
        if isinstance(self.out, BackgroundWriter):
            self.out.close(commit=False)
        else:
            self.out.close()


def write_tar_backup(
    datadir: Path,
    destination: Target,
    *,
    overwrite: bool = False,
    compression: str = "none",
    level: int | None = None,
    threads: int | None = None,
    progress: Callable[[Progress], None] | None = None,
    progress_interval: float = 5.0,
    tablespace_dir: str | None = None,
    entries: Iterable[Entry] | None = None,
    key: EncryptionKey | None = None,
    log: logging.Logger | Any = _log,
) -> CopyResult:
    """Write the base backup of ``datadir`` into ``destination`` as ``base.tar`` and one ``<oid>.tar``
    per tablespace (see the module docstring), in the order of
    :func:`~pg_safe_backup.files.layout.walk`: global/pg_control is base.tar's last member, read after
    every other file.

    :param datadir: the data directory (of a running server).
    :param destination: the folder (prefix) of the archives: made if missing, else empty (see
        ``overwrite``).
    :param overwrite: empty a destination that holds anything first; without it such a destination is
        refused (:func:`~pg_safe_backup.files.copier.empty_destination`).
    :param compression: none, gzip or zstd.
    :param level: the compression level (see :class:`TarWriter`).
    :param threads: zstd's compression threads (default: the CPU count).
    :param progress: called in the caller's thread with a :class:`~pg_safe_backup.files.copier.Progress`:
        once the files are listed, then after a file when ``progress_interval`` seconds passed since the
        last call, and once at the end.
    :param progress_interval: seconds between two progress calls.
    :param tablespace_dir: see :func:`~pg_safe_backup.files.layout.walk`.
    :param entries: what to write (default: ``walk(datadir, tablespace_dir)``), in that order.
    :param key: encrypt each archive with it (``base.tar.zst.enc``: :mod:`pg_safe_backup.files.crypt`).
    :param log: where the summary goes.
    :returns: counts, vanished and padded files, each file's SHA-256 (by backup path, as a manifest
        lists it: of the plaintext) and each archive's size before encryption.
    :raises DestinationNotEmpty: the destination holds something and ``overwrite`` is false.
    :raises OSError: a file could not be read or written (the message names it).
    """
    began = time.monotonic()
    result = CopyResult()
    check_compression(compression)
    empty_destination(destination, overwrite)
    destination.mkdir(parents=True, exist_ok=True)
    listed = list(walk(datadir, tablespace_dir, result.special) if entries is None else entries)
    reporter = ProgressReporter.started(progress, progress_interval, listed, result)
    threads = threads or os.cpu_count() or 1
    base = _Archive(destination, archive_name(None, compression), compression, level, threads, key)
    space: _Archive | None = None
    try:
        for entry in listed:
            oid, member = split_path(entry.path)
            if oid is None:
                tar = base
            else:
                if space is not None and space.name != archive_name(oid, compression):
                    result.archives[space.name] = space.close()  # the walk left that tablespace
                    space = None
                if space is None:
                    space = _Archive(
                        destination, archive_name(oid, compression), compression, level, threads, key
                    )
                tar = space
            try:
                _add(tar.tar, entry, member, result)
            except OSError as exc:
                raise OSError(f"writing {entry.source} into {destination / tar.name}: {exc}") from exc
            reporter.tick()
        if space is not None:
            result.archives[space.name] = space.close()
        result.archives[base.name] = base.close()
        if is_local_path(destination):
            sync_paths([destination, destination.parent])  # the archives' entries, and the folder's own
    except BaseException:
        for archive in (space, base):
            if archive is not None and archive.name not in result.archives:
                archive.abandon()
        raise
    reporter.report()
    result.seconds = time.monotonic() - began
    log.info("wrote %s into %s as %s: %s", datadir, destination, ", ".join(result.archives), result.summary())
    return result


def _add(tar: TarWriter, entry: Entry, member: str, result: CopyResult) -> None:
    if entry.is_dir:
        try:
            st = entry.source.stat()
        except FileNotFoundError:
            return  # dropped with its database or tablespace: WAL replay agrees
        tar.add_folder(member, st)
        result.folders += 1
        return
    source = open_source(entry)
    if source is None:
        result.record(entry.path, None)
        return
    with source:
        copied, shrunk = tar.add_file(member, source)
    result.record(entry.path, copied)
    if shrunk:
        result.shrunk.append(entry.path)


__all__ = [
    "BLOCK",
    "COMPRESSIONS",
    "TRAILER",
    "USTAR_SIZE_MAX",
    "TarWriter",
    "archive_name",
    "check_compression",
    "split_path",
    "with_base256_size",
    "write_tar_backup",
]
