"""files/crypt.py: the encrypted file format. Round trips of every size around a chunk, and each way a
file can be wrong (another key, a changed byte anywhere, cut at a chunk boundary, a chunk appended, not
encrypted at all) is a one-line CryptError before any byte of the bad chunk is given out."""

from __future__ import annotations

import base64
import io
import os

import pytest

from pg_safe_backup.files.crypt import (
    CHUNK_SIZE,
    HEADER_SIZE,
    CryptError,
    EncryptingWriter,
    EncryptionKey,
    decrypt_bytes,
    decrypt_chunks,
    decrypt_stream,
    encrypt_stream,
    key_id_of,
)

KEY = EncryptionKey(bytes(range(32)))
OTHER = EncryptionKey(bytes(range(1, 33)))


def seal(plain: bytes, key: EncryptionKey = KEY) -> bytes:
    out = io.BytesIO()
    encrypt_stream(io.BytesIO(plain), out, key)
    return out.getvalue()


def open_(sealed: bytes, key: EncryptionKey = KEY) -> bytes:
    out = io.BytesIO()
    decrypt_stream(io.BytesIO(sealed), out, key, "seg")
    return out.getvalue()


@pytest.mark.parametrize("size", [0, 1, CHUNK_SIZE - 1, CHUNK_SIZE, CHUNK_SIZE + 1, 3 * CHUNK_SIZE + 5])
def test_round_trip_of_every_size_around_a_chunk(size):
    plain = os.urandom(size)
    sealed = seal(plain)
    chunks = max(1, -(-size // CHUNK_SIZE))
    assert len(sealed) == HEADER_SIZE + size + 16 * chunks
    assert key_id_of(sealed) == KEY.key_id
    assert open_(sealed) == plain


@pytest.mark.parametrize(
    "writes",
    [[], [0], [CHUNK_SIZE], [CHUNK_SIZE - 1, 1], [3, CHUNK_SIZE, CHUNK_SIZE + 7, 1, 0, 2 * CHUNK_SIZE]],
)
def test_the_writer_a_tar_or_upload_pushes_into_writes_the_same_format(writes):
    plain = os.urandom(sum(writes))
    out = io.BytesIO()
    writer = EncryptingWriter(out, KEY)
    at = 0
    for size in writes:
        writer.write(plain[at : at + size])
        at += size
    writer.flush()  # a flush seals nothing: only close ends the file
    writer.close()
    sealed = out.getvalue()
    assert len(sealed) == len(seal(plain))
    assert decrypt_bytes(sealed, KEY, "seg") == plain
    with pytest.raises(CryptError, match="changed or cut short"):
        decrypt_bytes(sealed[:-1], KEY, "seg")


def test_two_encryptions_of_the_same_bytes_differ():
    assert seal(b"x" * 100) != seal(b"x" * 100)


def test_another_key_is_refused_naming_both_ids():
    with pytest.raises(
        CryptError, match=f"seg: encrypted with key {KEY.key_id}, not with the key given \\({OTHER.key_id}\\)"
    ):
        open_(seal(b"wal"), OTHER)


@pytest.mark.parametrize("where", [0, 9, HEADER_SIZE - 1, HEADER_SIZE, HEADER_SIZE + CHUNK_SIZE + 3, -1])
def test_a_flipped_byte_anywhere_fails_in_one_line(where):
    sealed = bytearray(seal(os.urandom(2 * CHUNK_SIZE + 10)))
    sealed[where] ^= 0x01
    with pytest.raises(CryptError) as caught:
        open_(bytes(sealed))
    assert "\n" not in str(caught.value) and str(caught.value).startswith("seg: ")


def test_no_byte_of_a_chunk_that_fails_is_given_out():
    plain = os.urandom(2 * CHUNK_SIZE + 10)
    sealed = bytearray(seal(plain))
    sealed[HEADER_SIZE + CHUNK_SIZE + 16 + 5] ^= 0x01  # inside the second chunk
    given = []
    with pytest.raises(CryptError, match="chunk 1 does not authenticate"):
        for piece in decrypt_chunks(io.BytesIO(bytes(sealed)), KEY, "seg"):
            given.append(piece)
    assert b"".join(given) == plain[:CHUNK_SIZE]


def test_a_file_cut_at_a_chunk_boundary_or_with_a_chunk_appended_fails():
    sealed = seal(os.urandom(2 * CHUNK_SIZE + 10))
    one_chunk = CHUNK_SIZE + 16
    with pytest.raises(CryptError, match="changed or cut short"):
        open_(sealed[: HEADER_SIZE + one_chunk])
    with pytest.raises(CryptError, match="changed or cut short"):
        open_(sealed[:HEADER_SIZE])
    with pytest.raises(CryptError, match="changed or cut short"):
        open_(sealed + sealed[HEADER_SIZE : HEADER_SIZE + one_chunk])


def test_a_plain_file_is_not_taken_for_an_encrypted_one():
    with pytest.raises(CryptError, match="seg: not an encrypted file of pg-safe-backup"):
        open_(b"\x00" * 100)


def test_keys_from_hex_base64_file_and_environment_and_bad_ones_named(tmp_path, monkeypatch):
    hexkey = bytes(range(32)).hex()
    assert EncryptionKey.parse(hexkey + "\n", "x") == KEY
    assert EncryptionKey.parse(base64.b64encode(bytes(range(32))).decode(), "x") == KEY
    path = tmp_path / "k"
    path.write_text(hexkey)
    assert EncryptionKey.from_file(path) == KEY
    monkeypatch.setenv("PGSB_TEST_KEY", hexkey)
    assert EncryptionKey.from_env("PGSB_TEST_KEY") == KEY
    path.write_text("hunter2")
    with pytest.raises(CryptError, match=f"^--encryption-key-file {path}: not an encryption key") as caught:
        EncryptionKey.from_file(path)
    assert "hunter2" not in str(caught.value)
    with pytest.raises(CryptError, match="^--encryption-key-file /nonexistent/k: cannot read the key"):
        EncryptionKey.from_file("/nonexistent/k")
    with pytest.raises(
        CryptError, match="^--encryption-key-env PGSB_UNSET_KEY: the environment variable is not set"
    ):
        EncryptionKey.from_env("PGSB_UNSET_KEY")
    assert repr(KEY) == f"EncryptionKey(key_id={KEY.key_id!r})"  # the id, never the key
