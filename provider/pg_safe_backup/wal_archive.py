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

:func:`push_ahead` (``--parallel``): push the next ``.ready`` files with ``%p``, each recorded in a spool
only once durable in the archive; PostgreSQL's later call for such a file is answered from its record
(:func:`answered_by_spool`) after the file's size and checksum are compared with it.

Airflow-free; imports fsspec only for a URL archive, cryptography only when encrypting.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from pg_safe_backup.errors import PermanentError, TransientError
from pg_safe_backup.files.crypt import CHUNK_SIZE, EncryptionKey
from pg_safe_backup.files.wal import (
    NotWal,
    archive_system_identifier,
    fsync_path,
    header_system_identifier,
    segment_system_identifier,
)
from pg_safe_backup.files.walarchive import (
    ARCHIVED_NAME,
    IDENTITY_FILE,
    ArchiveIdentity,
    StoredName,
    candidates,
    codec_module,
    decode,
    encode,
    parse_stored_name,
)

#: The environment variable ``--archive`` defaults to.
ARCHIVE_ENV = "PGSB_WAL_ARCHIVE"
#: A local archive's folder of pushes in progress: never read as WAL, emptied of a name's leftovers by its
#: next push.
TEMP_FOLDER = ".pg_safe_backup_tmp"
#: The spool's default folder, in pg_wal/: a base backup leaves pg_wal/'s contents out (basebackup.c), so
#: no backup carries its records.
SPOOL_FOLDER = "pg_safe_backup_spool"
#: A spool record's suffix.
SPOOL_SUFFIX = ".pushed"
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
    return len(name) == SEGMENT_NAME_LENGTH and bool(ARCHIVED_NAME.match(name))


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

    def put_copy(self, stored: str, source: Path) -> None:
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
        return ArchiveIdentity.from_json(data, f"{self.where}/{IDENTITY_FILE}")

    def write_identity(self, identity: ArchiveIdentity) -> None:
        """Write the identity file, create-only (:meth:`put`)."""
        self.put(IDENTITY_FILE, [identity.to_json()])

    def written_by(self) -> tuple[int, str] | None:
        """The system identifier of WAL already in an archive without an identity file, and the segment
        that says so; None when nothing tells."""
        return None


def _exists(path: Path) -> bool:
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
        self.folder = Path(folder).absolute()
        self.where = archive_location(str(self.folder))
        if not self.folder.is_dir():
            raise WalArchiveError(f"--archive {self.folder}: no such folder")

    def find(self, name: str) -> list[str]:
        # A stat per possible name: cheaper than listing a folder of a hundred thousand segments.
        return [c.stored for c in candidates(name) if _exists(self.folder / c.stored)]

    def open(self, stored: str) -> IO[bytes]:
        return open(self.folder / stored, "rb")

    def _temp(self, stored: str) -> Path:
        temp = self.folder / TEMP_FOLDER
        temp.mkdir(exist_ok=True)
        return temp / f"{stored}.{os.getpid()}.{os.urandom(4).hex()}"

    def put(self, stored: str, chunks: Iterable[bytes]) -> None:
        def write(temp: Path) -> None:
            with open(temp, "xb") as f:
                for piece in chunks:
                    f.write(piece)
                f.flush()
                os.fsync(f.fileno())

        self._publish(stored, write)

    def put_copy(self, stored: str, source: Path) -> None:
        def write(temp: Path) -> None:
            shutil.copyfile(
                source, temp
            )  # the kernel copies (copy_file_range/sendfile): no pass through Python
            fsync_path(temp)

        self._publish(stored, write)

    def _publish(self, stored: str, write: Callable[[Path], None]) -> None:
        """``write`` a temporary file (fsynced), link it under ``stored`` (create-only), fsync the folder."""
        final = self.folder / stored
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
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()
        fsync_path(self.folder)

    def clean(self, name: str) -> None:
        temp = self.folder / TEMP_FOLDER
        try:
            leftovers = [e for e in os.scandir(temp) if parse_stored_name(e.name.rsplit(".", 2)[0])]
        except FileNotFoundError:
            return
        for entry in leftovers:
            if parse_stored_name(entry.name.rsplit(".", 2)[0]).name == name:  # type: ignore[union-attr]
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)

    def written_by(self) -> tuple[int, str] | None:
        # An archive cp filled before wal-push took over: its oldest segment names its cluster.
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


def archive_location(archive: str) -> str:
    """How a store names ``archive`` (its ``where``), known without opening it: a spool record is compared
    with it before fsspec is imported.

    :param archive: ``--archive``'s value.
    """
    if archive.startswith("file://"):
        return str(Path(archive[len("file://") :]).absolute())
    if "://" in archive:
        return archive.rstrip("/")
    return str(Path(archive).absolute())


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
@dataclass(frozen=True)
class Pushed:
    """What :func:`push` did.

    :param name: the file's name (``%f``).
    :param stored: the name it is stored under.
    :param sha256: the plaintext's SHA-256 (hex), when it was asked for or compared.
    :param size: the plaintext's bytes.
    :param already: it was archived already (the same plaintext), nothing written.
    """

    name: str
    stored: str
    sha256: str | None
    size: int
    already: bool = False


def _reading(f: IO[bytes], digest: hashlib._Hash | None) -> Iterator[bytes]:
    while chunk := f.read(CHUNK_SIZE):
        if digest is not None:
            digest.update(chunk)
        yield chunk


def file_sha256(path: Path) -> tuple[str, int]:
    """SHA-256 (hex) and size of a local file."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        for chunk in _reading(f, digest):
            size += len(chunk)
    return digest.hexdigest(), size


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
    digest = hashlib.sha256()
    with store.open(stored) as f:
        for piece in decode(f, parsed, key, what):
            digest.update(piece)
    return digest.hexdigest()


def data_directory(path: Path) -> Path:
    """The data directory ``path`` (``%p``) belongs to: the parent of its pg_wal/ (not resolved: pg_wal may
    be a link), else the working directory, where PostgreSQL runs archive_command."""
    absolute = Path(os.path.abspath(path))
    return absolute.parent.parent if absolute.parent.name == "pg_wal" else Path.cwd()


def cluster_identity(path: Path, data_dir: Path) -> ArchiveIdentity:
    """The identity of the cluster that wrote ``path``: its long page header's system identifier when it is
    a segment (else pg_control's), the data directory's major and segment size.

    :raises WalArchiveError: the data directory cannot be read.
    """
    from pg_safe_backup.files.pgcontrol import BadPgControl, read_pg_control

    try:
        control = read_pg_control(data_dir)
        major = int((data_dir / "PG_VERSION").read_text().split(".")[0])
    except (BadPgControl, OSError, ValueError) as err:
        raise WalArchiveError(
            f"cannot record the archive's identity from the data directory {data_dir} (wal-push runs there,"
            f" as archive_command does): {' '.join(str(err).split())}"
        ) from None
    system = segment_system_identifier(path) if is_segment(path.name) else control.system_identifier
    return ArchiveIdentity(system, major, control.xlog_seg_size)


def archive_identity(store: Store, path: Path, data_dir: Path) -> ArchiveIdentity:
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


def check_cluster(store: Store, path: Path, identity: ArchiveIdentity) -> None:
    """Refuse a segment whose long page header names another system than the archive's.

    :raises WrongCluster: naming both identifiers.
    """
    if not is_segment(path.name):
        return
    system = segment_system_identifier(path)
    if system != identity.system_identifier:
        raise WrongCluster(
            f"{path} is WAL of the cluster with system identifier {system}, but the archive {store.where}"
            f" holds WAL of system {identity.system_identifier} (its {IDENTITY_FILE}): refusing to mix two"
            " clusters' WAL in one archive"
        )


def _already(store: Store, found: list[str], path: Path, key: EncryptionKey | None) -> Pushed:
    """The name is archived: success when the plaintext is the same, else :class:`WalConflict`."""
    ours, size = file_sha256(path)
    for stored in found:
        theirs = stored_sha256(store, stored, key)
        if theirs != ours:
            raise WalConflict(
                f"{path.name}: the archive {store.where} already holds {stored} with other content (archived"
                f" sha256 {theirs}, {path} sha256 {ours}); the archived one is kept"
            )
    return Pushed(path.name, found[0], ours, size, already=True)


def push(
    path: Path | str,
    store: Store,
    *,
    compression: str = "none",
    key: EncryptionKey | None = None,
    data_dir: Path | None = None,
    sha256: bool = False,
) -> Pushed:
    """Archive the file ``path`` (module docstring); returns once it is durable in the archive.

    :param path: the file (``%p``).
    :param store: the archive.
    :param compression: a key of :data:`~pg_safe_backup.files.walarchive.COMPRESSIONS`.
    :param key: encrypt with it, or None.
    :param data_dir: the cluster's data directory (default: see :func:`data_directory`).
    :param sha256: compute the plaintext's SHA-256 while writing (a spool record needs it); else a plain
        file is copied by the kernel.
    :raises WalArchiveError: refused (another cluster, other content, not a WAL file); MissingCodec.
    :raises OSError: the file or the archive could not be read or written.
    """
    path = Path(path)
    if not ARCHIVED_NAME.match(path.name):
        raise WalArchiveError(
            f"{path}: not a file PostgreSQL archives (a WAL segment, .partial, .history or .backup)"
        )
    codec_module(compression)  # a missing library fails before anything is written
    identity = archive_identity(store, path, data_dir or data_directory(path))
    check_cluster(store, path, identity)
    found = store.find(path.name)
    if found:
        return _already(store, found, path, key)
    store.clean(path.name)
    stored = StoredName(path.name, compression, key is not None).stored
    digest = hashlib.sha256() if sha256 else None
    try:
        if digest is None and compression == "none" and key is None:
            store.put_copy(stored, path)
            size = path.stat().st_size
        else:
            with open(path, "rb") as f:
                store.put(stored, encode(_reading(f, digest), compression, key))
                size = f.tell()
    except FileExistsError:  # pushed by another process meanwhile
        return _already(store, store.find(path.name), path, key)
    return Pushed(path.name, stored, digest.hexdigest() if digest else None, size)


# ----------------------------------------------------------------------------------- push ahead: spool
def spool_folder(path: Path, spool_dir: Path | None = None) -> Path:
    """Where the spool records of ``path``'s cluster are: ``spool_dir``, else pg_wal/:data:`SPOOL_FOLDER`."""
    return Path(spool_dir) if spool_dir else Path(os.path.abspath(path)).parent / SPOOL_FOLDER


def _record_path(spool: Path, name: str) -> Path:
    return spool / f"{name}{SPOOL_SUFFIX}"


def record_pushed(spool: Path, store: Store, pushed: Pushed) -> None:
    """Record durably that ``pushed`` is in ``store`` (called only once it is durable there)."""
    spool.mkdir(exist_ok=True)
    final = _record_path(spool, pushed.name)
    temp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    body = {"name": pushed.name, "size": pushed.size, "sha256": pushed.sha256, "archive": store.where}
    with open(temp, "w") as f:
        json.dump(body, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, final)
    fsync_path(spool)


def answered_by_spool(path: Path, where: str, spool: Path) -> bool:
    """Whether a push ahead already archived ``path`` into ``where``: its record names this archive, and
    the file's size and SHA-256 are the recorded ones. The record is used once (removed).

    :param path: the file PostgreSQL asks to archive.
    :param where: the archive it asks for (:func:`archive_location`).
    :param spool: the spool folder.
    """
    record = _record_path(spool, path.name)
    try:
        body = json.loads(record.read_text())
    except FileNotFoundError:
        return False
    except (OSError, ValueError):
        body = {}
    with contextlib.suppress(FileNotFoundError):
        record.unlink()  # used once; if it does not match, the push that follows decides
    if not isinstance(body, dict) or body.get("archive") != where:
        return False
    try:
        if os.path.getsize(path) != body.get("size"):
            return False
    except OSError:
        return False
    return file_sha256(path)[0] == body.get("sha256")


def ready_files(path: Path) -> list[str]:
    """The files pg_wal/archive_status/ marks ``.ready`` besides ``path``, in the order PostgreSQL's
    archiver takes them (timeline history files first, then by name: pgarch.c)."""
    status = Path(os.path.abspath(path)).parent / "archive_status"
    try:
        names = [n[: -len(".ready")] for n in os.listdir(status) if n.endswith(".ready")]
    except FileNotFoundError:
        return []
    names = [n for n in names if n != path.name and ARCHIVED_NAME.match(n)]
    return sorted(names, key=lambda n: (not n.endswith(".history"), n))


def push_ahead(
    path: Path | str,
    store: Store,
    *,
    parallel: int,
    spool: Path,
    compression: str = "none",
    key: EncryptionKey | None = None,
    data_dir: Path | None = None,
    warn: Callable[[str], None] = lambda line: None,
) -> Pushed:
    """Push ``path`` and up to ``parallel - 1`` of the next ``.ready`` files at once; each of the others is
    recorded in ``spool`` once it is durable (one that fails is left for PostgreSQL to ask again).

    :param path: the file PostgreSQL asks to archive.
    :param store: the archive.
    :param parallel: how many files at once, ``path`` included.
    :param spool: the spool folder.
    :param warn: told of each other file that could not be pushed (one line).
    :returns: ``path``'s push.
    :raises: what :func:`push` raises for ``path``.
    """
    path = Path(path)
    data_dir = data_dir or data_directory(path)
    recorded = {p.name[: -len(SPOOL_SUFFIX)] for p in spool.glob(f"*{SPOOL_SUFFIX}")}
    waiting = ready_files(path)
    for name in recorded.difference(waiting, [path.name]):  # no longer .ready: never asked for, stale
        with contextlib.suppress(FileNotFoundError):
            _record_path(spool, name).unlink()
    ahead = [n for n in waiting if n not in recorded][: max(parallel - 1, 0)]

    def one(name: str) -> None:
        try:
            pushed = push(
                path.parent / name, store, compression=compression, key=key, data_dir=data_dir, sha256=True
            )
            record_pushed(spool, store, pushed)
        except Exception as err:  # noqa: BLE001 - PostgreSQL asks for it later; its own push then fails loudly
            warn(f"pushing {name} ahead: {' '.join(str(err).split())}")

    from concurrent.futures import ThreadPoolExecutor

    # The identity first, once, so that the files pushed together never race to write it.
    archive_identity(store, path, data_dir)
    with ThreadPoolExecutor(max_workers=max(parallel, 1)) as pool:
        others = [pool.submit(one, name) for name in ahead]
        mine = pool.submit(push, path, store, compression=compression, key=key, data_dir=data_dir)
        for other in others:
            other.result()
        return mine.result()


# ----------------------------------------------------------------------------------------------- fetch
@dataclass(frozen=True)
class Fetched:
    """What :func:`fetch` wrote: the stored file it read and the plaintext's size."""

    stored: str
    size: int


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
    target = Path(target)
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
    temp = target.with_name(f".{target.name}.{os.getpid()}.pgsb-tmp")  # no WAL name: the server ignores it
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
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
    fsync_path(target.parent)
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
