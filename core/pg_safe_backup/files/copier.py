"""Copy a data directory for a base backup: what pg_basebackup sends, in parallel, checksummed as copied.

What is copied comes from :func:`pg_safe_backup.files.layout.walk` (the one table of exclusions). How,
after PostgreSQL's src/backend/backup/basebackup.c (``sendDir()``, ``sendFile()``):

* folders first, with their modes; tablespaces (``pg_tblspc/<oid>`` links)
  become real folders ``pg_tblspc/<oid>/PG_<major>_<catversion>/``: one destination holds the whole
  backup, and a restore places them with tablespace_map;
* files by ``workers`` threads, largest first; each is read once, into fixed buffers per thread, written
  from them and hashed (SHA-256; a large file's chunks by a thread of their own while the next are
  copied): the checksums go to the manifest writer, which then reads nothing again; memory stays
  bounded whatever the data size (about half a KB a file is kept, for the checksums);
* the copies keep their sources' modes and times (and owners, when run as root); what is written is
  handed to writeback every few MB, so no pile of dirty pages stalls the host;
* a file is read up to the size it had when listed: bytes it grew by later are left out and a file that
  shrank is copied as read, which is safe, as WAL replay from the backup's start rewrites every page
  changed since (torn or not); a file that vanished (the server dropped it) is skipped and counted;
  any other error fails the copy, naming the file;
* ``global/pg_control`` is copied last, alone, once every other file is in the copy: a standby's backup
  ends at the minimum recovery point of the pg_control in the copy, which is only right when read last;
* every file and folder of the copy is synced to disk before the copy returns (``fsync=False`` not):
  large files as soon as they are copied, small ones and the folders at the end, side by side.

Unlike pg_basebackup, a file that shrank is not padded with zeros to its listed size: that is a need of
the tar format (its header holds the size), not of a plain copy.

Sizes are in MB of 2**20 bytes, as the rest of the project counts them.
"""

from __future__ import annotations

import hashlib
import os
import queue
import shutil
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from pg_safe_backup.errors import PermanentError, TransientError
from pg_safe_backup.files.layout import CONTROL_FILE, Entry, walk

#: Bytes read at a time per worker: large enough that hashlib and os.write release the GIL for long.
CHUNK = 1 << 20
#: Chunks per worker: read and written ahead of the hash of a large file.
DEPTH = 4
MB = 1 << 20
#: Files this large are synced as soon as copied; smaller ones all at the end, by SYNC_THREADS threads
#: (one by one, each small fsync would wait for a journal commit of its own).
SYNC_INLINE = 8 << 20
SYNC_THREADS = 16
#: Bytes of a file written between two requests to write them back.
FLUSH_EVERY = 8 << 20
#: Names that say a folder holds a backup (or a data directory): the refusal names them.
BACKUP_MARKERS = ("PG_VERSION", "backup_label", "backup_manifest", "global/pg_control")


def is_local_path(target: Any) -> bool:
    """Whether ``target`` is a plain local path, not an object-store path: ObjectStoragePath (a
    universal_pathlib path) is a ``pathlib.Path`` subclass on some Airflow releases (3.1), so ``isinstance``
    alone cannot tell; only object-store paths have a ``protocol``.

    :param target: a ``pathlib.Path``, an ``ObjectStoragePath`` or the like.
    """
    return isinstance(target, Path) and not hasattr(target, "protocol")


class CopyError(TransientError, RuntimeError):
    """The copy failed; the message names the file or folder at fault."""


class DestinationNotEmpty(PermanentError, CopyError):
    """The destination already holds files (a backup, or anything else) and ``overwrite`` was not given.
    Unlike the copy's other errors, never retried: the same destination would refuse again."""


@dataclass(frozen=True)
class Progress:
    """How far a copy is: bytes and files done of those listed, the speed so far and the time left."""

    done_bytes: int
    total_bytes: int
    files_done: int
    files_total: int
    mb_s: float
    eta_s: float | None  # None before anything was copied

    def line(self) -> str:
        """One log line: ``copied 512 of 1024 MB (50%), 300 of 900 files, 210.5 MB/s, 2 s left``."""
        pct = 100 * self.done_bytes / self.total_bytes if self.total_bytes else 100.0
        eta = f"{self.eta_s:.0f} s left" if self.eta_s is not None else "time left unknown"
        return (
            f"copied {self.done_bytes / MB:.0f} of {self.total_bytes / MB:.0f} MB ({pct:.0f}%),"
            f" {self.files_done} of {self.files_total} files, {self.mb_s:.1f} MB/s, {eta}"
        )


class Copied(NamedTuple):
    """One file as copied."""

    size: int  # the bytes written
    sha256: str  # hex, of the bytes written
    mtime_ns: int  # the source's modification time when it was opened (a manifest's Last-Modified)


@dataclass
class CopyResult:
    """What a copy did, whichever engine made it (this module, :mod:`~pg_safe_backup.files.objects`,
    :mod:`~pg_safe_backup.files.tarball`).

    ``checksums``, ``sizes`` and ``mtimes_ns`` are keyed by the path in the backup (``/``-separated, a
    tablespace's as ``pg_tblspc/<oid>/PG_...``), in the order the copies finished: ``global/pg_control``
    is the last key. ``sizes`` are the copies' sizes (what was written), ``mtimes_ns`` the sources' times
    when opened: with the checksums, what a manifest of a copy that is not local needs.
    """

    files: int = 0
    bytes: int = 0
    vanished: list[str] = field(default_factory=list)  # listed, then gone before read: dropped by the server
    seconds: float = 0.0
    checksums: dict[str, str] = field(default_factory=dict)  # SHA-256, hex: ``write_manifest(checksums=)``
    sizes: dict[str, int] = field(default_factory=dict)
    mtimes_ns: dict[str, int] = field(default_factory=dict)
    special: list[str] = field(default_factory=list)  # sockets, FIFOs, devices: skipped, as basebackup.c
    folders: int = 0
    #: files that ended before the size first seen (tar: padded with zeros, as pg_basebackup does).
    shrunk: list[str] = field(default_factory=list)
    #: folders the destination could not keep (an object store: listed in ``objects.FOLDERS_NAME``).
    empty_folders: list[str] = field(default_factory=list)
    #: tar format: archive name -> bytes stored (after compression).
    archives: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def record(self, path: str, copied: Copied | None) -> None:
        """Count one file (thread-safe).

        :param path: its backup path.
        :param copied: what was copied, or None when it vanished before it was opened.
        """
        with self._lock:
            if copied is None:
                self.vanished.append(path)
                return
            self.files += 1
            self.bytes += copied.size
            self.sizes[path] = copied.size
            self.checksums[path] = copied.sha256
            self.mtimes_ns[path] = copied.mtime_ns

    @property
    def files_done(self) -> int:
        """Files copied or found vanished so far."""
        return self.files + len(self.vanished)

    @property
    def mb_s(self) -> float:
        return self.bytes / MB / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        """``copied N files, X MB in T s (Y MB/s); K vanished during the copy``, then the special files
        skipped, the files that shrank and the folders the destination could not keep, if any."""
        line = (
            f"copied {self.files} files, {self.bytes / MB:.1f} MB in {self.seconds:.1f} s"
            f" ({self.mb_s:.1f} MB/s); {len(self.vanished)} vanished during the copy{_some(self.vanished)}"
        )
        if self.special:
            line += f"; {len(self.special)} special files skipped{_some(self.special)}"
        if self.shrunk:
            line += f"; {len(self.shrunk)} shrank while copied{_some(self.shrunk)}"
        if self.empty_folders:
            line += f"; {len(self.empty_folders)} empty folders listed{_some(self.empty_folders)}"
        return line


def _some(paths: list[str]) -> str:
    """`` (a, b, c, d, e, ...)``: the first five of ``paths``, or nothing when there are none."""
    if not paths:
        return ""
    return f" ({', '.join(paths[:5])}{', ...' if len(paths) > 5 else ''})"


class ProgressReporter:
    """Calls ``progress`` with a :class:`Progress` of a copy, in the caller's thread: :meth:`report` now,
    :meth:`tick` when ``interval`` seconds passed since the last call, :meth:`wait` until the copy ends.

    :param progress: the callback, or None (then nothing is reported).
    :param interval: seconds between two calls.
    :param total_bytes: the bytes listed to copy.
    :param files_total: the files listed to copy.
    :param counts: the bytes and files done so far (read from any thread: no lock needed for ints).
    """

    def __init__(
        self,
        progress: Callable[[Progress], None] | None,
        interval: float,
        total_bytes: int,
        files_total: int,
        counts: Callable[[], tuple[int, int]],
    ) -> None:
        self.progress, self.interval = progress, interval
        self.total_bytes, self.files_total, self.counts = total_bytes, files_total, counts
        self.began = self.last = time.monotonic()

    @classmethod
    def started(
        cls,
        progress: Callable[[Progress], None] | None,
        interval: float,
        entries: list[Entry],
        result: CopyResult,
    ) -> ProgressReporter:
        """A reporter of a copy of ``entries`` into ``result``, which has reported once (nothing done).

        :param progress: the callback, or None.
        :param interval: seconds between two calls.
        :param entries: what is to be copied; their sizes are read only when ``progress`` is given (a
            million files are not stat()ed twice for nothing).
        :param result: what the copy records: its bytes and files are the ones done.
        """
        total, files_total = listed_size(entries) if progress is not None else (0, 0)
        reporter = cls(progress, interval, total, files_total, lambda: (result.bytes, result.files_done))
        reporter.report()
        return reporter

    def report(self) -> None:
        """Call ``progress`` now."""
        self.last = now = time.monotonic()
        if self.progress is None:
            return
        done, files_done = self.counts()
        elapsed = now - self.began
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self.total_bytes - done) / rate if rate > 0 else None
        self.progress(Progress(done, self.total_bytes, files_done, self.files_total, rate / MB, eta))

    def tick(self) -> None:
        """Call ``progress`` if ``interval`` seconds passed since the last call."""
        if time.monotonic() - self.last >= self.interval:
            self.report()

    def wait(self, finished: Callable[[float], bool]) -> None:
        """Report every ``interval`` seconds until ``finished(timeout)`` (which waits up to ``timeout``
        seconds) is true.

        :param finished: e.g. ``threading.Event.wait``.
        """
        while not finished(self.interval):
            self.report()


def listed_size(entries: Iterable[Entry]) -> tuple[int, int]:
    """The bytes and the number of the files among ``entries``, as they are now (a file gone counts 0).

    :param entries: what a copy is to copy (:func:`~pg_safe_backup.files.layout.walk`).
    """
    total = files = 0
    for entry in entries:
        if not entry.is_dir:
            files += 1
            try:
                total += os.stat(entry.source).st_size
            except FileNotFoundError:
                pass  # vanished: counted as such when copied
    return total, files


class _Hash(Protocol):
    def update(self, data: bytes | memoryview, /) -> None: ...
    def hexdigest(self) -> str: ...


@dataclass(frozen=True, slots=True)
class _File:
    """A file to copy; plain strings, no Path: a cluster may have a million files, each listed at once."""

    relpath: str
    source: str
    size: int  # at listing: the most that is read (sendFile() reads up to the size sendDir() saw)


class _Pipe:
    """One worker's buffers, its count of bytes copied, and the thread that hashes what it wrote.

    SHA-256 is sequential: one file is hashed on one core. Handing each chunk, once written, to a thread
    of its own lets the next chunk be read and written while this one is hashed: a large file is copied
    at the speed of the hash alone, not of the hash plus the reads and writes. Small files are hashed
    inline (a hand-over costs more than their hash). Memory: :data:`DEPTH` chunks per worker.
    """

    def __init__(self) -> None:
        self.done_bytes = 0  # read by the progress reporter: an int assignment needs no lock
        self.free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        for _ in range(DEPTH):
            self.free.put(bytearray(CHUNK))
        self.chunks: queue.SimpleQueue[tuple[_Hash, bytearray | None, int]] = queue.SimpleQueue()
        self.thread: threading.Thread | None = None
        self.digests: queue.SimpleQueue[str] = queue.SimpleQueue()

    def hash_later(self, digest: _Hash, buf: bytearray, n: int) -> None:
        """Hash ``buf[:n]`` into ``digest`` in the hashing thread; ``buf`` comes back to :attr:`free`."""
        if self.thread is None:
            self.thread = threading.Thread(target=self._hash, daemon=True, name="pgsb-copier-hash")
            self.thread.start()
        self.chunks.put((digest, buf, n))

    def hexdigest(self, digest: _Hash) -> str:
        """``digest`` once every chunk handed over is in it."""
        if self.thread is None:
            return digest.hexdigest()
        self.chunks.put((digest, None, 0))
        return self.digests.get()

    def close(self) -> None:
        if self.thread is not None:
            self.chunks.put((None, None, -1))  # type: ignore[arg-type]
            self.thread.join()

    def _hash(self) -> None:
        while True:
            digest, buf, n = self.chunks.get()
            if n < 0:
                return
            if buf is None:
                self.digests.put(digest.hexdigest())
                continue
            try:
                digest.update(memoryview(buf)[:n])  # releases the GIL
            finally:
                self.free.put(buf)  # whatever happens: the worker waits for its buffers


class _Worker(threading.Thread):
    """Copies files taken from a shared iterator until it is empty, or until the copy failed."""

    def __init__(self, job: _Job) -> None:
        super().__init__(daemon=True, name="pgsb-copier")
        self.job = job
        self.pipe = _Pipe()

    def run(self) -> None:
        job = self.job
        try:
            while not job.stop.is_set():
                with job.lock:
                    item = next(job.todo, None)
                if item is None:
                    return
                copied = _copy_file(item, job.destination, self.pipe, job.fsync, job.keep_owner)
                job.result.record(item.relpath, copied)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread, which raises it
            job.fail(exc)
        finally:
            self.pipe.close()
            job.worker_finished()


class _Job:
    """The state the workers share: what is left to copy, what was copied, the first error."""

    def __init__(
        self, files: list[_File], destination: Path, fsync: bool, keep_owner: bool, workers: int
    ) -> None:
        self.todo: Iterator[_File] = iter(files)
        self.destination, self.fsync, self.keep_owner = destination, fsync, keep_owner
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.all_finished = threading.Event()
        self.running = workers
        self.error: BaseException | None = None
        self.result = CopyResult()

    def fail(self, exc: BaseException) -> None:
        with self.lock:
            if self.error is None:
                self.error = exc
        self.stop.set()

    def worker_finished(self) -> None:
        with self.lock:
            self.running -= 1
            if self.running == 0:
                self.all_finished.set()


def _open_source(item: _File) -> int | None:
    """The source opened for reading, or None when it vanished. O_NONBLOCK: a FIFO put in its place
    must not block the copy (it is refused below, as not a regular file)."""
    try:
        return os.open(item.source, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CopyError(f"cannot open {item.source} ({item.relpath}): {exc.strerror or exc}") from exc


def _copy_file(item: _File, destination: Path, pipe: _Pipe, fsync: bool, keep_owner: bool) -> Copied | None:
    """Copy one file through ``pipe``'s buffers, hashing what is read; None when the source vanished."""
    fd_in = _open_source(item)
    if fd_in is None:
        return None
    target = destination / item.relpath
    try:
        st = os.fstat(fd_in)
        if not stat.S_ISREG(st.st_mode):
            kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file"
            raise CopyError(f"{item.source} ({item.relpath}) is {kind} now: it was a file when listed")
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd_in, 0, 0, os.POSIX_FADV_SEQUENTIAL)  # a larger read-ahead
        try:
            fd_out = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise CopyError(f"cannot create {target}: {exc.strerror or exc}") from exc
        try:
            digest = hashlib.sha256()
            inline = item.size <= CHUNK
            left = item.size
            while left > 0:
                buf = pipe.free.get()  # waits while the hashing thread holds every buffer
                view = memoryview(buf)
                try:
                    n = os.readv(fd_in, [view[: min(CHUNK, left)]])
                except OSError as exc:
                    raise CopyError(f"cannot read {item.source} ({item.relpath}): {exc.strerror}") from exc
                if n == 0:
                    pipe.free.put(buf)
                    break  # it shrank: copied as read, WAL replay repairs it
                _write_all(fd_out, view[:n], target)
                if inline:
                    digest.update(view[:n])
                    pipe.free.put(buf)
                else:
                    pipe.hash_later(digest, buf, n)
                left -= n
                pipe.done_bytes += n
                written = item.size - left
                if written % FLUSH_EVERY < n:
                    # Start writing back what is written so far (as PostgreSQL's pg_flush_data()): the
                    # disk works during the copy, the final fsync finds little left, and gigabytes of
                    # dirty pages never pile up to stall every writer of the host, the server included.
                    os.posix_fadvise(fd_out, 0, written, os.POSIX_FADV_DONTNEED)
            checksum = pipe.hexdigest(digest)
            os.fchmod(fd_out, stat.S_IMODE(st.st_mode))
            if keep_owner:
                os.fchown(fd_out, st.st_uid, st.st_gid)
            os.utime(fd_out, ns=(st.st_atime_ns, st.st_mtime_ns))
            if fsync and item.size >= SYNC_INLINE:
                os.fsync(fd_out)  # now, while the other workers copy: the rest is synced at the end
        except OSError as exc:
            raise CopyError(f"cannot write {target}: {exc.strerror or exc}") from exc
        finally:
            os.close(fd_out)
    finally:
        os.close(fd_in)
    return Copied(item.size - left, checksum, st.st_mtime_ns)


def _write_all(fd: int, data: memoryview, target: Path) -> None:
    while data:
        written = os.write(fd, data)
        if written == 0:
            raise CopyError(f"cannot write {target}: nothing written (disk full?)")
        data = data[written:]


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _check_paths(source: Path, destination: Path) -> None:
    """Refuse a destination that is, or is inside, the source or one of its tablespaces, or that holds
    them: the copy would copy itself, and ``overwrite`` would delete live data."""
    live = [source.resolve()]
    spc = source / "pg_tblspc"
    if spc.is_dir():
        live += [link.resolve() for link in spc.iterdir()]
    dest = destination.resolve()
    for folder in live:
        if _inside(dest, folder) or _inside(folder, dest):
            raise CopyError(
                f"the destination {destination} and the live data in {folder} overlap: copy elsewhere"
            )


def _prepare_destination(
    destination: Path, overwrite: bool, mode: int, owner: tuple[int, int] | None
) -> None:
    """Create the destination, or check it is empty; ``overwrite`` empties it (its contents only, links
    removed, never followed)."""
    if not destination.exists():
        destination.mkdir(parents=True, mode=mode)
        os.chmod(destination, mode)  # mkdir's mode is masked by the umask
        if owner is not None:
            os.chown(destination, *owner)
        return
    empty_destination(destination, overwrite)


def empty_destination(destination: Path | Any, overwrite: bool) -> None:
    """Refuse a destination that holds anything, or empty it with ``overwrite`` (its contents only: local
    links are removed, never followed); a destination that does not exist is left to be made.

    :param destination: a local folder, or a folder (prefix) of an object store
        (:class:`~pg_safe_backup.files.objects.Target`, e.g. ``ObjectStoragePath``).
    :param overwrite: empty it instead of refusing it.
    :raises DestinationNotEmpty: it holds something and ``overwrite`` is false.
    :raises CopyError: it is a file.
    """
    if not destination.exists():
        return
    if not destination.is_dir():
        raise CopyError(f"the destination {destination} is not a folder")
    items = sorted(destination.iterdir(), key=lambda item: item.name)
    if not items:
        return
    if not overwrite:
        markers = [m for m in BACKUP_MARKERS if (destination / m).exists()]
        what = (
            f"already holds a backup or data directory ({', '.join(markers)})"
            if markers
            else f"is not empty{_some([item.name for item in items])}"
        )
        raise DestinationNotEmpty(
            f"the destination {destination} {what}: refusing to copy into it"
            " (overwrite=True empties it first)"
        )
    for item in items:
        if is_local_path(item) and item.is_dir() and not item.is_symlink():
            shutil.rmtree(item)  # its fd-based version: links inside are removed, not followed
        elif not is_local_path(item) and item.is_dir():
            item.rmdir(recursive=True)  # an object store's prefix: every object under it
        else:
            item.unlink()


def _list(
    source: Path, entries: Iterable[Entry] | None = None
) -> tuple[list[tuple[str, Path]], list[_File], _File | None, list[str], list[str]]:
    """Folders, files (largest first), pg_control, vanished and special files of a base backup of
    ``source`` (or of ``entries``), as it is now."""
    folders: list[tuple[str, Path]] = []
    files: list[_File] = []
    control: _File | None = None
    vanished: list[str] = []
    special: list[str] = []  # sockets, FIFOs, devices: left out by the walk
    for entry in walk(source, special=special) if entries is None else entries:
        if entry.is_dir:
            folders.append((entry.path, entry.source))
            continue
        try:
            st = os.stat(entry.source)
        except FileNotFoundError:
            vanished.append(entry.path)
            continue
        except OSError as exc:
            raise CopyError(f"cannot stat {entry.source} ({entry.path}): {exc.strerror or exc}") from exc
        item = _File(entry.path, str(entry.source), st.st_size)
        if entry.path == CONTROL_FILE:
            control = item
        else:
            files.append(item)
    # The largest first: the last files to finish are small, so the workers end together.
    files.sort(key=lambda f: f.size, reverse=True)
    return folders, files, control, vanished, special


def _make_folders(
    folders: list[tuple[str, Path]], destination: Path, keep_owner: bool, exist_ok: bool = False
) -> None:
    for relpath, source in folders:
        target = destination / relpath
        try:
            st = os.stat(source)
            mode, owner = stat.S_IMODE(st.st_mode), (st.st_uid, st.st_gid)
        except FileNotFoundError:
            # Dropped since it was listed (a database): an empty folder, which WAL replay removes.
            mode, owner = 0o700, None
        try:
            if not (exist_ok and os.path.isdir(target) and not os.path.islink(target)):
                os.mkdir(target, mode)
            os.chmod(target, mode)  # mkdir's mode is masked by the umask
            if keep_owner and owner is not None:
                os.chown(target, *owner)
        except OSError as exc:
            raise CopyError(f"cannot create the folder {target}: {exc.strerror or exc}") from exc


def sync_paths(paths: list[Path]) -> None:
    """fsync ``paths`` (files and folders) side by side: a journal commit then covers many of them.

    :param paths: local files and folders.
    :raises CopyError: one cannot be opened or synced (named).
    """

    def one(path: Path) -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise CopyError(f"cannot open {path} to sync it: {exc.strerror or exc}") from exc
        try:
            os.fsync(fd)
        except OSError as exc:
            raise CopyError(f"cannot sync {path}: {exc.strerror or exc}") from exc
        finally:
            os.close(fd)

    with ThreadPoolExecutor(max_workers=SYNC_THREADS, thread_name_prefix="pgsb-copier-sync") as pool:
        for _ in pool.map(one, paths):
            pass


def copy_data_directory(
    source: Path | str,
    destination: Path | str,
    *,
    workers: int | None = None,
    overwrite: bool = False,
    progress: Callable[[Progress], None] | None = None,
    progress_interval: float = 5.0,
    fsync: bool = True,
    entries: Iterable[Entry] | None = None,
) -> CopyResult:
    """Copy what a base backup of the data directory ``source`` holds into the local folder ``destination``.

    Run it while the server is in backup mode (between pg_backup_start and pg_backup_stop). The label
    files and the manifest are written into the copy afterwards
    (:func:`~pg_safe_backup.files.label.store_label`,
    :func:`~pg_safe_backup.files.manifest.write_backup_manifest` with ``checksums=result.checksums``).

    :param source: the data directory (of a running server).
    :param destination: a local folder: created, or empty (see ``overwrite``).
    :param workers: files copied side by side (default: the CPU count).
    :param overwrite: empty a destination that holds anything first (its contents only: links in it are
        removed, never followed); without it such a destination is refused.
    :param progress: called in the caller's thread with a :class:`Progress`: once the files are listed,
        every ``progress_interval`` seconds while they are copied, and once at the end.
    :param progress_interval: seconds between two progress calls.
    :param fsync: sync every file and folder of the copy to disk before returning.
    :param entries: what to copy (default: ``walk(source)``); pg_control is copied last whatever its place.
    :raises DestinationNotEmpty: the destination holds something and ``overwrite`` is false.
    :raises CopyError: a file or folder cannot be read or written (the message names it), or the
        destination overlaps the live data; the copy is then incomplete.
    """
    source, destination = Path(source).absolute(), Path(destination).absolute()
    if not (source / "PG_VERSION").is_file():
        raise CopyError(f"{source} is not a data directory (no PG_VERSION)")
    return _copy_listed(source, destination, entries, workers, overwrite, progress, progress_interval, fsync)


def tree_entries(folder: Path, skip_top: Iterable[str] = ()) -> Iterator[Entry]:
    """The entries of the folder ``folder`` as it is (no base-backup exclusions), links followed into what
    they point at (a dangling one is left out), folders before their contents, its top names in ``skip_top``
    left out: what :func:`copy_tree` copies.

    :raises CopyError: a folder cannot be listed (named).
    """
    folder = Path(folder)
    skip = set(skip_top)
    for top, dirs, names in os.walk(folder, followlinks=True, onerror=_walk_error):
        rel = os.path.relpath(top, folder)
        prefix = "" if rel == "." else rel.replace(os.sep, "/") + "/"
        if not prefix:
            dirs[:] = [d for d in dirs if d not in skip]
            names = [n for n in names if n not in skip]
        dirs.sort()
        for d in dirs:
            yield Entry(prefix + d, Path(top, d), True)
        for n in sorted(names):
            source = Path(top, n)
            if os.path.exists(source):  # a dangling link: nothing to copy
                yield Entry(prefix + n, source, False)


def _walk_error(err: OSError) -> None:
    raise CopyError(f"cannot list {err.filename}: {err.strerror or err}") from err


def copy_tree(
    source: Path | str,
    destination: Path | str,
    *,
    skip_top: Iterable[str] = (),
    workers: int | None = None,
    progress: Callable[[Progress], None] | None = None,
    progress_interval: float = 5.0,
    fsync: bool = True,
) -> CopyResult:
    """Copy the local folder ``source`` (:func:`tree_entries`: as it is, links followed) into the local folder
    ``destination`` (absent or empty) with this module's engine: ``workers`` threads, largest files first,
    fixed buffers, modes and times kept, every file and folder synced. A restore's copy of a stored backup.

    :param source: the folder to copy.
    :param destination: absent or empty.
    :param skip_top: names at the top of ``source`` left out.
    :param workers: files copied side by side (default: the CPU count).
    :param progress: as :func:`copy_data_directory`'s.
    :param progress_interval: seconds between two progress calls.
    :param fsync: sync every file and folder of the copy to disk before returning.
    :raises DestinationNotEmpty: the destination holds something.
    :raises CopyError: a file or folder cannot be read or written (named); the copy is then incomplete.
    """
    source, destination = Path(source).absolute(), Path(destination).absolute()
    if not source.is_dir():
        raise CopyError(f"{source} is not a folder")
    entries = tree_entries(source, skip_top)
    return _copy_listed(source, destination, entries, workers, False, progress, progress_interval, fsync)


class Synced(NamedTuple):
    """What :func:`sync_tree` did: the files it wrote (a copy's result), those it kept as they were, and the
    backup paths it removed."""

    copied: CopyResult
    kept: int
    removed: list[str]


def file_sha256(path: Path | str) -> tuple[str, int]:
    """SHA-256 (hex) and size of a local file, read in :data:`CHUNK` pieces."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def sync_tree(
    source: Path | str,
    destination: Path | str,
    *,
    skip_top: Iterable[str] = (),
    keep_top: Iterable[str] = (),
    workers: int | None = None,
    progress: Callable[[Progress], None] | None = None,
    progress_interval: float = 5.0,
) -> Synced:
    """Make the local folder ``destination`` hold what :func:`copy_tree` of ``source`` into an empty folder
    would (a delta restore): a file of the same size and SHA-256 on both sides is kept (its mode set), any
    other is written again through the engine; what ``source`` does not hold is removed, a link never
    followed (``skip_top`` names are left out of the source and removed from the top of the destination,
    as an empty folder would not hold them). Every file written and every folder is synced.

    :param source: the folder to copy.
    :param destination: an existing folder (the caller decides it may be rewritten).
    :param skip_top: names at the top of ``source`` left out.
    :param keep_top: names at the top of ``destination`` left as they are (the caller's).
    :param workers: files compared, then copied, side by side (default: the CPU count).
    :raises CopyError: a file or folder cannot be read, written or removed (named).
    """
    source, destination = Path(source).absolute(), Path(destination).absolute()
    if not source.is_dir() or not destination.is_dir():
        raise CopyError(f"{source if not source.is_dir() else destination} is not a folder")
    _check_paths(source, destination)
    entries = list(tree_entries(source, skip_top))
    folders = {e.path for e in entries if e.is_dir}
    files = {e.path: e for e in entries if not e.is_dir}
    removed: list[str] = []
    candidates: list[str] = []
    keep = set(keep_top)
    try:
        for top, dirs, names in os.walk(destination, onerror=_walk_error):  # links not followed
            rel = os.path.relpath(top, destination)
            prefix = "" if rel == "." else rel.replace(os.sep, "/") + "/"
            descend = []
            for name in sorted(dirs + names):
                path, full = prefix + name, os.path.join(top, name)
                if path in keep:
                    continue
                real_dir = os.path.isdir(full) and not os.path.islink(full)
                regular = os.path.isfile(full) and not os.path.islink(full)
                if path in folders and real_dir:
                    descend.append(name)
                elif path in files and regular:
                    candidates.append(path)
                else:
                    if real_dir:
                        shutil.rmtree(full)
                    else:
                        os.unlink(full)  # a link is removed, never followed
                    removed.append(path)
            dirs[:] = descend  # only into the folders kept
    except OSError as exc:
        raise CopyError(f"cannot clear {destination}: {exc.strerror or exc}: {exc.filename}") from exc

    def same(path: str) -> bool:
        target = destination / path
        if os.path.getsize(target) != os.path.getsize(files[path].source):
            return False
        return file_sha256(target) == file_sha256(files[path].source)

    count = max(1, workers or os.cpu_count() or 1)
    try:
        with ThreadPoolExecutor(max_workers=count) as pool:
            kept = {path for path, ok in zip(candidates, pool.map(same, candidates), strict=True) if ok}
        for path in candidates:
            target = destination / path
            if path in kept:
                os.chmod(target, stat.S_IMODE(os.stat(files[path].source).st_mode))
            else:
                os.unlink(target)
    except OSError as exc:
        raise CopyError(f"cannot compare {exc.filename}: {exc.strerror or exc}") from exc
    todo = [e for e in entries if e.is_dir or e.path not in kept]
    copied = _copy_listed(
        source, destination, todo, workers, False, progress, progress_interval, True, into_existing=True
    )
    return Synced(copied, len(kept), removed)


def _copy_listed(
    source: Path,
    destination: Path,
    entries: Iterable[Entry] | None,
    workers: int | None,
    overwrite: bool,
    progress: Callable[[Progress], None] | None,
    progress_interval: float,
    fsync: bool,
    into_existing: bool = False,
) -> CopyResult:
    """The copy of :func:`copy_data_directory`, :func:`copy_tree` and :func:`sync_tree`: ``entries``
    (None: ``walk(source)``) into ``destination`` (``into_existing``: a folder that holds the others
    already, whose folders are kept)."""
    began = time.monotonic()
    _check_paths(source, destination)
    keep_owner = os.geteuid() == 0
    top = source.stat()
    owner = (top.st_uid, top.st_gid) if keep_owner else None
    if not into_existing:
        _prepare_destination(destination, overwrite, stat.S_IMODE(top.st_mode), owner)
    folders, files, control, vanished, special = _list(source, entries)
    _make_folders(folders, destination, keep_owner, exist_ok=into_existing)
    total = sum(f.size for f in files) + (control.size if control else 0)
    files_total = len(files) + (control is not None)

    count = max(1, min(workers or os.cpu_count() or 1, len(files) or 1))
    job = _Job(files, destination, fsync, keep_owner, count)
    threads = [_Worker(job) for _ in range(count)]
    pipes = [t.pipe for t in threads]
    result = job.result
    reporter = ProgressReporter(
        progress,
        progress_interval,
        total,
        files_total,
        lambda: (sum(p.done_bytes for p in pipes), result.files_done),
    )
    reporter.report()
    for t in threads:
        t.start()
    try:
        reporter.wait(job.all_finished.wait)
    finally:
        job.stop.set()  # an exception here (the task killed): the workers stop after their file
    if job.error is not None:
        raise job.error
    if control is not None:
        # Last, alone, once everything else is in the copy (basebackup.c sends it last too).
        pipes.append(last := _Pipe())
        try:
            copied = _copy_file(control, destination, last, fsync, keep_owner)
        finally:
            last.close()
        result.record(control.relpath, copied)
    if fsync:
        # Small files, then every folder (their entries), the destination and its parent (its entry).
        small = [destination / path for path, size in result.sizes.items() if size < SYNC_INLINE]
        folder_paths = [destination / relpath for relpath, _ in folders]
        sync_paths(small + folder_paths + [destination, destination.parent])
    reporter.report()
    result.vanished[:0] = vanished  # those gone before they were listed, first
    result.seconds = time.monotonic() - began
    result.special = special
    result.folders = len(folders)
    return result


__all__ = [
    "CHUNK",
    "Copied",
    "CopyError",
    "CopyResult",
    "DestinationNotEmpty",
    "Progress",
    "ProgressReporter",
    "copy_data_directory",
    "copy_tree",
    "empty_destination",
    "file_sha256",
    "sync_tree",
    "listed_size",
]
