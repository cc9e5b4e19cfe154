"""Encryption at rest: the one on-disk format of an encrypted file this project stores (a WAL segment,
a tar archive, an object-store copy's files, a label or manifest).

AES-256-GCM in chunks (the STREAM construction, as age and Tink's streaming AEAD do it): a header, then
each chunk of plaintext sealed on its own with a nonce of a random per-file prefix and the chunk's
number, the header and a "last chunk" flag as associated data. So a reader never gives out a byte it
has not authenticated, a chunk moved, dropped or taken from another file fails, and a file cut at a
chunk boundary fails (its last chunk lacks the flag). Memory stays one chunk whatever the file's size.

Layout::

    header   MAGIC (8 bytes) | key id (8 bytes) | nonce prefix (7 bytes) | chunk size (4 bytes, big-endian)
    chunks   AES-256-GCM(key, nonce = prefix | counter (4 bytes) | last (1 byte), chunk, aad = header)
             each chunk_size plaintext bytes (+16 tag); the last one shorter (possibly empty) and flagged

The key is 32 random bytes, given as 64 hex digits or 44 characters of base64 (``openssl rand -hex 32``):
in a file (CLI ``--encryption-key-file``), an environment variable (``--encryption-key-env``), or an Airflow
connection's password (the operators). Only its id, a digest of the key that reveals nothing of it, is ever
written (into this header and the catalog); the key itself never is.

Imports nothing of the package but :mod:`pg_safe_backup.errors` (``files/`` is a leaf family), and at
module level only ``os`` and ``struct``: :mod:`files.walarchive` imports it for every ``wal-push``.
"""

from __future__ import annotations

import os
import struct

from pg_safe_backup.errors import PermanentError

TYPE_CHECKING = False
if TYPE_CHECKING:  # annotations only (typing's import costs each wal-push)
    from collections.abc import Iterator
    from pathlib import Path
    from typing import IO, Any

#: The first bytes of every encrypted file (version 1 of this format).
MAGIC = b"PGSBENC1"
#: The file-name suffix of an encrypted file (after any compression suffix: ``.zst.enc``).
SUFFIX = ".enc"
#: Plaintext bytes per chunk: 1 MiB (a 16 MiB WAL segment is 16 chunks, 256 bytes of tags).
CHUNK_SIZE = 1 << 20
_HEADER = struct.Struct(">8s8s7sI")
HEADER_SIZE = _HEADER.size
_TAG = 16
#: A chunk size a header may name (a damaged header must not make a reader allocate gigabytes).
_MAX_CHUNK = 64 << 20


class CryptError(PermanentError, ValueError):
    """An encrypted file that cannot be read with this key (wrong key, changed or cut bytes, not
    encrypted), or a key that is not one: never retried, never a partial result."""


class EncryptionKey:
    """A 256-bit key and its id (the first 16 hex digits of a domain-separated SHA-256 of the key); equal
    to another of the same bytes, immutable.

    :param material: the 32 key bytes (never printed: ``repr`` shows only the id).
    """

    __slots__ = ("material",)
    material: bytes

    def __init__(self, material: bytes) -> None:
        if len(material) != 32:
            raise CryptError(f"an encryption key is 32 bytes, got {len(material)}")
        object.__setattr__(self, "material", bytes(material))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"an EncryptionKey cannot be changed ({name})")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, EncryptionKey) and other.material == self.material

    def __hash__(self) -> int:
        return hash((EncryptionKey, self.material))

    def __repr__(self) -> str:
        return f"EncryptionKey(key_id={self.key_id!r})"

    @property
    def key_id(self) -> str:
        """The id written beside what the key encrypts: names the key, reveals nothing of it."""
        import hashlib

        return hashlib.sha256(b"pg-safe-backup key id\0" + self.material).hexdigest()[:16]

    @classmethod
    def parse(cls, text: str, source: str) -> EncryptionKey:
        """The key written as 64 hex digits or base64 of 32 bytes (surrounding white space ignored).

        :param text: the key's text.
        :param source: where it came from, for the error (``--encryption-key-file /etc/pgsb.key``); never
            the key itself.
        :raises CryptError: naming ``source`` when ``text`` is neither.
        """
        import base64
        import binascii

        text = text.strip()
        try:
            if len(text) == 64:
                return cls(bytes.fromhex(text))
            raw = base64.b64decode(text, validate=True)
        except (ValueError, binascii.Error):
            raw = b""
        if len(raw) != 32:
            raise CryptError(
                f"{source}: not an encryption key (64 hex digits or base64 of 32 bytes: openssl rand -hex 32)"
            )
        return cls(raw)

    @classmethod
    def from_file(cls, path: Path | str, flag: str = "--encryption-key-file") -> EncryptionKey:
        """Read a key file.

        :param path: the file holding the key's text.
        :param flag: the flag or parameter that named the file, for the error.
        """
        try:
            with open(path) as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as err:
            raise CryptError(f"{flag} {path}: cannot read the key: {err.__class__.__name__}") from None
        return cls.parse(text, f"{flag} {path}")

    @classmethod
    def from_env(cls, name: str, flag: str = "--encryption-key-env") -> EncryptionKey:
        """Read a key from the environment variable ``name``.

        :param name: the variable's name.
        :param flag: the flag or parameter that named it, for the error.
        """
        text = os.environ.get(name)
        if not text:
            raise CryptError(f"{flag} {name}: the environment variable is not set")
        return cls.parse(text, f"{flag} {name}")


def key_from_flags(key_file: Path | str | None, key_env: str | None) -> EncryptionKey | None:
    """The key ``--encryption-key-file`` or ``--encryption-key-env`` gives, None when neither is given: the
    command line's one reader of them (``cli.encryption_key`` and ``wal-push``'s short way both call it).

    :raises CryptError: the file or variable holds no key (named, never its content).
    """
    if key_file is not None:
        return EncryptionKey.from_file(key_file)
    if key_env is not None:
        return EncryptionKey.from_env(key_env)
    return None


def _aead(key: EncryptionKey):  # noqa: ANN202 - cryptography's class, imported only when used
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    return AESGCM(key.material)


def is_encrypted(head: bytes) -> bool:
    """Whether ``head`` (a file's first bytes, at least 8) starts an encrypted file of this format."""
    return head[: len(MAGIC)] == MAGIC


def key_id_of(head: bytes) -> str:
    """The key id in an encrypted file's header (its first :data:`HEADER_SIZE` bytes).

    :raises CryptError: ``head`` is not such a header.
    """
    if len(head) < HEADER_SIZE or not is_encrypted(head):
        raise CryptError("not an encrypted file of pg-safe-backup (no PGSBENC1 header)")
    return _HEADER.unpack(head[:HEADER_SIZE])[1].hex()


def _nonce(prefix: bytes, counter: int, last: bool) -> bytes:
    if counter >= 1 << 32:
        raise CryptError("too many chunks for one encrypted file")
    return prefix + struct.pack(">IB", counter, 1 if last else 0)


def encrypt_chunks(chunks: Iterator[bytes] | list[bytes], key: EncryptionKey) -> Iterator[bytes]:
    """The encrypted file of the plaintext ``chunks`` (any sizes), piece by piece: the header first.

    :param chunks: the plaintext in order.
    :param key: the key.
    """
    aead = _aead(key)
    prefix = os.urandom(7)
    header = _HEADER.pack(MAGIC, bytes.fromhex(key.key_id), prefix, CHUNK_SIZE)
    yield header
    counter = 0
    pending = bytearray()
    for piece in chunks:
        pending += piece
        # Keep at least one byte back: only the chunk known to be the last is sealed as last.
        while len(pending) > CHUNK_SIZE:
            yield aead.encrypt(_nonce(prefix, counter, False), bytes(pending[:CHUNK_SIZE]), header)
            del pending[:CHUNK_SIZE]
            counter += 1
    yield aead.encrypt(_nonce(prefix, counter, True), bytes(pending), header)


class EncryptingWriter:
    """A write-only file that encrypts into ``out`` as it is written (the tar writer and the object
    uploads push their bytes; :func:`encrypt_chunks` pulls them): the same format, chunk for chunk.

    :meth:`close` seals the last chunk; ``out`` is left open, to the caller.

    :param out: where the encrypted file goes, from its position.
    :param key: the key.
    """

    def __init__(self, out: IO[bytes] | Any, key: EncryptionKey) -> None:
        self._out = out
        self._aead = _aead(key)
        self._prefix = os.urandom(7)
        self._header = _HEADER.pack(MAGIC, bytes.fromhex(key.key_id), self._prefix, CHUNK_SIZE)
        self._pending = bytearray()
        self._counter = 0
        self._closed = False
        out.write(self._header)

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Encrypt ``data`` (whole chunks are written as soon as one more byte follows them).

        :param data: the plaintext.
        """
        if self._closed:
            raise ValueError("write to a closed EncryptingWriter")
        self._pending += data
        # Keep at least one byte back: only the chunk known to be the last is sealed as last.
        while len(self._pending) > CHUNK_SIZE:
            nonce = _nonce(self._prefix, self._counter, False)
            self._out.write(self._aead.encrypt(nonce, bytes(self._pending[:CHUNK_SIZE]), self._header))
            del self._pending[:CHUNK_SIZE]
            self._counter += 1
        return len(data)

    def flush(self) -> None:
        """Flush ``out`` (a chunk is sealed only when full, or by :meth:`close`)."""
        self._out.flush()

    def close(self) -> None:
        """Seal the last chunk (possibly empty) into ``out``; ``out`` stays open."""
        if not self._closed:
            self._closed = True
            nonce = _nonce(self._prefix, self._counter, True)
            self._out.write(self._aead.encrypt(nonce, bytes(self._pending), self._header))
            self._pending.clear()


def encrypt_bytes(plain: bytes, key: EncryptionKey) -> bytes:
    """The encrypted file of ``plain`` (a label, a manifest), whole.

    :param plain: the plaintext.
    :param key: the key.
    """
    return b"".join(encrypt_chunks([plain], key))


def decrypt_bytes(sealed: bytes, key: EncryptionKey, what: str) -> bytes:
    """The plaintext of the encrypted file ``sealed``, whole (see :func:`decrypt_chunks`).

    :param sealed: the encrypted file's bytes.
    :param key: the key.
    :param what: the file's name for errors.
    """
    import io

    return b"".join(decrypt_chunks(io.BytesIO(sealed), key, what))


def encrypt_stream(src: IO[bytes], dst: IO[bytes], key: EncryptionKey) -> int:
    """Encrypt all of ``src`` into ``dst``; returns the bytes written.

    :param src: read to its end.
    :param dst: written from its position.
    :param key: the key.
    """
    written = 0
    for piece in encrypt_chunks(iter(lambda: src.read(CHUNK_SIZE), b""), key):
        dst.write(piece)
        written += len(piece)
    return written


def _read(src: IO[bytes], size: int) -> bytes:
    """``size`` bytes of ``src``, fewer only at its end (a raw or remote stream may return less)."""
    data = src.read(size)
    while data and len(data) < size:
        more = src.read(size - len(data))
        if not more:
            break
        data += more
    return data


def decrypt_chunks(src: IO[bytes], key: EncryptionKey, what: str) -> Iterator[bytes]:
    """The plaintext of the encrypted file ``src``, one authenticated chunk at a time.

    :param src: read from its start (the header) to its end.
    :param key: the key it was encrypted with.
    :param what: the file's name for errors (``archive/000000010000000000000003.zst.enc``).
    :raises CryptError: not encrypted, another key (both ids named), changed or cut: raised before the
        first byte of a chunk that does not authenticate is given out.
    """
    from cryptography.exceptions import InvalidTag

    header = _read(src, HEADER_SIZE)
    if len(header) < HEADER_SIZE or not is_encrypted(header):
        raise CryptError(f"{what}: not an encrypted file of pg-safe-backup (no PGSBENC1 header)")
    _, raw_id, prefix, chunk_size = _HEADER.unpack(header)
    if raw_id.hex() != key.key_id:
        raise CryptError(f"{what}: encrypted with key {raw_id.hex()}, not with the key given ({key.key_id})")
    if not 0 < chunk_size <= _MAX_CHUNK:
        raise CryptError(f"{what}: damaged header (chunk size {chunk_size})")
    aead = _aead(key)
    sealed = chunk_size + _TAG
    counter = 0
    block = _read(src, sealed)
    while True:
        following = _read(src, sealed) if len(block) == sealed else b""
        last = not following
        try:
            plain = aead.decrypt(_nonce(prefix, counter, last), block, header)
        except InvalidTag:
            raise CryptError(
                f"{what}: chunk {counter} does not authenticate (the file was changed or cut short)"
            ) from None
        yield plain
        if last:
            return
        block = following
        counter += 1


def decrypt_stream(src: IO[bytes], dst: IO[bytes], key: EncryptionKey, what: str) -> int:
    """Decrypt all of ``src`` into ``dst``; returns the plaintext bytes written.

    A caller writing to a file must write to a temporary name and rename only after this returns: on an
    error the chunks before the bad one were written.

    :param src: the encrypted file from its start.
    :param dst: where the plaintext goes.
    :param key: the key.
    :param what: the file's name for errors.
    """
    written = 0
    for plain in decrypt_chunks(src, key, what):
        dst.write(plain)
        written += len(plain)
    return written
