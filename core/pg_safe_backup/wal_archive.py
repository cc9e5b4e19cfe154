"""The WAL archive ``pg-safe-backup wal-push`` writes and ``wal-fetch`` reads: PostgreSQL's
``archive_command`` and ``restore_command``, done safely.

The archive is a flat folder: a local one (:class:`LocalStore`) or a prefix in an object store
(:class:`UrlStore`: s3://, gs://, abfs://, through fsspec with each store's own credential chain, as its
own tools read it). Names and the stored format are :mod:`pg_safe_backup.files.walarchive`'s.

:func:`push` (``archive_command``):

- durable before it says so: a local file is written under a temporary name (in :data:`TEMP_FOLDER`, which
  no reader takes for WAL), fsynced, linked under its name (create-only) and the folder fsynced; an object
  is one PUT, which a store shows whole or not at all;
- never overwrites: a file already archived under the name (whatever its compression or encryption) with
  the same plaintext (SHA-256) is success, a different one an error naming both checksums;
- the archive's identity (:data:`~pg_safe_backup.files.walarchive.IDENTITY_FILE`) is written once, before
  the first file, from that segment's long page header and the data directory (PG_VERSION, pg_control);
  a segment whose header names another system is refused. History, ``.backup`` and ``.partial`` files
  carry no such header and are stored without that check.

:func:`fetch` (``restore_command``): decrypt and decompress into a temporary name beside the target,
fsync, rename; a segment is checked against the identity (size, system) before it is renamed.

:func:`push_async` (``--parallel N``): as pgBackRest's asynchronous archive-push, a background
:func:`pusher` (one per spool, started by the first call that finds none) pushes every ``.ready`` file, N
at once, and records each in the spool (:mod:`pg_safe_backup.files.walspool`) only once it is durable in
the archive; PostgreSQL's call for a file waits for its record, and its calls for the files pushed ahead
are answered from theirs at once (``__main__``), after the file's size, inode and time are compared.

Airflow-free; imports fsspec only for a URL archive, cryptography only when encrypting.
"""

from __future__ import annotations

import io
import os
import sys
import time
from collections import namedtuple

from pg_safe_backup.errors import PermanentError, TransientError, error_line
from pg_safe_backup.files import walspool
from pg_safe_backup.files.crypt import CHUNK_SIZE, EncryptionKey
from pg_safe_backup.files.walarchive import (
    IDENTITY_FILE,
    ArchiveIdentity,
    StoredName,
    candidates,
    codec_module,
    decode,
    encode,
    is_archived_name,
    parse_stored_name,
)
from pg_safe_backup.files.walheader import (
    NotWal,
    file_system_identifier,
    fsync_path,
    header_system_identifier,
)
from pg_safe_backup.files.walspool import SPOOL_FOLDER as SPOOL_FOLDER  # re-exported: wal-push's names
from pg_safe_backup.files.walspool import archive_location

TYPE_CHECKING = False
if TYPE_CHECKING:  # annotations only: this module runs once per WAL file, and each import costs (pathlib's
    # with re, fnmatch and urllib: paths here are strings, any os.PathLike taken)
    from collections.abc import Callable, Iterable
    from pathlib import Path
    from typing import IO

#: The environment variable ``--archive`` defaults to.
ARCHIVE_ENV = "PGSB_WAL_ARCHIVE"
#: A local archive's folder of pushes in progress: never read as WAL, emptied of a name's leftovers by its
#: next push.
TEMP_FOLDER = ".pg_safe_backup_tmp"
#: A WAL segment's name (no .partial): the files with a long page header.
SEGMENT_NAME_LENGTH = 24


class WalArchiveError(PermanentError, ValueError):
    """A push or fetch refused or failed for a reason running it again does not change (one line)."""


class WalConflict(WalArchiveError):
    """The archive holds another file under the same name (both checksums named); it is kept."""


class WrongCluster(WalArchiveError):
    """A segment of another cluster than the one whose WAL the archive holds."""


class WalNotArchived(TransientError, FileNotFoundError):
    """wal-fetch of a name the archive does not hold: the end of the archive, normal at recovery's end."""


def is_segment(name: str) -> bool:
    """Whether ``name`` is a whole WAL segment (a file with a long page header), not .partial/.history/
    .backup."""
    return len(name) == SEGMENT_NAME_LENGTH and is_archived_name(name)


# ------------------------------------------------------------------------------------------ the stores
class Store:
    """Where an archive's files are: find a name's stored file, read one, write one create-only."""

    #: The archive as the user named it (a folder's absolute path, or the URL), for messages and the spool.
    where: str

    def find(self, name: str) -> list[str]:
        """The stored names (``%f`` + suffixes) of ``name`` in the archive."""
        raise NotImplementedError

    def open(self, stored: str) -> IO[bytes]:
        """A stored file, to read from its start.

        :raises FileNotFoundError: it is not there.
        """
        raise NotImplementedError

    def put(self, stored: str, chunks: Iterable[bytes]) -> None:
        """Write ``chunks`` under ``stored``, durably, create-only.

        :raises FileExistsError: something is stored under that name already (left as it is).
        """
        raise NotImplementedError

    def put_copy(self, stored: str, source: Path | str) -> None:
        """:meth:`put` of the file ``source`` as it is (no compression, no encryption)."""
        with open(source, "rb") as f:
            self.put(stored, iter(lambda: f.read(CHUNK_SIZE), b""))

    def holds_anything(self) -> bool:
        """Whether the archive exists and holds a file (a folder is checked when opened: True)."""
        return True

    def clean(self, name: str) -> None:
        """Remove what a killed push of ``name`` left (nothing for an object store: a PUT is whole)."""

    def read_identity(self) -> ArchiveIdentity | None:
        """The archive's identity file, or None before the first push."""
        try:
            with self.open(IDENTITY_FILE) as f:
                data = f.read()
        except FileNotFoundError:
            return None
        return ArchiveIdentity.from_bytes(data, f"{self.where}/{IDENTITY_FILE}")

    def write_identity(self, identity: ArchiveIdentity) -> None:
        """Write the identity file, create-only (:meth:`put`)."""
        self.put(IDENTITY_FILE, [identity.to_bytes()])

    def written_by(self) -> tuple[int, str] | None:
        """The system identifier of WAL already in an archive without an identity file, and the segment
        that says so; None when nothing tells."""
        return None


def _unlink(path: Path | str) -> None:
    """Remove ``path`` if it is there."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _copy(src: IO[bytes], dst: IO[bytes]) -> None:
    """Copy the open file ``src`` into ``dst`` by the kernel (sendfile: no pass through Python, as
    ``shutil.copyfile`` does it, whose import costs each push), by reads where it cannot."""
    offset = 0
    try:
        while sent := os.sendfile(dst.fileno(), src.fileno(), offset, 1 << 30):
            offset += sent
    except OSError:  # a file system sendfile does not serve: the rest by reads
        src.seek(offset)
        dst.seek(offset)
        while chunk := src.read(CHUNK_SIZE):
            dst.write(chunk)
        dst.flush()


def _exists(path: Path | str) -> bool:
    """Whether ``path`` exists; an error other than "no such file" (a folder the user may not read) raises:
    taken for "not archived", it would end a recovery early."""
    try:
        os.lstat(path)
    except FileNotFoundError:
        return False
    return True


class LocalStore(Store):
    """An archive in a local (or mounted) folder.

    :param folder: the folder; it must exist (a typo must not start an archive elsewhere).
    """

    def __init__(self, folder: Path | str) -> None:
        self.folder = os.path.abspath(folder)
        self.where = archive_location(self.folder)
        if not os.path.isdir(self.folder):
            raise WalArchiveError(f"--archive {self.folder}: no such folder")

    def find(self, name: str) -> list[str]:
        # A stat per possible name: cheaper than listing a folder of a hundred thousand segments.
        return [c.stored for c in candidates(name) if _exists(os.path.join(self.folder, c.stored))]

    def open(self, stored: str) -> IO[bytes]:
        return open(os.path.join(self.folder, stored), "rb")

    def _temp(self, stored: str) -> str:
        temp = os.path.join(self.folder, TEMP_FOLDER)
        os.makedirs(temp, exist_ok=True)
        return os.path.join(temp, f"{stored}.{os.getpid()}.{os.urandom(4).hex()}")

    def put(self, stored: str, chunks: Iterable[bytes]) -> None:
        def write(temp: str) -> None:
            with open(temp, "xb") as f:
                for piece in chunks:
                    f.write(piece)
                f.flush()
                os.fsync(f.fileno())

        self._publish(stored, write)

    def put_copy(self, stored: str, source: Path | str) -> None:
        def write(temp: str) -> None:
            with open(source, "rb") as src, open(temp, "xb") as dst:
                _copy(src, dst)
                os.fsync(dst.fileno())

        self._publish(stored, write)

    def _publish(self, stored: str, write: Callable[[str], None]) -> None:
        """``write`` a temporary file (fsynced), link it under ``stored`` (create-only), fsync the folder."""
        final = os.path.join(self.folder, stored)
        temp = self._temp(stored)
        try:
            write(temp)
            try:
                os.link(temp, final)  # create-only and atomic: never replaces what is there
            except FileExistsError:
                raise
            except OSError:  # a file system without hard links: the name was checked absent just before
                if _exists(final):
                    raise FileExistsError(final) from None
                os.rename(temp, final)
        finally:
            _unlink(temp)
        fsync_path(self.folder)

    def clean(self, name: str) -> None:
        temp = os.path.join(self.folder, TEMP_FOLDER)
        try:
            leftovers = [e for e in os.scandir(temp) if parse_stored_name(e.name.rsplit(".", 2)[0])]
        except FileNotFoundError:
            return
        for entry in leftovers:
            if parse_stored_name(entry.name.rsplit(".", 2)[0]).name == name:  # type: ignore[union-attr]
                _unlink(entry.path)

    def written_by(self) -> tuple[int, str] | None:
        # An archive cp filled before wal-push took over: its oldest segment names its cluster.
        from pg_safe_backup.files.wal import archive_system_identifier

        return archive_system_identifier(self.folder)


class UrlStore(Store):
    """An archive under an object-store URL (s3://bucket/prefix, gs://, abfs://...), through fsspec; the
    credentials come the way the store's own tools read them (AWS_* variables, ~/.aws, an instance role;
    GOOGLE_APPLICATION_CREDENTIALS; AZURE_STORAGE_*), and fsspec's FSSPEC_<PROTOCOL>_<OPTION> variables.

    An object appears whole or not at all when its PUT returns: no temporary name is needed.

    :param url: the archive's URL.
    """

    def __init__(self, url: str) -> None:
        try:
            import fsspec
        except ImportError:
            raise WalArchiveError(f"--archive {url}: an object store needs fsspec and its driver") from None
        self.where = archive_location(url)
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.where)
        except (ImportError, ValueError) as err:
            raise WalArchiveError(f"--archive {url}: {' '.join(str(err).split())}") from None
        self.root = self.root.rstrip("/")

    def _path(self, stored: str) -> str:
        return f"{self.root}/{stored}"

    def find(self, name: str) -> list[str]:
        try:
            try:  # one listing of the keys under the name (s3fs, gcsfs, adlfs take a prefix)
                found = self.fs.find(self.root, prefix=name, maxdepth=1, refresh=True)
            except TypeError:
                found = self.fs.glob(self._path(name) + "*")
        except FileNotFoundError:
            found = []
        names = [p.rsplit("/", 1)[-1] for p in found]
        return [n for n in names if (s := parse_stored_name(n)) is not None and s.name == name]

    def holds_anything(self) -> bool:
        # A missing bucket or a mistyped prefix lists nothing, like a name not archived yet.
        return bool(self.fs.exists(self.root))

    def open(self, stored: str) -> IO[bytes]:
        return io.BytesIO(self.fs.cat_file(self._path(stored)))

    def put(self, stored: str, chunks: Iterable[bytes]) -> None:
        data = b"".join(chunks)  # one PUT: whole or nothing
        if self.fs.exists(self._path(stored)):
            raise FileExistsError(self._path(stored))
        self.fs.pipe_file(self._path(stored), data)


def required(archive: str | None) -> str:
    """``--archive``'s value (``$PGSB_WAL_ARCHIVE`` applied), which wal-push and wal-fetch need.

    :raises WalArchiveError: it is missing.
    """
    if not archive:
        raise WalArchiveError(
            "--archive URL_OR_DIR (or the environment variable PGSB_WAL_ARCHIVE) is required"
        )
    return archive


def open_store(archive: str) -> Store:
    """The store ``archive`` names: a folder, a file:// URL (both :class:`LocalStore`), or another URL.

    :param archive: ``--archive``'s value.
    """
    if archive.startswith("file://"):
        return LocalStore(archive[len("file://") :])
    if "://" in archive:
        return UrlStore(archive)
    return LocalStore(archive)


# ------------------------------------------------------------------------------------------------ push
class Pushed(namedtuple("Pushed", ("name", "stored", "sha256", "size", "already"), defaults=(False,))):
    """What :func:`push` did.

    :param name: the file's name (``%f``).
    :param stored: the name it is stored under.
    :param sha256: the plaintext's SHA-256 (hex), when it was asked for or compared.
    :param size: the plaintext's bytes.
    :param already: it was archived already (the same plaintext), nothing written.
    """

    __slots__ = ()


def stored_sha256(store: Store, stored: str, key: EncryptionKey | None) -> str:
    """SHA-256 (hex) of a stored file's plaintext (decrypted and decompressed: the rare path of a push that
    finds its name archived).

    :raises WalArchiveError: it is encrypted and no key was given.
    """
    parsed = parse_stored_name(stored)
    assert parsed is not None
    what = f"{store.where}/{stored}"
    if parsed.encrypted and key is None:
        raise WalArchiveError(
            f"{what} is archived encrypted: give its key (--encryption-key-file or --encryption-key-env) to"
            " compare it with the file pushed"
        )
    import hashlib

    digest = hashlib.sha256()
    with store.open(stored) as f:
        for piece in decode(f, parsed, key, what):
            digest.update(piece)
    return digest.hexdigest()


def data_directory(path: Path | str) -> str:
    """The data directory ``path`` (``%p``) belongs to: the parent of its pg_wal/ (not resolved: pg_wal may
    be a link), else the working directory, where PostgreSQL runs archive_command."""
    folder = os.path.dirname(os.path.abspath(path))
    return os.path.dirname(folder) if os.path.basename(folder) == "pg_wal" else os.getcwd()


def cluster_identity(path: Path | str, data_dir: Path | str) -> ArchiveIdentity:
    """The identity of the cluster that wrote ``path``: its long page header's system identifier when it is
    a segment (else pg_control's), the data directory's major and segment size.

    :raises WalArchiveError: the data directory cannot be read.
    """
    from pg_safe_backup.files.pgcontrol import BadPgControl, read_pg_control

    try:
        control = read_pg_control(data_dir)
        with open(os.path.join(data_dir, "PG_VERSION")) as f:
            major = int(f.read().split(".")[0])
    except (BadPgControl, OSError, ValueError) as err:
        raise WalArchiveError(
            f"cannot record the archive's identity from the data directory {data_dir} (wal-push runs there,"
            f" as archive_command does): {' '.join(str(err).split())}"
        ) from None
    system = file_system_identifier(path) if is_segment(os.path.basename(path)) else control.system_identifier
    return ArchiveIdentity(system, major, control.xlog_seg_size)


def archive_identity(store: Store, path: Path | str, data_dir: Path | str) -> ArchiveIdentity:
    """The archive's identity, written now (create-only, durable) when this is its first push."""
    identity = store.read_identity()
    if identity is not None:
        return identity
    mine = cluster_identity(path, data_dir)
    earlier = store.written_by()
    if earlier is not None and earlier[0] != mine.system_identifier:
        raise WrongCluster(
            f"{path} is WAL of the cluster with system identifier {mine.system_identifier}, but the archive"
            f" {store.where} already holds WAL of system {earlier[0]} ({earlier[1]}): refusing to mix two"
            " clusters' WAL in one archive"
        )
    try:
        store.write_identity(mine)
    except FileExistsError:  # another push wrote it meanwhile: that one holds
        identity = store.read_identity()
        assert identity is not None
        return identity
    return mine


def check_cluster(store: Store, path: Path | str, identity: ArchiveIdentity) -> None:
    """Refuse a segment whose long page header names another system than the archive's.

    :raises WrongCluster: naming both identifiers.
    """
    if not is_segment(os.path.basename(path)):
        return
    system = file_system_identifier(path)
    if system != identity.system_identifier:
        raise WrongCluster(
            f"{path} is WAL of the cluster with system identifier {system}, but the archive {store.where}"
            f" holds WAL of system {identity.system_identifier} (its {IDENTITY_FILE}): refusing to mix two"
            " clusters' WAL in one archive"
        )


def _already(store: Store, found: list[str], path: str, key: EncryptionKey | None) -> Pushed:
    """The name is archived: success when the plaintext is the same, else :class:`WalConflict`."""
    from pg_safe_backup.files.copier import file_sha256  # the rare path: its imports only here

    name = os.path.basename(path)
    ours, size = file_sha256(path)
    for stored in found:
        theirs = stored_sha256(store, stored, key)
        if theirs != ours:
            raise WalConflict(
                f"{name}: the archive {store.where} already holds {stored} with other content (archived"
                f" sha256 {theirs}, {path} sha256 {ours}); the archived one is kept"
            )
    return Pushed(name, found[0], ours, size, already=True)


def push(
    path: Path | str,
    store: Store,
    *,
    compression: str = "none",
    key: EncryptionKey | None = None,
    data_dir: Path | str | None = None,
) -> Pushed:
    """Archive the file ``path`` (module docstring); returns once it is durable in the archive.

    :param path: the file (``%p``).
    :param store: the archive.
    :param compression: a key of :data:`~pg_safe_backup.files.walarchive.COMPRESSIONS`.
    :param key: encrypt with it, or None.
    :param data_dir: the cluster's data directory (default: see :func:`data_directory`).
    :raises WalArchiveError: refused (another cluster, other content, not a WAL file); MissingCodec.
    :raises OSError: the file or the archive could not be read or written.
    """
    path = os.fspath(path)
    name = os.path.basename(path)
    if not is_archived_name(name):
        raise WalArchiveError(
            f"{path}: not a file PostgreSQL archives (a WAL segment, .partial, .history or .backup)"
        )
    codec_module(compression)  # a missing library fails before anything is written
    identity = archive_identity(store, path, data_dir or data_directory(path))
    check_cluster(store, path, identity)
    found = store.find(name)
    if found:
        return _already(store, found, path, key)
    store.clean(name)
    stored = StoredName(name, compression, key is not None).stored
    try:
        if compression == "none" and key is None:
            store.put_copy(stored, path)  # by the kernel, no pass through Python
            size = os.stat(path).st_size
        else:
            with open(path, "rb") as f:
                store.put(stored, encode(iter(lambda: f.read(CHUNK_SIZE), b""), compression, key))
                size = f.tell()
    except FileExistsError:  # pushed by another process meanwhile
        return _already(store, store.find(name), path, key)
    return Pushed(name, stored, None, size)


# ------------------------------------------------------------------------------- the wal-push command
def push_command(
    path: Path | str,
    archive: str | None,
    *,
    compression: str = "none",
    parallel: int = 1,
    spool_dir: Path | str | None = None,
    key_file: Path | str | None = None,
    key_env: str | None = None,
    failed: Callable[[str], object] | None = None,
) -> int:
    """``pg-safe-backup wal-push``, its flags parsed (by ``cli`` or by ``__main__``'s short way): push
    ``path``, alone (:func:`push`) or through the background pusher (``parallel`` above 1:
    :func:`push_async`). Returns the exit status; a failure is one line on stderr, never a traceback.

    :param path: ``%p``.
    :param archive: ``--archive`` (``$PGSB_WAL_ARCHIVE`` already applied).
    :param compression: ``--compress``.
    :param parallel: ``--parallel``.
    :param spool_dir: ``--spool-dir``.
    :param key_file: ``--encryption-key-file``.
    :param key_env: ``--encryption-key-env``.
    :param failed: also given a failure's line (``--json`` reports it).
    """
    try:
        archive = required(archive)
        path = os.fspath(path)
        spool = walspool.spool_folder(path, spool_dir)
        # Before opening the store: answering from a record must not import an object store's driver.
        if walspool.answered(path, archive_location(archive), spool):
            return 0
        from pg_safe_backup.files.crypt import key_from_flags

        key = key_from_flags(key_file, key_env)
        if parallel > 1:
            push_async(path, archive, parallel=parallel, spool=spool, compression=compression, key=key)
        else:
            push(path, open_store(archive), compression=compression, key=key)
    except Exception as err:  # noqa: BLE001 - archive_command: one line in the server log, never a traceback
        print(f"pg-safe-backup wal-push: error: {error_line(err)}", file=sys.stderr)
        if failed is not None:
            failed(error_line(err))
        return 1
    return 0


# ---------------------------------------------------------------------------- --parallel: the pusher
#: How long a call waits for the background pusher to archive its file (pgBackRest's archive-timeout).
ASYNC_TIMEOUT = 60.0
#: How long the pusher goes on after the last call that waited for it (a call answered from its record does
#: not wait): archiving paused (``archive_command = ''``) or another archive_command stops it.
PUSHER_LINGER = 2.0
#: How often a waiting call and an idle pusher look again (seconds).
POLL = 0.01
#: The pusher's lock in the spool: held (flock) for as long as it runs.
PUSHER_LOCK = "pusher.lock"


def ready_files(pg_wal: Path | str) -> list[str]:
    """The files ``pg_wal``/archive_status/ marks ``.ready``, in the order PostgreSQL's archiver takes them
    (timeline history files first, then by name: pgarch.c)."""
    status = os.path.join(os.path.abspath(pg_wal), "archive_status")
    try:
        names = [n[: -len(".ready")] for n in os.listdir(status) if n.endswith(".ready")]
    except FileNotFoundError:
        return []
    names = [n for n in names if is_archived_name(n)]
    return sorted(names, key=lambda n: (not n.endswith(".history"), n))


def push_async(
    path: Path | str,
    archive: str,
    *,
    parallel: int,
    spool: Path | str,
    compression: str = "none",
    key: EncryptionKey | None = None,
    timeout: float = ASYNC_TIMEOUT,
) -> None:
    """Archive ``path`` through the background pusher, as pgBackRest's asynchronous archive-push: one
    pusher per spool (a ``flock``), started by the first call that finds none, pushes every ``.ready`` file
    ``parallel`` at once and records each in the spool once it is durable
    (:func:`files.walspool.write_record`), or its failure (:func:`files.walspool.write_error`). This call
    returns when ``path`` is recorded: PostgreSQL's calls for the others are then answered from their
    records by ``__main__`` at once.

    Each call that waits says what it wants (:func:`files.walspool.want`: the archive, compression, key id
    and N); a pusher started for something else, or not asked for :data:`PUSHER_LINGER` seconds, stops, and
    the next call starts one for what it wants. A pusher's error line answers only a call that wants the
    same. A file that is not ``.ready`` (not PostgreSQL's call) is pushed here, alone.

    :param path: the file PostgreSQL asks to archive.
    :param archive: ``--archive``.
    :param parallel: files at once.
    :param spool: the spool folder.
    :param timeout: seconds to wait for the pusher.
    :raises WalArchiveError: the pusher's line for this file (it tries again on PostgreSQL's next call),
        or no record within ``timeout``.
    """
    path = os.fspath(path)
    name = os.path.basename(path)
    if name not in ready_files(os.path.dirname(path)):
        push(path, open_store(archive), compression=compression, key=key)
        return
    where = archive_location(archive)
    wanted = f"{where}|{compression}|{key.key_id if key else ''}|{parallel}"
    os.makedirs(spool, exist_ok=True)
    deadline = time.monotonic() + timeout
    while True:
        walspool.want(spool, wanted)
        if walspool.answered(path, where, spool):
            return
        failed = walspool.take_error(spool, name, wanted)
        if failed is not None:
            raise WalArchiveError(failed)
        if time.monotonic() > deadline:
            raise WalArchiveError(
                f"{name}: the background pusher (spool {spool}) did not archive it in {timeout:.0f} s"
            )
        lock = _pusher_lock(spool)
        if lock is not None:
            if not os.fork():
                _pusher_process(path, archive, wanted, parallel, spool, compression, key)
            os.close(lock)  # the pusher's copy holds it, until the pusher exits
        time.sleep(POLL)


def _pusher_lock(spool: Path | str) -> int | None:
    """The spool's pusher lock (``flock``), taken, when no pusher runs; None when one does."""
    import fcntl

    lock = os.open(os.path.join(spool, PUSHER_LOCK), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock)
        return None
    return lock


def _pusher_process(
    path: str,
    archive: str,
    wanted: str,
    parallel: int,
    spool: Path | str,
    compression: str,
    key: EncryptionKey | None,
) -> None:
    """The forked pusher: its own session and no output (nobody waits on it), :func:`pusher`, then exit.
    A pusher that cannot run (an archive that is not there) leaves its line for ``path``'s call, which
    would else start another, failing the same way, until its timeout."""
    status = 0
    try:
        os.setsid()  # outlives this call; PostgreSQL waits only for the call
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        pusher(
            os.path.dirname(path),
            archive,
            wanted=wanted,
            parallel=parallel,
            spool=spool,
            compression=compression,
            key=key,
        )
    except BaseException as err:  # noqa: BLE001 - told to the call that started it
        status = 1
        try:
            line = f"the background pusher: {error_line(err)}"
            walspool.write_error(spool, os.path.basename(path), line, wanted)
        except OSError:
            pass
    finally:
        os._exit(status)


def pusher(
    pg_wal: Path | str,
    archive: str,
    *,
    wanted: str,
    parallel: int,
    spool: Path | str,
    compression: str = "none",
    key: EncryptionKey | None = None,
    linger: float = PUSHER_LINGER,
) -> None:
    """The background pusher's loop: push the ``.ready`` files of ``pg_wal`` that have neither a record nor
    an error in ``spool``, ``parallel`` at once, oldest first; drop records and errors of files no longer
    ``.ready``. It returns (its pushes done) once the calls want something else than ``wanted``, or none
    waited for ``linger`` seconds. A file whose push failed is tried again once its error was taken (by
    PostgreSQL's next call for it).
    """
    from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

    store = open_store(archive)
    data_dir = data_directory(os.path.join(pg_wal, "x"))  # a file's in pg_wal: the folder above it

    def one(name: str) -> bool:
        path = os.path.join(pg_wal, name)
        try:
            state = walspool.file_state(path)  # before it is read: a later change shows
            push(path, store, compression=compression, key=key, data_dir=data_dir)
            walspool.write_record(spool, name, state, store.where)
        except Exception as err:  # noqa: BLE001 - reported by PostgreSQL's call for it
            walspool.write_error(spool, name, f"{name}: {error_line(err)}", wanted)
            return False
        return True

    running: dict[str, Future[bool]] = {}
    pushed: set[str] = set()  # this run's: a record used up before the listing must not push it again
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        while True:
            asked, age = walspool.wanted(spool)
            if asked != wanted or age > linger:
                return  # the pushes running end first (the pool's exit waits for them)
            ready = ready_files(pg_wal)
            waiting = set(ready)
            recorded, failed = walspool.listing(spool)
            for name in (recorded | failed) - waiting:  # no longer .ready: never asked for, stale
                walspool.forget(spool, name)
            pushed &= waiting
            skip = recorded | failed | pushed | running.keys()
            for name in [n for n in ready if n not in skip][: parallel - len(running)]:
                running[name] = pool.submit(one, name)
            if running:
                done, _ = wait(running.values(), timeout=POLL * 5, return_when=FIRST_COMPLETED)
                for name in [n for n, f in running.items() if f in done]:
                    if running.pop(name).result():
                        pushed.add(name)
            else:
                time.sleep(POLL * 5)


# ----------------------------------------------------------------------------------------------- fetch
class Fetched(namedtuple("Fetched", ("stored", "size"))):
    """What :func:`fetch` wrote: the stored file it read and the plaintext's size."""

    __slots__ = ()


def fetch(name: str, target: Path | str, store: Store, *, key: EncryptionKey | None = None) -> Fetched:
    """Write the archived file ``name`` (``%f``), decrypted and decompressed, to ``target`` (``%p``): under
    a temporary name beside it, fsynced, renamed, the folder fsynced. Nothing is at ``target`` on failure.

    :param name: the file's name.
    :param target: where PostgreSQL wants it.
    :param store: the archive.
    :param key: the key of an encrypted archive.
    :raises WalNotArchived: the archive does not hold ``name``.
    :raises WalArchiveError, CryptError, DamagedFile: it does not decode, or is not a segment of the
        archive's cluster.
    """
    target = os.path.abspath(target)
    found = store.find(name)
    if not found and not store.holds_anything():
        raise WalArchiveError(f"the archive {store.where} holds nothing (no such bucket or prefix?)")
    if not found:
        raise WalNotArchived(f"{name} is not in the archive {store.where}")
    if len(found) > 1:
        raise WalArchiveError(
            f"the archive {store.where} holds {name} {len(found)} times ({', '.join(found)}): one stored file"
            " per name, remove the wrong one"
        )
    stored = parse_stored_name(found[0])
    assert stored is not None
    what = f"{store.where}/{found[0]}"
    identity = store.read_identity() if is_segment(name) else None
    folder, base = os.path.split(target)
    temp = os.path.join(folder, f".{base}.{os.getpid()}.pgsb-tmp")  # no WAL name: the server ignores it
    size = 0
    head = b""
    try:
        with store.open(found[0]) as src, open(temp, "wb") as dst:
            for piece in decode(src, stored, key, what):
                if len(head) < 64:
                    head += piece[:64]
                dst.write(piece)
                size += len(piece)
            dst.flush()
            os.fsync(dst.fileno())
        if identity is not None:
            _check_fetched(what, head, size, identity)
        os.replace(temp, target)
    finally:
        _unlink(temp)
    fsync_path(folder)
    return Fetched(found[0], size)


def _check_fetched(what: str, head: bytes, size: int, identity: ArchiveIdentity) -> None:
    """A fetched segment must be whole and of the archive's cluster."""
    if size != identity.wal_segment_size:
        raise WalArchiveError(
            f"{what}: {size} bytes, not a whole {identity.wal_segment_size}-byte segment of this archive"
        )
    try:
        system = header_system_identifier(head, what)
    except NotWal as err:
        raise WalArchiveError(str(err)) from None
    if system != identity.system_identifier:
        raise WalArchiveError(
            f"{what} is WAL of system {system}, not of the archive's system {identity.system_identifier}"
        )
