"""A WAL archive managed by ``pg-safe-backup wal-push``: its names and its identity file.

The archive is a flat folder (a local one, or a prefix in an object store), as ``cp %p ARCHIVE/%f``
leaves it, so an archive written by ``cp`` and one written by ``wal-push`` read the same:

- every file PostgreSQL archives (a segment, ``.partial``, ``.history``, ``.backup``) is stored under its
  own name, then the compression's suffix (:data:`COMPRESSIONS`), then :data:`crypt.SUFFIX` when
  encrypted: ``000000010000000000000003.zst.enc``; one stored file per name;
- :data:`IDENTITY_FILE` at the top, written once by the first push, names the cluster whose WAL this is
  (system identifier, major, segment size): a push from another cluster is refused.

A stored file is the plaintext compressed (:func:`compress_chunks`), then encrypted (:mod:`crypt`);
:func:`encode` and :func:`decode` run the two in order, streaming, one chunk in memory at a time.

Imports nothing of the package outside ``files/`` (a leaf family).
"""

from __future__ import annotations

from collections import namedtuple

from pg_safe_backup.errors import PermanentError
from pg_safe_backup.files.crypt import CHUNK_SIZE, EncryptionKey, decrypt_chunks, encrypt_chunks
from pg_safe_backup.files.crypt import SUFFIX as ENCRYPTED_SUFFIX

TYPE_CHECKING = False
if TYPE_CHECKING:  # annotations only: wal-push imports this module, and typing's import costs
    from collections.abc import Iterable, Iterator
    from typing import IO, Any

#: The archive's identity, at its top.
IDENTITY_FILE = "pg_safe_backup_archive.info"
#: The identity file's format.
IDENTITY_FORMAT = 1
#: Compression name -> file-name suffix ("none": stored as PostgreSQL wrote it).
COMPRESSIONS = {"none": "", "gzip": ".gz", "lz4": ".lz4", "zstd": ".zst"}
_BY_SUFFIX = {suffix: name for name, suffix in COMPRESSIONS.items() if suffix}
_HEX = frozenset("0123456789ABCDEF")


def is_archived_name(name: str) -> bool:
    """Whether ``name`` is one PostgreSQL archives: a segment (maybe ``.partial``), a timeline history
    (``%08X.history``), a backup history file (``<segment>.%08X.backup``). Written out without ``re``,
    whose import (with ``enum``) would weigh on every ``wal-push``.
    """
    stem, dot, suffix = name.partition(".")
    if not stem or not _HEX.issuperset(stem):
        return False
    if len(stem) == 24:
        if suffix in ("", "partial") and (suffix or not dot):
            return True
        offset, dot2, backup = suffix.partition(".")
        return len(offset) == 8 and _HEX.issuperset(offset) and dot2 == "." and backup == "backup"
    return len(stem) == 8 and suffix == "history"


#: Levels chosen for an archive_command's speed (a 16 MiB segment well under 0.1 s on one core): zstd's and
#: gzip's own fast ends, lz4's default; WAL's zero-filled tails compress well at any level.
LEVELS = {"gzip": 1, "lz4": 0, "zstd": 1}
#: Compression name -> (the module it needs, the package's extra that installs it).
CODEC_PACKAGES = {"lz4": ("lz4", "lz4"), "zstd": ("zstandard", "zstd")}


class ArchiveFormatError(PermanentError, ValueError):
    """An archive's identity file or a stored name that this module cannot read."""


class MissingCodec(PermanentError, RuntimeError):
    """A compression whose library is not installed (the message names the extra that installs it)."""


class DamagedFile(PermanentError, ValueError):
    """A stored file that does not decode: not of its compression, changed or cut short."""


class StoredName(namedtuple("StoredName", ("name", "compression", "encrypted"), defaults=("none", False))):
    """What a stored file's name says.

    :param name: the name PostgreSQL gave the file (``%f``).
    :param compression: a key of :data:`COMPRESSIONS`.
    :param encrypted: whether the stored bytes are in :mod:`pg_safe_backup.files.crypt`'s format.
    """

    __slots__ = ()

    @property
    def stored(self) -> str:
        """The stored file's name."""
        return self.name + COMPRESSIONS[self.compression] + (ENCRYPTED_SUFFIX if self.encrypted else "")


def parse_stored_name(stored: str) -> StoredName | None:
    """What ``stored`` (a file name in the archive) holds, or None when it is not an archived file (the
    identity file, a temporary file of a push in progress, anything else).

    :param stored: a file name, without its folder.
    """
    name, encrypted = stored, False
    if name.endswith(ENCRYPTED_SUFFIX):
        name, encrypted = name[: -len(ENCRYPTED_SUFFIX)], True
    compression = "none"
    for suffix, codec in _BY_SUFFIX.items():
        if name.endswith(suffix):
            name, compression = name[: -len(suffix)], codec
            break
    if not is_archived_name(name):
        return None
    return StoredName(name, compression, encrypted)


class ArchiveIdentity(namedtuple("ArchiveIdentity", ("system_identifier", "major", "wal_segment_size"))):
    """The cluster an archive belongs to.

    :param system_identifier: pg_control's (and every segment's long page header's) system identifier.
    :param major: the PostgreSQL major that wrote the WAL.
    :param wal_segment_size: bytes per segment.
    """

    __slots__ = ()

    def to_bytes(self) -> bytes:
        """The identity file's bytes: ``key = value`` lines under a comment, as pgBackRest's archive.info is
        plain text (read without JSON, whose import with ``re``'s would cost each push more than the rest)."""
        body = {
            "format": IDENTITY_FORMAT,
            "system_identifier": self.system_identifier,
            "major": self.major,
            "wal_segment_size": self.wal_segment_size,
        }
        lines = [f"{key} = {value}\n" for key, value in body.items()]
        return ("# pg-safe-backup WAL archive: the WAL of this cluster only\n" + "".join(lines)).encode()

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> ArchiveIdentity:
        """Read an identity file.

        :param data: its bytes.
        :param where: its path or URL, for the error.
        :raises ArchiveFormatError: not an identity file of a format this version reads.
        """
        body: dict[str, str] = {}
        try:
            for line in data.decode().splitlines():
                if line.strip() and not line.lstrip().startswith("#"):
                    key, equals, value = line.partition("=")
                    if not equals:
                        raise ValueError(f"a line without '=': {line.strip()[:40]!r}")
                    body[key.strip()] = value.strip()
            if body.get("format") != str(IDENTITY_FORMAT):
                raise ArchiveFormatError(
                    f"{where}: archive identity format {body.get('format')!r}; this version reads"
                    f" {IDENTITY_FORMAT}"
                )
            return cls(int(body["system_identifier"]), int(body["major"]), int(body["wal_segment_size"]))
        except (ValueError, KeyError, UnicodeDecodeError) as err:
            if isinstance(err, ArchiveFormatError):
                raise
            raise ArchiveFormatError(
                f"{where}: not an archive identity file ({err.__class__.__name__}: {err})"
            ) from None


def candidates(name: str) -> list[StoredName]:
    """Every name a file PostgreSQL calls ``name`` may be stored under, plain first.

    :param name: the name PostgreSQL gave the file (``%f``).
    """
    return [StoredName(name, codec, enc) for enc in (False, True) for codec in COMPRESSIONS]


def codec_module(compression: str) -> Any:
    """The library of ``compression`` (None for none and gzip: zlib is in the standard library).

    :param compression: a key of :data:`COMPRESSIONS`.
    :raises ArchiveFormatError: not a compression this version knows.
    :raises MissingCodec: its library is not installed, naming the extra.
    """
    if compression not in COMPRESSIONS:
        raise ArchiveFormatError(f"compression {compression!r}: this version knows {', '.join(COMPRESSIONS)}")
    if compression not in CODEC_PACKAGES:
        return None
    module, extra = CODEC_PACKAGES[compression]
    try:
        if compression == "lz4":
            import lz4.frame

            return lz4.frame
        import zstandard

        return zstandard
    except ImportError:
        raise MissingCodec(
            f"{compression} compression needs the {module} package: pip install"
            f" 'airflow-provider-pg-safe-backup[{extra}]'"
        ) from None


def compress_chunks(chunks: Iterable[bytes], compression: str) -> Iterator[bytes]:
    """The compressed form of the plaintext ``chunks``, piece by piece (one stream, with its checksum:
    gzip's CRC-32, the zstd and lz4 frames' content checksums, so a changed byte fails on reading).

    :param chunks: the plaintext in order.
    :param compression: a key of :data:`COMPRESSIONS` ("none": the chunks as they are).
    """
    module = codec_module(compression)
    if compression == "none":
        yield from chunks
        return
    import zlib

    if compression == "gzip":
        packer = zlib.compressobj(LEVELS["gzip"], zlib.DEFLATED, 31)  # wbits 16+15: a gzip member
        begin, flush = b"", packer.flush
    elif compression == "lz4":
        packer = module.LZ4FrameCompressor(compression_level=LEVELS["lz4"], content_checksum=True)
        begin, flush = packer.begin(), packer.flush
    else:
        packer = module.ZstdCompressor(level=LEVELS["zstd"], write_checksum=True).compressobj()
        begin, flush = b"", packer.flush
    if begin:
        yield begin
    for chunk in chunks:
        if out := packer.compress(chunk):
            yield out
    yield flush()


def decompress_chunks(chunks: Iterable[bytes], compression: str, what: str) -> Iterator[bytes]:
    """The plaintext of the compressed ``chunks``; checked whole: a stream cut short, followed by other
    bytes or failing its checksum raises (after the plaintext before the damage was given out: write it to a
    temporary name).

    :param chunks: the stored form in order.
    :param compression: a key of :data:`COMPRESSIONS`.
    :param what: the stored file's name, for errors.
    :raises DamagedFile: naming ``what``.
    """
    module = codec_module(compression)
    if compression == "none":
        yield from chunks
        return
    import zlib

    if compression == "gzip":
        unpacker, errors = zlib.decompressobj(31), (zlib.error,)
    elif compression == "lz4":
        unpacker, errors = module.LZ4FrameDecompressor(), (RuntimeError, ValueError)
    else:
        unpacker, errors = module.ZstdDecompressor().decompressobj(), (module.ZstdError,)
    try:
        for chunk in chunks:
            if unpacker.eof:
                raise DamagedFile(f"{what}: bytes after the end of its {compression} stream")
            if out := unpacker.decompress(chunk):
                yield out
    except errors as err:
        raise DamagedFile(f"{what}: not valid {compression} data ({' '.join(str(err).split())})") from None
    if not unpacker.eof:
        raise DamagedFile(f"{what}: its {compression} stream is cut short")
    if unpacker.unused_data:
        raise DamagedFile(f"{what}: bytes after the end of its {compression} stream")


def encode(chunks: Iterable[bytes], compression: str, key: EncryptionKey | None) -> Iterator[bytes]:
    """The stored form of the plaintext ``chunks``: compressed, then encrypted when ``key`` is given.

    :param chunks: the plaintext in order.
    :param compression: a key of :data:`COMPRESSIONS`.
    :param key: the encryption key, or None.
    """
    packed = compress_chunks(chunks, compression)
    return encrypt_chunks(packed, key) if key is not None else packed


def decode(src: IO[bytes], stored: StoredName, key: EncryptionKey | None, what: str) -> Iterator[bytes]:
    """The plaintext of a stored file: decrypted, then decompressed, as its name says.

    :param src: the stored file from its start.
    :param stored: what its name says.
    :param key: the key (needed when it is encrypted).
    :param what: its name or URL, for errors.
    :raises CryptError, DamagedFile, MissingCodec: naming ``what``.
    """
    if stored.encrypted:
        if key is None:
            raise ArchiveFormatError(f"{what} is encrypted: give its key to read it")
        pieces: Iterator[bytes] = decrypt_chunks(src, key, what)
    else:
        pieces = iter(lambda: src.read(CHUNK_SIZE), b"")
    return decompress_chunks(pieces, stored.compression, what)
