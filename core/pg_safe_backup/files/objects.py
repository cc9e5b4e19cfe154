"""A base backup copied into an object store (or a local folder), file by file: the plain format.

The destination is anything with the :class:`Target` protocol: ``pathlib.Path`` and Airflow's
``ObjectStoragePath`` (s3://, gs://, abfs://, file://) both are one, so this module imports nothing from
Airflow. Files are streamed (fsspec uploads big ones in parts), several side by side, each hashed with
SHA-256 as it is read, so the manifest costs no second read. What is copied, and in which order, comes
from :func:`pg_safe_backup.files.layout.walk`: global/pg_control is uploaded after every other file.

An object store keeps no empty folders, and a restored data directory needs them (pg_notify/,
pg_replslot/, pg_wal/archive_status/, ...): the folders the store cannot keep are listed in
:data:`FOLDERS_NAME` at the top of the copy, which :func:`download_tree` reads to make them again.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import queue
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path
from typing import IO, Any, NamedTuple, Protocol

from pg_safe_backup.files.copier import (
    Copied,
    CopyResult,
    Progress,
    ProgressReporter,
    empty_destination,
    is_local_path,
    sync_paths,
)
from pg_safe_backup.files.crypt import SUFFIX, EncryptingWriter, EncryptionKey, decrypt_chunks
from pg_safe_backup.files.layout import CONTROL_FILE, Entry, walk

#: Bytes read (and hashed) at a time.
CHUNK_SIZE = 1 << 20
#: The part size of a streamed upload (S3 takes parts of 5 MiB and more): the write buffer of one file.
PART_SIZE = 8 << 20
#: Folders an object store cannot keep (they hold no file), as JSON, at the top of a plain copy.
FOLDERS_NAME = "backup_folders.json"
_log = logging.getLogger(__name__)


class Target(Protocol):
    """A folder, local or in an object store: ``pathlib.Path`` and ``ObjectStoragePath`` both are one."""

    @property
    def name(self) -> str: ...
    def __truediv__(self, name: str) -> Target: ...
    def open(self, mode: str = ..., **kwargs: Any) -> IO[Any]: ...
    def mkdir(self, parents: bool = ..., exist_ok: bool = ...) -> None: ...
    def exists(self) -> bool: ...
    def is_dir(self) -> bool: ...
    def iterdir(self) -> Iterable[Target]: ...


def open_for_writing(target: Target) -> IO[bytes]:
    """``target`` opened to be written from the start, in parts of :data:`PART_SIZE` when it is an object.

    :param target: a file path or object.
    """
    if is_local_path(target):
        return target.open("wb")
    # fsspec's default block (s3fs: 50 MiB) times the workers would be the copy's memory.
    return target.open("wb", block_size=PART_SIZE)


def close_durably(out: IO[bytes], local: bool) -> None:
    """Close ``out``; a local file is synced to disk first (an object exists once its upload closed).

    :param out: the file written.
    :param local: whether it is a local file (``pathlib.Path`` destination).
    """
    if local:
        out.flush()
        os.fsync(out.fileno())
    out.close()


def open_source(entry: Entry) -> IO[bytes] | None:
    """The file of ``entry`` opened for reading, or None when it vanished (the server dropped it: WAL
    replay agrees). Any other error (permissions, I/O) is raised, naming the file.

    :param entry: a file of :func:`~pg_safe_backup.files.layout.walk`.
    :raises OSError: it is no regular file now (the walk left out those it found: see
        :func:`~pg_safe_backup.files.layout.walk`), or it cannot be read.
    """
    try:
        # O_NONBLOCK: a FIFO put in a file's place since the walk must not block the copy for ever.
        fd = os.open(entry.source, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(f"{entry.source} ({entry.path}) is not a regular file now: it was one when listed")
    return os.fdopen(fd, "rb")


def _upload(entry: Entry, destination: Target, key: EncryptionKey | None = None) -> Copied | None:
    source = open_source(entry)
    if source is None:
        return None
    digest = hashlib.sha256()
    size = 0
    with source:
        mtime_ns = os.fstat(source.fileno()).st_mtime_ns
        out = open_for_writing(destination / (entry.path + SUFFIX if key else entry.path))
        sink = EncryptingWriter(out, key) if key else out
        # A file that grows or shrinks meanwhile is copied as read: WAL replay repairs it.
        while chunk := source.read(CHUNK_SIZE):
            digest.update(chunk)  # of the plaintext: the manifest checks the decrypted copy
            sink.write(chunk)
            size += len(chunk)
        if sink is not out:
            sink.close()
        # Not closed after a failure; fsspec still finishes the upload of a file it collects, so a failed
        # copy can leave a cut object: the copy is no backup before its label is stored (the store
        # task), and a new attempt empties the destination first.
        close_durably(out, is_local_path(destination))
    return Copied(size, digest.hexdigest(), mtime_ns)


def upload_tree(
    datadir: Path,
    destination: Target,
    *,
    workers: int | None = None,
    tablespace_dir: str | None = None,
    entries: Iterable[Entry] | None = None,
    overwrite: bool = False,
    progress: Callable[[Progress], None] | None = None,
    progress_interval: float = 5.0,
    key: EncryptionKey | None = None,
    log: logging.Logger | Any = _log,
) -> CopyResult:
    """Copy the base backup of ``datadir`` into ``destination`` as files (objects), the plain format.

    Folders are made first (a no-op in an object store), files are copied ``workers`` at a time,
    global/pg_control alone after all of them. Memory: ``workers`` x (:data:`CHUNK_SIZE` +
    :data:`PART_SIZE`), whatever the data size.

    :param datadir: the data directory (of a running server).
    :param destination: the copy's top folder (prefix): missing, or empty (see ``overwrite``).
    :param workers: files copied side by side (default: the CPU count).
    :param tablespace_dir: see :func:`~pg_safe_backup.files.layout.walk`.
    :param entries: what to copy (default: ``walk(datadir, tablespace_dir)``); pg_control is copied last
        whatever its place.
    :param overwrite: empty a destination that holds anything first; without it such a destination is
        refused (:func:`~pg_safe_backup.files.copier.empty_destination`).
    :param progress: called in the caller's thread with a :class:`~pg_safe_backup.files.copier.Progress`:
        once the files are listed, every ``progress_interval`` seconds while they are copied (counting
        the files done), and once at the end.
    :param progress_interval: seconds between two progress calls.
    :param key: encrypt each file with it, stored as ``<path>.enc`` (:mod:`pg_safe_backup.files.crypt`);
        :data:`FOLDERS_NAME`, names of empty folders only, stays as it is.
    :param log: where the summary goes.
    :returns: counts, vanished files and each file's SHA-256 (of the plaintext).
    :raises DestinationNotEmpty: the destination holds something and ``overwrite`` is false.
    :raises OSError: a file could not be read or written (the message names it).
    """
    began = time.monotonic()
    result = CopyResult()
    empty_destination(destination, overwrite)
    listed = list(walk(datadir, tablespace_dir, result.special) if entries is None else entries)
    folders: list[str] = []
    files: list[Entry] = []
    control: Entry | None = None
    for entry in listed:
        if entry.is_dir:
            (destination / entry.path).mkdir(parents=True, exist_ok=True)
            folders.append(entry.path)
        elif entry.path == CONTROL_FILE:
            control = entry
        else:
            files.append(entry)

    def one(entry: Entry) -> None:
        try:
            copied = _upload(entry, destination, key)
        except OSError as exc:
            raise OSError(f"copying {entry.source} to {destination / entry.path}: {exc}") from exc
        result.record(entry.path, copied)

    reporter = ProgressReporter.started(progress, progress_interval, listed, result)
    side_by_side(one, files, workers, reporter)
    if control is not None:
        one(control)  # last: a standby's backup ends at the minimum recovery point of this pg_control
    result.empty_folders = _unkept_folders(destination, folders, result.sizes)
    if result.empty_folders:
        out = open_for_writing(destination / FOLDERS_NAME)
        out.write(json.dumps({"folders": result.empty_folders}, indent=1).encode())
        close_durably(out, is_local_path(destination))
    if is_local_path(destination):
        sync_paths([destination, destination.parent, *(destination / folder for folder in folders)])
    reporter.report()
    result.folders = len(folders)
    result.seconds = time.monotonic() - began
    log.info("copied %s into %s: %s", datadir, destination, result.summary())
    return result


def side_by_side(
    one: Callable[[Any], None], items: Iterable[Any], workers: int | None, reporter: ProgressReporter
) -> None:
    """``one(item)`` for every item, ``workers`` at a time (default: the CPU count), reporting progress
    meanwhile; the first failure stops the copy (no new item starts) and is raised."""
    pool = ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1)
    try:
        futures = [pool.submit(one, item) for item in items]

        def finished(timeout: float) -> bool:
            done, pending = wait(futures, timeout, return_when=FIRST_EXCEPTION)
            return not pending or any(future.exception() for future in done)

        reporter.wait(finished)
        for future in futures:
            future.result()
    finally:
        pool.shutdown(cancel_futures=True)  # after a failure, copy no more


def _unkept_folders(destination: Target, folders: list[str], files: Iterable[str]) -> list[str]:
    """The folders that hold nothing copied and that ``destination`` does not keep as empty folders."""
    holding = {os.path.dirname(path) for path in [*files, *folders]}
    empty = [folder for folder in folders if folder not in holding]
    return [folder for folder in empty if not (destination / folder).exists()]


class StoredFile(NamedTuple):
    """One file of a copy as stored: its object (or local file) and its stored size."""

    item: Target
    size: int


def list_stored(source: Target) -> dict[str, StoredFile]:
    """Every file under ``source`` by its stored path relative to it (``base/5/1259``, ``base.tar.zst.enc``),
    with its size: one recursive listing of an object store (no request per folder), a walk of a folder.

    :param source: a copy's top folder (prefix): an object-store path or a local ``Path``.
    :raises OSError: it cannot be listed.
    """
    found: dict[str, StoredFile] = {}
    fs = getattr(source, "fs", None)
    if fs is None or is_local_path(source):
        top = Path(str(source))
        for folder, _dirs, names in os.walk(top, followlinks=True):
            for name in names:
                path = Path(folder, name)
                found[path.relative_to(top).as_posix()] = StoredFile(path, path.stat().st_size)
        return found
    base = str(source.path).rstrip("/")
    for key, info in fs.find(base, detail=True).items():
        rel = str(key)[len(base) :].strip("/")
        if rel and info.get("type") != "directory" and not str(key).endswith("/"):
            found[rel] = StoredFile(source / rel, int(info.get("size") or 0))
    return found


def plaintext_name(stored: str, key: EncryptionKey | None) -> str:
    """The name a stored file is restored under: ``X.enc`` is ``X`` when it is decrypted (``key``)."""
    return stored[: -len(SUFFIX)] if key is not None and stored.endswith(SUFFIX) else stored


def stored_chunks(stored: StoredFile, key: EncryptionKey | None, what: str) -> Iterator[bytes]:
    """The bytes of a stored file, read :data:`CHUNK_SIZE` at a time; a sealed one (``X.enc``) decrypted
    with ``key`` when one is given (each chunk authenticated before it is given out).

    :param stored: the file.
    :param key: the backup's key (None: the bytes as stored).
    :param what: its name for errors.
    :raises CryptError: sealed and changed, cut or of another key.
    """
    with stored.item.open("rb") as src:
        if key is not None and stored.item.name.endswith(SUFFIX):
            yield from decrypt_chunks(src, key, what)
        else:
            while chunk := src.read(CHUNK_SIZE):
                yield chunk


def fetch_file(stored: StoredFile, target: Path, key: EncryptionKey | None, what: str) -> Copied:
    """Write a stored file to the local file ``target`` (made, mode 0600), synced, decrypted when ``key`` is
    given and the file is sealed (``X.enc``); its size and SHA-256 as written.

    :param stored: the file.
    :param target: where it goes.
    :param key: the backup's key, or None.
    :param what: its name, for errors.
    """
    digest = hashlib.sha256()
    size = 0
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        for chunk in stored_chunks(stored, key, what):
            digest.update(chunk)
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]
            size += len(chunk)
        os.fsync(fd)
    finally:
        os.close(fd)
    return Copied(size, digest.hexdigest(), 0)


def download_tree(
    source: Target,
    local: Path,
    *,
    listing: dict[str, StoredFile] | None = None,
    skip_top: Iterable[str] = (),
    folders: Iterable[str] | None = None,
    key: EncryptionKey | None = None,
    workers: int | None = None,
    progress: Callable[[Progress], None] | None = None,
    progress_interval: float = 5.0,
) -> CopyResult:
    """Copy a copy in a store (plain files, label files, archives) into the local folder ``local`` (made if
    missing): files side by side, largest first, each written and synced as it arrives (no second copy),
    global/pg_control alone after every other file; the folders an object store cannot keep made again
    from :data:`FOLDERS_NAME` (which is not copied); every folder synced. Memory: ``workers`` x
    :data:`CHUNK_SIZE`, whatever the size.

    :param source: the copy's top folder (prefix).
    :param local: the local folder to fill.
    :param listing: :func:`list_stored` of ``source`` when the caller has it (one listing, not two).
    :param skip_top: top names (as restored) left out.
    :param folders: the empty folders to make (default: those :data:`FOLDERS_NAME` lists).
    :param key: decrypt each sealed file (``X.enc``) into ``X`` with it; None: copy as stored.
    :param workers: files copied side by side (default: the CPU count).
    :param progress: called in the caller's thread with a :class:`Progress` every ``progress_interval``.
    :param progress_interval: seconds between two progress calls.
    :returns: counts, sizes and SHA-256 of what was written, keyed by the path as restored.
    :raises OSError: a file could not be read or written (named); the copy is then incomplete.
    :raises CryptError: a sealed file does not authenticate with ``key`` (named).
    """
    began = time.monotonic()
    listing = list_stored(source) if listing is None else listing
    skip = set(skip_top)
    names = {plaintext_name(rel, key): rel for rel in listing if rel != FOLDERS_NAME}  # restored -> stored
    files = {name: listing[rel] for name, rel in names.items() if name.split("/", 1)[0] not in skip}
    if folders is None:
        listed = FOLDERS_NAME in listing
        folders = json.loads((source / FOLDERS_NAME).read_bytes())["folders"] if listed else []
    made = {f for f in folders if f.split("/", 1)[0] not in skip}
    for rel in files:
        parts = rel.split("/")[:-1]
        made.update("/".join(parts[: i + 1]) for i in range(len(parts)))
    local.mkdir(mode=0o700, parents=True, exist_ok=True)
    for folder in sorted(made):
        (local / folder).mkdir(mode=0o700, parents=True, exist_ok=True)
    result = CopyResult()
    order = sorted((rel for rel in files if rel != CONTROL_FILE), key=lambda rel: -files[rel].size)
    reporter = ProgressReporter(
        progress,
        progress_interval,
        sum(stored.size for stored in files.values()),
        len(files),
        lambda: (result.bytes, result.files_done),
    )
    reporter.report()

    def one(rel: str) -> None:
        what = f"{source / names[rel]}"
        try:
            result.record(rel, fetch_file(files[rel], local / rel, key, what))
        except OSError as exc:
            raise OSError(f"copying {what} to {local / rel}: {exc}") from exc

    side_by_side(one, order, workers, reporter)
    if CONTROL_FILE in files:
        one(CONTROL_FILE)  # last: until it is there, what was copied is no data directory
    sync_paths([local, local.parent, *(local / folder for folder in made)])
    reporter.report()
    result.folders = len(made)
    result.seconds = time.monotonic() - began
    return result


class StoredReader(io.RawIOBase):
    """A stored file read ahead by a thread (:func:`stored_chunks`): the download and what the caller does
    with the bytes (decompress, extract) go on side by side. At most ``depth`` chunks wait.

    :param stored: the file.
    :param key: decrypt it with this key when it is sealed.
    :param what: its name for errors.
    :param depth: chunks that may wait.
    """

    def __init__(self, stored: StoredFile, key: EncryptionKey | None, what: str, depth: int = 4) -> None:
        super().__init__()
        self._queue: queue.Queue[bytes | BaseException] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._left = memoryview(b"")
        self._ended = False
        self._thread = threading.Thread(
            target=self._run, args=(stored, key, what), name="pgsb-reader", daemon=True
        )
        self._thread.start()

    def _run(self, stored: StoredFile, key: EncryptionKey | None, what: str) -> None:
        try:
            for chunk in stored_chunks(stored, key, what):
                if not self._put(chunk):
                    return
            self._put(b"")
        except BaseException as exc:  # handed to the reader at its next read
            self._put(exc)

    def _put(self, item: bytes | BaseException) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if not self._left:
            if self._ended:
                return 0
            item = self._queue.get()
            if isinstance(item, BaseException):
                self._ended = True
                raise item
            if not item:
                self._ended = True
                return 0
            self._left = memoryview(item)
        n = min(len(buffer), len(self._left))
        buffer[:n] = self._left[:n]
        self._left = self._left[n:]
        return n

    def close(self) -> None:
        self._stop.set()
        super().close()


class BackgroundWriter:
    """A write-only file that hands its chunks to a thread writing them to ``out``: reading, hashing and
    compressing go on while an upload part is sent. At most ``depth`` chunks wait (bounded memory).

    :param out: the file to write to (closed by :meth:`close`).
    :param depth: chunks that may wait.
    """

    def __init__(self, out: IO[bytes], depth: int = 4) -> None:
        self._out = out
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="pgsb-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (chunk := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self._out.write(chunk)
                except BaseException as exc:  # handed to the producer at its next write or close
                    self._error = exc

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Queue ``data`` (copied) to be written.

        :param data: the bytes.
        """
        if self._error is not None:
            raise self._error
        self._queue.put(bytes(data))
        return len(data)

    def flush(self) -> None:
        """Nothing to do: :meth:`close` waits for every chunk."""

    def close(self, commit: bool = True) -> None:
        """Wait until every chunk is written, then close ``out``; raise what writing raised.

        :param commit: False after a failure: stop the thread, write no more, raise nothing, and leave
            ``out`` to the caller.
        """
        if not commit:
            self._error = self._error or RuntimeError("abandoned")
        self._queue.put(None)
        self._thread.join()
        if not commit:
            return
        if self._error is not None:
            raise self._error
        self._out.close()


__all__ = [
    "CHUNK_SIZE",
    "FOLDERS_NAME",
    "PART_SIZE",
    "BackgroundWriter",
    "Copied",
    "CopyResult",
    "StoredFile",
    "StoredReader",
    "Target",
    "download_tree",
    "fetch_file",
    "list_stored",
    "plaintext_name",
    "stored_chunks",
    "close_durably",
    "open_for_writing",
    "open_source",
    "upload_tree",
]
