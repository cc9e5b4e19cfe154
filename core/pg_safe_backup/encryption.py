"""A stored backup encrypted at rest: whether it is, with which key, and its files read back.

What is encrypted (:mod:`pg_safe_backup.files.crypt`'s format, each file on its own, named with ``.enc``
after any compression suffix): every file of a tar or object-store copy (``base.tar.zst.enc``,
``<oid>.tar.enc``, ``base/5/1259.enc``, ``global/pg_control.enc``, the captured configuration files), and the
store's ``backup_label.enc``, ``tablespace_map.enc`` and ``backup_manifest.enc``. Left as they are: an object
copy's ``backup_folders.json`` (the names of empty folders) and the catalog entry beside the backup (its
label, LSNs and times, and ``encryption_key_id``, so that a listing shows the backup without the key). A
plain copy in a local folder is never encrypted (the operators refuse a key for it).

Where the key id is: in every encrypted file's header (the authority: a reader names it before it reads a
byte) and, as a cache, in the catalog entry's ``encryption_key_id``. The manifest's checksums are of the
plaintext, so ``pg_verifybackup`` checks a decrypted copy, and its Manifest-Checksum names the backup
whether it is read encrypted or not.

Works on a local ``Path`` and an ``ObjectStoragePath`` alike; nothing of Airflow is imported.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from pg_safe_backup.files.crypt import (
    HEADER_SIZE,
    SUFFIX,
    CryptError,
    EncryptionKey,
    decrypt_bytes,
    decrypt_stream,
    key_id_of,
)

#: How the command line gives a key; the operators name their ``encryption_conn_id`` instead.
KEY_FLAGS = "--encryption-key-file FILE or --encryption-key-env NAME"
#: The top-level files whose header names the key of an encrypted backup, looked at in this order.
_MARKS = ("backup_label", "backup_manifest", "PG_VERSION", "base.tar", "base.tar.gz", "base.tar.zst")


class KeyNeeded(CryptError):
    """The backup is encrypted and no key, or another key, was given: nothing of it can be read or proven
    (a check that could not run, never a verdict)."""


def sealed(name: str) -> str:
    """The stored name of the file ``name`` of an encrypted backup.

    :param name: the plaintext file's name (``backup_label``, ``base.tar.zst``).
    """
    return name + SUFFIX


def backup_key_id(folder: Any) -> str | None:
    """The id of the key the backup in ``folder`` is encrypted with (an encrypted top-level file's header),
    or None when it is not encrypted.

    :param folder: the backup's top folder: a ``Path`` or an ``ObjectStoragePath``.
    :raises CryptError: such a file has no header of the format (damaged).
    """
    for name in _MARKS:
        place = folder / sealed(name)
        if place.exists():
            with place.open("rb") as f:
                return key_id_of(f.read(HEADER_SIZE))
    return None


def check_key(folder: Any, key: EncryptionKey | None, how: str = KEY_FLAGS) -> str | None:
    """The backup's key id, once ``key`` is known to be its key; None for a backup not encrypted.

    :param folder: the backup's top folder.
    :param key: the key given (None: none).
    :param how: how the caller's user gives a key, for the error.
    :raises KeyNeeded: encrypted, and no key or another one given (both ids named, never a key).
    """
    key_id = backup_key_id(folder)
    if key_id is None:
        return None
    if key is None:
        raise KeyNeeded(f"{folder} is encrypted with key {key_id}: give that key with {how}")
    if key.key_id != key_id:
        raise KeyNeeded(
            f"{folder} is encrypted with key {key_id}, not with the key given ({key.key_id}; {how})"
        )
    return key_id


def read_file(folder: Any, name: str, key: EncryptionKey | None, how: str = KEY_FLAGS) -> bytes | None:
    """The bytes of the backup's file ``name``, decrypted when it is stored encrypted; None when it is
    neither.

    :param folder: the backup's top folder.
    :param name: the plaintext file's path in it (``backup_label``).
    :param key: the key (None: an encrypted file raises).
    :param how: how the caller's user gives a key, for the error.
    :raises KeyNeeded: it is encrypted and no key, or another key, was given.
    :raises CryptError: it was changed or cut (named).
    """
    place = folder / name
    if place.exists():
        return place.read_bytes()
    place = folder / sealed(name)
    if not place.exists():
        return None
    raw = place.read_bytes()
    if key is None:
        raise KeyNeeded(f"{place} is encrypted with key {key_id_of(raw)}: give that key with {how}")
    return decrypt_bytes(raw, key, str(place))


def decrypt_backup(backup: Path, into: Path, key: EncryptionKey) -> list[str]:
    """The encrypted backup in the local folder ``backup`` decrypted into ``into`` (made, or empty): each
    ``X.enc`` to ``X`` (through ``X.enc`` under ``into``, renamed once whole), every other file copied as it
    is; the original is not changed. A file that does not authenticate stops it: ``into`` then holds only
    files that did, and the caller removes it.

    :param backup: the backup as stored (or downloaded).
    :param into: where its plaintext goes.
    :param key: its key (:func:`check_key` first names a wrong one before anything is read).
    :returns: the paths decrypted, relative to ``into``.
    :raises CryptError: a file was changed or cut (named, with its chunk).
    """
    done = []
    for top, folders, names in os.walk(backup):
        rel = Path(top).relative_to(backup)
        (into / rel).mkdir(parents=True, exist_ok=True)
        for name in folders:
            (into / rel / name).mkdir(exist_ok=True)
        for name in names:
            source = Path(top) / name
            if not name.endswith(SUFFIX):
                shutil.copy2(source, into / rel / name)
                continue
            partial, target = into / rel / name, into / rel / name[: -len(SUFFIX)]
            with open(source, "rb") as src, open(partial, "wb") as dst:
                decrypt_stream(src, dst, key, str(source))
            shutil.copystat(source, partial)
            os.replace(partial, target)
            done.append(str(rel / name[: -len(SUFFIX)]))
    return done


__all__ = ["KEY_FLAGS", "KeyNeeded", "backup_key_id", "check_key", "decrypt_backup", "read_file", "sealed"]
