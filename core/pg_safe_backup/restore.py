"""One way to turn a stored backup into a data directory that recovers: ``pg-safe-backup restore`` and the
restore check (:mod:`pg_safe_backup.restore_check`) both use it.

:func:`prepare_restore` never changes the backup or the WAL archive (read only, through
``restore_command``):

1. The backup is copied into TARGET (new or empty), following links. ``pg_wal`` is not copied (an empty
   ``pg_wal/archive_status`` is made: the WAL comes from the archive), nor are ``postmaster.pid`` /
   ``postmaster.opts``, ``standby.signal``, ``recovery.signal``, ``recovery.conf``, ``backup_manifest``
   or ``backup_info.json`` (they describe the backup, not the restored cluster). A tar-format backup
   (``base.tar[.gz|.zst]`` and ``<OID>.tar[...]``, files/tarball.py) is extracted instead, its
   ``backup_label`` and ``tablespace_map``, stored beside the archives, copied in.
2. Tablespaces. Each ``OID PATH`` line of the backup's ``tablespace_map`` names a tablespace; its backup
   is found as :mod:`pg_safe_backup.files.tablespaces` says and copied to ``tablespaces[OID]`` (a remap),
   else under ``tablespace_root`` when given, else back to PATH, its original location, as pgBackRest
   does. A location that is not empty is refused: it may be the live tablespace. ``tablespace_map`` is
   rewritten to name the new locations, because PostgreSQL, when recovery starts from backup_label,
   recreates the ``pg_tblspc/<OID>`` links from it (read_tablespace_map in xlogrecovery.c); the links are
   made now too, so the folder looks right before the server starts.
3. ``recovery.signal`` is written, and settings are APPENDED to ``postgresql.auto.conf`` (read last, the
   user's lines stay): ``restore_command`` (default: ``pg-safe-backup wal-fetch`` from an archive that
   ``wal-push`` manages, which decompresses and decrypts; ``cp`` from any other), the recovery target (every
   other target cleared: two set at once is an error), ``recovery_target_timeline`` and
   ``recovery_target_action``; and archiving off (``archive_mode = off``, ``archive_command = ''``) unless
   asked for (``archive_mode='on'``, a real replacement): a test restore that promotes must never write its
   new timeline into the backed up cluster's archive, where a later restore to the end of the archive
   (``recovery_target_timeline = latest``) would follow it and stop short. ``data_directory`` is pinned in
   ``postgresql.conf``: one copied from the backed up server would start the server on its LIVE data
   directory. The server's configuration files the backup captured from outside its data directory (a
   Debian cluster's /etc/postgresql/...: :mod:`pg_safe_backup.files.extconfig`) are put in TARGET first,
   ``hba_file``, ``ident_file`` and ``external_pid_file`` pinned to TARGET's.
4. TARGET and the tablespace locations are given to ``owner`` (as root; the server's OS user by default),
   mode 0700.

Before anything is copied it refuses, naming the flag: a WAL archive of another cluster (its oldest
segment's system identifier, and a managed archive's identity file, against the backup's pg_control or
version 2 manifest; a tar backup without either is checked once base.tar is extracted), an encrypted
archive without its key (``--encryption-key-file`` / ``--encryption-key-env``) or with a key file the
owner cannot read, a target or tablespace location the owner cannot reach or that cannot be written, and
a file system without room for the backup's bytes.

Without a WAL archive only a self-contained backup (its WAL in its own ``pg_wal/``) restores: crash
recovery from backup_label, no ``recovery.signal``.

A backup without ``backup_label`` is refused: recovery would start from the checkpoint in pg_control
instead of the backup's, and can silently lose committed rows.

An encrypted backup (:mod:`pg_safe_backup.encryption`) is refused without its key, or with another one,
naming the key id, before anything is written; with it, it is first decrypted whole into a temporary
folder beside TARGET (a changed or cut byte stops the restore there: TARGET is never made), restored from
there as above, and the temporary folder removed.

CLI: ``pg-safe-backup restore BACKUP TARGET_DIR --wal-archive DIR ...`` (:mod:`pg_safe_backup.cli`).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from pg_safe_backup.catalog import (
    INFO_NAME,
    INFO_TMP,
    CatalogError,
)
from pg_safe_backup.catalog import read_info as read_backup_info
from pg_safe_backup.encryption import KEY_FLAGS, check_key, decrypt_backup
from pg_safe_backup.errors import PermanentError
from pg_safe_backup.files.copier import (
    CHUNK,
    CopyError,
    Progress,
    copy_data_directory,
    copy_tree,
    sync_paths,
    sync_tree,
)
from pg_safe_backup.files.crypt import SUFFIX, CryptError, EncryptionKey
from pg_safe_backup.files.extconfig import RestoredConfig, restore_config
from pg_safe_backup.files.label import LABEL_FILES
from pg_safe_backup.files.layout import walk
from pg_safe_backup.files.manifest import MANIFEST_NAME
from pg_safe_backup.files.objects import (
    FOLDERS_NAME,
    StoredFile,
    StoredReader,
    download_tree,
    fetch_file,
    list_stored,
    plaintext_name,
)
from pg_safe_backup.files.pgcontrol import BadPgControl, read_pg_control
from pg_safe_backup.files.tablespaces import (
    TablespaceNotCopied,
    escape_map_path,
    find_tablespace_copy,
    parse_tablespace_map,
)
from pg_safe_backup.files.wal import (
    KeyNeeded,
    NotWal,
    archive_identity,
    archive_system_identifier,
    header_system_identifier,
    is_managed_archive,
)
from pg_safe_backup.files.walarchive import (
    IDENTITY_FILE,
    ArchiveFormatError,
    DamagedFile,
    MissingCodec,
    StoredName,
    decode,
    parse_stored_name,
)
from pg_safe_backup.files.walheader import fsync_path
from pg_safe_backup.files.xlog import incremental_from, parse_backup_label, parse_lsn, start_wal_location
from pg_safe_backup.incremental import (
    IncrementalFailed,
    IncrementalRefused,
    Link,
    chain_of,
    client_program,
    combine,
)
from pg_safe_backup.local_cluster import SERVER_USER, command_for_server, find_bindir
from pg_safe_backup.proof import prove_backup
from pg_safe_backup.snapshots import KeptSnapshot, SnapshotError, read_tree
from pg_safe_backup.storage import in_store, place_of

# Never copied into the data directory: the server recreates them, must not see them, or they describe
# the backup rather than the restored cluster.
SKIP_TOP = {
    "postmaster.pid",
    "postmaster.opts",
    "pg_wal",
    "pg_xlog",
    "pg_tblspc",
    "standby.signal",
    "recovery.signal",
    "recovery.conf",
    "recovery.done",
    "backup_manifest",
    INFO_NAME,
    INFO_TMP,
}
#: PostgreSQL's recovery_target_action values; 'pause' is its default.
TARGET_ACTIONS = ("pause", "promote", "shutdown")
#: recovery_target_timeline's words; otherwise a timeline number.
TIMELINE_WORDS = ("current", "latest")
#: Whether the restored server archives WAL: 'off' (a test restore) or 'on' (a real replacement).
ARCHIVE_MODES = ("off", "on")
#: Bytes of a backup_manifest's start that hold its version and System-Identifier.
MANIFEST_HEAD = 256
#: The archives of a tar-format backup: none, gzip, zstd (files/tarball.py writes them).
TAR_SUFFIXES = ("", ".gz", ".zst")
#: Seconds between two progress reports of the copy.
PROGRESS_EVERY = 3.0


class RestoreError(PermanentError, ValueError):
    """The backup cannot be restored as asked; the message names the parameter (or flag) at fault."""


class ArchiveNotUsable(RestoreError):
    """The WAL archive cannot serve this backup: not a folder, closed to the server's OS user, or another
    cluster's. Nothing of the backup can be restored or checked with it."""


@dataclass(frozen=True)
class ArchiveKey:
    """An encrypted WAL archive's key, and how ``pg-safe-backup wal-fetch``, run by the restored server as
    its restore_command, reads it again: the same flag and value it was given with (the key itself never
    goes into postgresql.auto.conf).

    :param key: the key.
    :param flag: ``--encryption-key-file`` or ``--encryption-key-env``.
    :param value: the key file's absolute path, or the environment variable's name.
    """

    key: EncryptionKey
    flag: str
    value: str

    @classmethod
    def from_file(cls, path: Path | str) -> ArchiveKey:
        """The key in file ``path`` (``--encryption-key-file``).

        :raises CryptError: it cannot be read or holds no key (named).
        """
        path = Path(path).absolute()
        return cls(EncryptionKey.from_file(path), "--encryption-key-file", str(path))

    @classmethod
    def from_env(cls, name: str) -> ArchiveKey:
        """The key in environment variable ``name`` (``--encryption-key-env``).

        :raises CryptError: it is not set or holds no key (named).
        """
        return cls(EncryptionKey.from_env(name), "--encryption-key-env", name)


@dataclass
class RestoreResult:
    """What :func:`prepare_restore` did."""

    target: Path
    files: int = 0
    bytes: int = 0
    seconds: float = 0.0
    #: OID -> {"original", "backup", "restored_to"}.
    tablespaces: dict[str, dict[str, str]] = field(default_factory=dict)
    #: The lines appended to postgresql.auto.conf.
    settings: dict[str, str] = field(default_factory=dict)
    #: Top-level files of the backup left out (pid files, signal files, the manifest ...).
    not_copied: list[str] = field(default_factory=list)
    #: The backup's own pg_wal/ files used (only with ``use_backup_pg_wal``).
    used_backup_pg_wal: list[str] = field(default_factory=list)
    backup_label: str | None = None
    owner: str | None = None
    archive_recovery: bool = True
    #: 'off': the restored server does not archive; 'on': it archives as the backed up server did.
    archive_mode: str = "off"
    #: The server's configuration files the backup captured from outside its data directory, put back.
    config: RestoredConfig | None = None
    #: A delta restore (``--delta``): files found the same and left, and paths removed.
    delta: bool = False
    kept: int = 0
    removed: int = 0


# ------------------------------------------------------------------------------------------ checks
def backup_major(backup: Path) -> int | None:
    """The PostgreSQL major of a copy (its PG_VERSION), None when unreadable."""
    try:
        return int((backup / "PG_VERSION").read_text().strip().split(".")[0])
    except (OSError, ValueError):
        return None


def check_backup_dir(
    backup: Path,
    archive: Path | str | None,
    *,
    require_backup_label: bool = True,
    reader: str | None = SERVER_USER,
    archive_flag: str = "--wal-archive",
    key: EncryptionKey | None = None,
) -> str | None:
    """Refuse what cannot be restored: not a data directory, no WAL to recover from, no backup_label.

    :param backup: the copy.
    :param archive: the WAL archive (None: the backup must hold its own WAL in pg_wal/).
    :param require_backup_label: refuse a copy without backup_label (False: e.g. a copy of a stopped server).
    :param reader: the OS user the server runs as, who must read the archive (checked as root only).
    :param archive_flag: how the caller's user names the archive, for the messages.
    :param key: the archive's encryption key, when ``wal-push`` encrypts it.
    :returns: the backup_label's text, or None when there is none (and none is required).
    :raises ArchiveNotUsable: the archive is not a folder, closed to ``reader``, another cluster's, or
        encrypted and ``key`` does not read it.
    :raises RestoreError: the reason, naming the file or folder.
    """
    tar = bool(tar_archives(backup))
    if not tar and not ((backup / "PG_VERSION").is_file() and (backup / "global" / "pg_control").is_file()):
        raise RestoreError(
            f"{backup} is not a copy of a PostgreSQL data directory (no PG_VERSION or global/pg_control)"
            " nor a tar backup (no base.tar)"
        )
    if archive is None and tar:
        raise RestoreError(f"{backup} is a tar backup: it restores with a WAL archive (--wal-archive)")
    if archive is None:
        if not any((backup / "pg_wal").glob("[0-9A-F]" * 24)):
            raise RestoreError(
                f"no WAL archive given and {backup}/pg_wal holds no WAL: only a self-contained backup"
                " (include_wal) restores without an archive"
            )
    else:
        check_archive(backup, archive, reader=reader, flag=archive_flag, key=key)
    label_file = backup / "backup_label"
    if not label_file.is_file():
        if require_backup_label:
            raise RestoreError(
                f"{backup} has no backup_label: an online backup restored without the label pg_backup_stop()"
                " returned starts recovery from the wrong checkpoint and can silently lose committed rows"
                " (require_backup_label=False checks it anyway, e.g. a copy of a stopped server)"
            )
        return None
    label_text = label_file.read_text()
    if "START WAL LOCATION" not in parse_backup_label(label_text):
        raise RestoreError(f"{label_file} is not a backup_label (no START WAL LOCATION line)")
    return label_text


def archive_place(wal_archive: Path | str | None) -> Path | str | None:
    """The WAL archive as given: an object-store URL (``s3://``, ``gs://``, ``abfs://`` ...) as it is, a
    folder (or ``file://`` URL) as an absolute path.

    :param wal_archive: ``--wal-archive`` / ``wal_archive``.
    """
    if wal_archive is None:
        return None
    text = str(wal_archive)
    if text.startswith("file://"):
        return Path(text[len("file://") :]).absolute()
    return text if "://" in text else Path(wal_archive).absolute()


def check_archive(
    backup: Path,
    archive: Path | str,
    *,
    reader: str | None = SERVER_USER,
    flag: str = "--wal-archive",
    key: EncryptionKey | None = None,
) -> None:
    """The WAL archive is a folder ``reader`` can read, holding WAL of the backup's cluster when the backup
    tells which (:func:`backup_system_identifier`); or an object-store archive ``wal-push`` manages
    (:func:`check_archive_url`).

    :param backup: the backup.
    :param archive: the WAL archive (:func:`archive_place`).
    :param reader: the OS user the server runs as (checked as root only).
    :param flag: how the caller's user names the archive.
    :param key: the archive's encryption key, when ``wal-push`` encrypts it.
    :raises ArchiveNotUsable: named, with the flag.
    """
    if isinstance(archive, str):
        check_archive_url(backup, archive, flag=flag, key=key)
        return
    if not archive.is_dir():
        raise ArchiveNotUsable(f"the WAL archive {archive} ({flag}) is not a folder")
    if os.geteuid() == 0 and reader and not _user_can(reader, "-r", archive):
        raise ArchiveNotUsable(f"the WAL archive {archive} ({flag}) is not readable by the {reader} OS user")
    known = backup_system_identifier(backup)
    if known is not None:
        check_archive_cluster(archive, *known, flag=flag, key=key)


def check_archive_url(
    backup: Path, url: str, *, flag: str = "--wal-archive", key: EncryptionKey | None
) -> None:
    """An object-store archive serves the backup: ``wal-push`` manages it (its identity file, which
    ``wal-fetch`` checks each segment against, names the backup's cluster) and it holds the backup's first
    WAL segment, which reads with ``key`` and was written by that cluster.

    :param backup: the backup (or a tar backup's extracted data directory).
    :param url: the archive's URL.
    :param flag: how the caller's user names the archive.
    :param key: the archive's encryption key, when ``wal-push`` encrypts it.
    :raises ArchiveNotUsable: named, with the flag.
    """
    from pg_safe_backup.wal_archive import open_store  # fsspec only for an object store

    known = backup_system_identifier(backup)
    label = backup / "backup_label"
    start = (
        start_wal_location(parse_backup_label(label.read_text()).get("START WAL LOCATION"))
        if label.is_file()
        else None
    )
    try:
        store = open_store(url)
        identity = store.read_identity()
        if identity is None:
            raise ArchiveNotUsable(
                f"the WAL archive {url} ({flag}) holds no {IDENTITY_FILE}: an object-store archive is read"
                " with wal-fetch, from what wal-push wrote"
            )
        if known is not None and identity.system_identifier != known[0]:
            raise ArchiveNotUsable(
                f"the WAL archive {url} ({flag}) is another cluster's: its identity file names system"
                f" identifier {identity.system_identifier}, the backup's ({known[1]}) is {known[0]}"
            )
        if start is None:
            return
        found = store.find(start[1])
        if not found:
            raise ArchiveNotUsable(
                f"the WAL archive {url} ({flag}) does not hold {start[1]}, the backup's first WAL segment"
            )
        stored = parse_stored_name(found[0]) or StoredName(found[0])
        if stored.encrypted and key is None:
            raise ArchiveNotUsable(
                f"the WAL archive {url} ({flag}) is encrypted: give its key with --encryption-key-file or"
                " --encryption-key-env"
            )
        with (
            store.open(found[0]) as src,
            contextlib.closing(decode(src, stored, key, f"{url}/{found[0]}")) as plain,
        ):
            head = next(plain, b"")
        system = header_system_identifier(head, f"{url}/{found[0]}")
    except ArchiveNotUsable:
        raise
    except Exception as err:  # the store's own errors (botocore, aiohttp ...) as much as ours: no verdict
        why = " ".join(str(err).split()) or err.__class__.__name__
        raise ArchiveNotUsable(f"cannot read the WAL archive {url} ({flag}): {why}") from err
    if system != identity.system_identifier:
        raise ArchiveNotUsable(
            f"the WAL archive {url} ({flag}) holds {found[0]} of system {system}, not of its own"
            f" {identity.system_identifier}"
        )


def backup_system_identifier(backup: Path) -> tuple[int, str] | None:
    """Which cluster a backup is of, and where that was read: a plain copy's global/pg_control, else a
    version 2 backup_manifest's System-Identifier; None when neither tells (a tar backup without a version 2
    manifest: its pg_control is read once extracted).

    :param backup: the backup (or a restored data directory).
    """
    control = backup / "global" / "pg_control"
    if control.is_file():
        try:
            return read_pg_control(backup).system_identifier, str(control)
        except BadPgControl:
            pass  # a damaged copy: the checks of the copy name it
    found = manifest_field(backup, "System-Identifier")
    return (found, str(backup / "backup_manifest")) if found is not None else None


def manifest_field(backup: Path, name: str) -> int | None:
    """A number the backup's backup_manifest gives before its file list
    (``PostgreSQL-Backup-Manifest-Version``, ``System-Identifier``); None when it has none or no readable one.

    :param backup: the backup.
    :param name: the field.
    """
    try:
        with open(backup / "backup_manifest", "rb") as f:
            head = f.read(MANIFEST_HEAD).decode("utf-8", "replace")
    except OSError:
        return None
    m = re.search(rf'"{re.escape(name)}":\s*(\d+)', head)
    return int(m.group(1)) if m else None


def check_archive_cluster(
    archive: Path,
    system_identifier: int,
    source: str,
    flag: str = "--wal-archive",
    key: EncryptionKey | None = None,
) -> None:
    """The archive's oldest WAL segment was written by the backup's cluster, and a managed archive's identity
    file names it too; an archive without segments proves nothing and passes.

    :param archive: the WAL archive.
    :param system_identifier: the backup's cluster's.
    :param source: where it was read (for the message).
    :param flag: how the caller's user names the archive.
    :param key: the archive's encryption key, when ``wal-push`` encrypts it.
    :raises ArchiveNotUsable: another cluster's archive, its oldest segment cannot be read, or it is
        encrypted and ``key`` does not read it (named).
    """
    try:
        identity = archive_identity(archive)
        found = archive_system_identifier(archive, key)
    except KeyNeeded as err:
        raise ArchiveNotUsable(
            f"the WAL archive {archive} ({flag}) is encrypted: give its key with --encryption-key-file or"
            f" --encryption-key-env ({err})"
        ) from err
    except (OSError, NotWal, CryptError, DamagedFile, MissingCodec, ArchiveFormatError) as err:
        raise ArchiveNotUsable(
            f"cannot tell which cluster the WAL archive {archive} ({flag}) is of: {err}"
        ) from err
    if identity is not None and identity.system_identifier != system_identifier:
        raise ArchiveNotUsable(
            f"the WAL archive {archive} ({flag}) is another cluster's: its identity file names system"
            f" identifier {identity.system_identifier}, the backup's ({source}) is {system_identifier}"
        )
    if found is not None and found[0] != system_identifier:
        raise ArchiveNotUsable(
            f"the WAL archive {archive} ({flag}) is another cluster's: its oldest segment {found[1]} has"
            f" system identifier {found[0]}, the backup's ({source}) is {system_identifier}"
        )


def _user_can(user: str, test: str, folder: Path) -> bool:
    """Whether OS ``user`` passes ``test <test> folder -a -x folder`` (root only asks)."""
    cmd = ["test", test, str(folder), "-a", "-x", str(folder)]
    if os.geteuid() == 0:
        cmd = ["runuser", "-u", user, "--", *cmd]
    return subprocess.run(cmd, capture_output=True).returncode == 0


# ------------------------------------------------------------------------------- the recovery target
@dataclass(frozen=True)
class RecoveryTarget:
    """Where recovery stops: at most one of time, LSN, restore point name, or the backup's consistent
    point (``immediate``); none of them: the end of the archive.

    :param time: recovery_target_time (an aware datetime).
    :param lsn: recovery_target_lsn.
    :param name: recovery_target_name (a pg_create_restore_point name).
    :param immediate: recovery_target = 'immediate'.
    :param action: recovery_target_action: pause (PostgreSQL's default), promote or shutdown.
    :param timeline: recovery_target_timeline ('latest', 'current' or a number).
    """

    time: datetime | None = None
    lsn: str | None = None
    name: str | None = None
    immediate: bool = False
    action: str = "pause"
    timeline: str = "latest"

    def check(self) -> None:
        """:raises RestoreError: two targets at once, an unknown action, a malformed LSN."""
        given = [
            flag
            for flag, value in (
                ("--target-time", self.time),
                ("--target-lsn", self.lsn),
                ("--target-name", self.name),
                ("--target-immediate", self.immediate or None),
            )
            if value is not None
        ]
        if len(given) > 1:
            raise RestoreError(f"one recovery target at a time: {' and '.join(given)} were both given")
        if self.action not in TARGET_ACTIONS:
            raise RestoreError(
                f"--target-action must be one of {', '.join(TARGET_ACTIONS)}, not {self.action!r}"
            )
        if self.timeline not in TIMELINE_WORDS and not (
            re.fullmatch(r"[0-9]{1,10}", self.timeline) and 0 < int(self.timeline) < 2**32
        ):
            raise RestoreError(
                f"--target-timeline must be current, latest or a timeline number, not {self.timeline!r}"
            )
        if self.lsn is not None:
            try:
                parse_lsn(self.lsn)
            except ValueError:
                raise RestoreError(f"--target-lsn {self.lsn!r} is not an LSN like 0/3000060") from None

    def settings(self, restore_command: str) -> dict[str, str]:
        """The postgresql.auto.conf lines (values quoted as written in the file)."""
        chosen = {
            "recovery_target_lsn": self.lsn,
            "recovery_target_name": self.name,
            "recovery_target_time": self.time.isoformat(sep=" ") if self.time else None,
            "recovery_target": "immediate" if self.immediate else None,
        }
        # Every target cleared first (one the backed up server set too), the chosen one last: PostgreSQL
        # refuses a target line, even '', while another target is set (error_multiple_recovery_targets).
        settings = {"restore_command": quote_setting(restore_command), "recovery_target_xid": "''"}
        settings.update({name: "''" for name, value in chosen.items() if value is None})
        settings.update({name: quote_setting(value) for name, value in chosen.items() if value is not None})
        settings["recovery_target_timeline"] = quote_setting(self.timeline)
        settings["recovery_target_action"] = quote_setting(self.action)
        return settings


def quote_setting(value: str) -> str:
    """A string as a postgresql.conf value: single quotes, doubled inside."""
    return "'" + value.replace("'", "''") + "'"


def archive_restore_command(archive: Path | str, key: ArchiveKey | None = None) -> str:
    """The restore_command that reads ``archive``: :func:`wal_fetch_command` for an object-store URL or a
    folder ``wal-push`` manages (its identity file is at the top), else ``cp ARCHIVE/%f "%p"`` (the
    archive's path shell-quoted and its ``%`` doubled).

    :param archive: the WAL archive (:func:`archive_place`).
    :param key: a managed archive's key, when it is encrypted.
    """
    if isinstance(archive, str) or is_managed_archive(archive):
        return wal_fetch_command(archive, key)
    return f'cp {shlex.quote(str(archive).replace("%", "%%") + "/%f")} "%p"'


def wal_fetch_command(archive: Path | str, key: ArchiveKey | None = None) -> str:
    """``PYTHON -m pg_safe_backup wal-fetch --archive ARCHIVE [KEY FLAG] %f "%p"``
    (:func:`~pg_safe_backup.local_cluster.command_for_server`).

    :param archive: the archive's folder or URL.
    :param key: how wal-fetch reads the key of an encrypted archive.
    """
    words = ["wal-fetch", "--archive", str(archive), *([key.flag, key.value] if key else [])]
    return command_for_server(*words) + ' %f "%p"'


def _check_not_before_backup(backup: Path, target: RecoveryTarget) -> None:
    """A target before the end of the backup cannot be reached from it (recovery stops with FATAL): refuse
    what the backup proves (its start time, its stop LSN); the catalog entry's stop time only when the
    entry is this backup's (its stop LSN the proven one). Otherwise PostgreSQL itself refuses."""
    proof = prove_backup(backup)
    if not proof.ok:
        return
    try:
        info = read_backup_info(backup)
    except CatalogError:
        info = None
    ended = info.stopped if info is not None and info.stop_lsn == proof.stop_lsn else None
    before = max((t for t in (proof.start_time, ended) if t is not None), default=None)
    if target.time is not None and before is not None and target.time < before:
        raise RestoreError(
            f"--target-time {target.time.isoformat()} is before the end of this backup"
            f" ({before.isoformat()}); restore an earlier one: use --latest-before with the backups' root"
        )
    if target.lsn is not None and parse_lsn(target.lsn) < parse_lsn(proof.stop_lsn):
        raise RestoreError(
            f"--target-lsn {target.lsn} is before the end of this backup ({proof.stop_lsn}); restore an"
            " earlier one"
        )


# ---------------------------------------------------------------------------- a backup in an object store
def _read_first(name: str) -> bool:
    """Whether the file ``name`` (as restored) of a backup in an object store is read before the copy: what
    the checks and the plan read (label, map, manifest, catalog entry, PG_VERSION, pg_control, a
    self-contained backup's WAL), never a relation file or an archive."""
    top = name.split("/", 1)[0]
    return ("/" not in name and not _is_archive(name)) or top == "pg_wal" or name == "global/pg_control"


@dataclass
class _Remote:
    """A backup in an object store, restored through its local outline: every folder of the backup, the
    files :func:`_read_first` names with their contents, every other file as a sparse file of its stored size
    (no disk used). Every check, the tablespace plan and the room check read the outline as they read a
    local backup; the copy (:meth:`_Progress.copy_tree`) and the tar extraction (:meth:`_Progress.open`)
    read the store, so the backup's bytes reach the target once, never a second copy on local disk."""

    url: Any
    outline: Path
    listing: dict[str, StoredFile]  # stored path (``X.enc`` when sealed) -> file
    key: EncryptionKey | None

    def under(self, local: Path) -> tuple[str, dict[str, StoredFile], list[str]] | None:
        """For a folder of the outline: its path in the store, the stored files under it (relative to it),
        and its folders (relative, empty ones too); None for a folder outside the outline."""
        if not local.is_relative_to(self.outline):
            return None
        rel = local.relative_to(self.outline).as_posix().strip(".")
        prefix = f"{rel}/" if rel else ""
        files = {name[len(prefix) :]: f for name, f in self.listing.items() if name.startswith(prefix)}
        folders = [p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_dir()]
        return rel, files, folders

    def file(self, local: Path) -> tuple[str, StoredFile] | None:
        """For a file of the outline: its stored path and the stored file; None for another file."""
        if not local.is_relative_to(self.outline):
            return None
        rel = local.relative_to(self.outline).as_posix()
        name = next((n for n in (rel, rel + SUFFIX) if n in self.listing), None)
        return None if name is None else (name, self.listing[name])


@contextlib.contextmanager
def _outlined(url: Any, key: EncryptionKey | None, near: Path) -> Iterator[_Remote]:
    """The outline of the backup at ``url`` (:class:`_Remote`) in a temporary folder beside ``near`` (the
    target), removed at the end.

    :raises RestoreError: the store cannot be listed or read, or holds nothing there (named).
    """
    try:
        listing = list_stored(url)
    except OSError as err:
        raise RestoreError(f"cannot list {url} (BACKUP): {' '.join(str(err).split())}") from None
    if not listing:
        raise RestoreError(f"{url} (BACKUP) holds nothing: no backup there")
    outline = Path(tempfile.mkdtemp(prefix=f".{near.name}.outline-", dir=_nearest_existing(near.parent)))
    try:
        try:
            if FOLDERS_NAME in listing:
                for folder in json.loads((url / FOLDERS_NAME).read_bytes())["folders"]:
                    (outline / folder).mkdir(parents=True, exist_ok=True)
            for stored, item in listing.items():
                name = plaintext_name(stored, key)
                path = outline / name
                path.parent.mkdir(parents=True, exist_ok=True)
                if _read_first(name):
                    fetch_file(item, path, key, str(url / stored))
                else:
                    with open(path, "wb") as sparse:
                        sparse.truncate(item.size)
        except (OSError, CryptError, ValueError, KeyError) as err:
            raise RestoreError(f"cannot read {url} (BACKUP): {' '.join(str(err).split())}") from None
        yield _Remote(url, outline, listing, key)
    finally:
        shutil.rmtree(outline, ignore_errors=True)


def download_backup(url: Any, into: Path, key: EncryptionKey | None = None) -> tuple[int, int]:
    """The backup at ``url`` as a local copy of a data directory in ``into`` (absent or empty), what the
    checks that read every file need (page LSNs, pg_verifybackup): plain files downloaded (and decrypted),
    a tar backup's archives extracted as they stream (each tablespace's into ``pg_tblspc/<OID>``), its label
    files and backup_manifest beside them copied in.

    :param url: the backup in an object store.
    :param into: the local folder.
    :param key: the key of an encrypted backup.
    :returns: the bytes and files read.
    :raises RestoreError: it cannot be listed, read or extracted (named).
    :raises CryptError: a sealed file does not authenticate with ``key`` (named).
    """
    with _outlined(url, key, into) as remote:
        meter = _Progress(0, None, remote)
        archives = tar_archives(remote.outline)
        if not archives:
            meter.copy_tree(remote.outline, into)
            return meter.done, meter.files
        into.mkdir(mode=0o700, parents=True, exist_ok=True)
        for top in remote.outline.iterdir():
            if top.is_file() and not _is_archive(top.name):
                shutil.copy2(top, into / top.name)  # read already: the label files, the manifest
        for oid, archive in archives.items():
            _extract(
                archive,
                into / "pg_tblspc" / oid if oid else into,
                {"pg_tblspc"} if oid is None else set(),
                meter,
            )
        return meter.done, meter.files


# ------------------------------------------------------------------------------------------- the copy
class _Progress:
    """Bytes copied so far, reported through ``callback(done, total)`` at most every few seconds."""

    def __init__(
        self, total: int, callback: Callable[[int, int], None] | None, remote: _Remote | None = None
    ) -> None:
        self.total, self.callback, self.remote = total, callback, remote
        self.done = self.files = 0
        self.kept = self.removed = 0  # a delta restore's files left as they were, and removed
        self.last = time.monotonic()

    def add(self, size: int, files: int = 1) -> None:
        """Count ``size`` more bytes and ``files`` more files; report when it is time."""
        self.done += size
        self.files += files
        self._report()

    def _report(self) -> None:
        if self.callback and time.monotonic() - self.last >= PROGRESS_EVERY:
            self.last = time.monotonic()
            self.callback(self.done, self.total)

    def copy_tree(
        self, source: Path, destination: Path, skip_top: set[str] | None = None, delta: bool = False
    ) -> None:
        """Copy the folder ``source`` into ``destination`` (absent or empty) with the copy engine
        (:func:`files.copier.copy_tree`: workers, largest files first, links followed, every file and
        folder synced), counted; ``delta``: into the folder ``destination`` as it is
        (:func:`files.copier.sync_tree`: only the files that differ written, what ``source`` lacks removed).

        A folder of a backup in an object store (its local outline, :class:`_Remote`) is downloaded instead.

        :raises RestoreError: a file or folder cannot be read or written (named).
        """
        before = self.done

        def seen(copied: Progress) -> None:
            self.done = before + copied.done_bytes
            self._report()

        stored = self.remote.under(source) if self.remote else None
        try:
            if stored is not None:
                assert self.remote is not None and not delta  # refused before: a delta reads a local backup
                result = download_tree(
                    self.remote.url / stored[0] if stored[0] else self.remote.url,
                    destination,
                    listing=stored[1],
                    skip_top=skip_top or (),
                    folders=stored[2],
                    key=self.remote.key,
                    progress=seen,
                    progress_interval=1.0,
                )
            elif delta:
                synced = sync_tree(
                    source,
                    destination,
                    skip_top=skip_top or (),
                    keep_top=(DELTA_MARK, "pg_tblspc"),  # its links: each place's proof
                    progress=seen,
                    progress_interval=1.0,
                )
                result = synced.copied
                self.kept += synced.kept
                self.removed += len(synced.removed)
            else:
                result = copy_tree(
                    source, destination, skip_top=skip_top or (), progress=seen, progress_interval=1.0
                )
        except (CopyError, OSError, CryptError) as err:
            raise RestoreError(f"the copy failed: {' '.join(str(err).split())}") from err
        self.done = before + result.bytes
        self.files += result.files

    def open(self, path: Path) -> IO[bytes]:
        """The file ``path`` to read: a local one, or one of a backup in an object store, read ahead by a
        thread and decrypted when it is sealed."""
        stored = self.remote.file(path) if self.remote else None
        if stored is None:
            return open(path, "rb")
        assert self.remote is not None
        name, item = stored
        return io.BufferedReader(StoredReader(item, self.remote.key, str(self.remote.url / name)), CHUNK)


# ------------------------------------------------------------------------------------------ tar format
def tar_archives(backup: Path) -> dict[str | None, Path]:
    """The archives of a tar-format backup (``base.tar[.gz|.zst]``, ``<oid>.tar[...]``): tablespace OID (None
    for base.tar) -> file; empty for a plain backup."""
    found: dict[str | None, Path] = {}
    for path in sorted(backup.glob("*.tar*")) if backup.is_dir() else []:
        if _is_archive(path.name):
            stem = path.name.partition(".tar")[0]
            found[None if stem == "base" else stem] = path
    return found if None in found else {}


def _is_archive(name: str) -> bool:
    """Whether ``name`` is an archive of a tar backup (``base.tar[.gz|.zst]``, ``<oid>.tar[...]``)."""
    stem, tar, suffix = name.partition(".tar")
    return bool(tar) and suffix in TAR_SUFFIXES and (stem == "base" or stem.isdigit())


class _CountedReader(io.RawIOBase):
    """A file read through it counts its bytes into the progress (the archive's stored size)."""

    def __init__(self, raw: IO[bytes], progress: _Progress) -> None:
        self.raw, self.progress = raw, progress

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = self.raw.readinto(buffer)
        self.progress.add(n or 0, files=0)
        return n or 0


def _extract(archive: Path, into: Path, skip_top: set[str], progress: _Progress) -> None:
    """Extract one archive of a tar backup into ``into``, leaving out members under ``skip_top``.

    :raises RestoreError: the archive is damaged, cut short or needs a missing decompressor (named).
    """
    try:
        _extract_members(archive, into, skip_top, progress)
        # Durable before the restore says it is done, as the copy engine's files are.
        synced = [Path(top, name) for top, _dirs, names in os.walk(into) for name in [*names, "."]]
        sync_paths([p for p in synced if not p.is_symlink()] + [into.parent])
    except (OSError, EOFError, ImportError, tarfile.TarError, CopyError, CryptError) as err:
        raise RestoreError(f"cannot extract {archive}: {type(err).__name__}: {err}") from err
    except Exception as err:  # zstandard.ZstdError, without importing zstandard for every backup
        if type(err).__module__.split(".")[0] != "zstandard":
            raise
        raise RestoreError(f"cannot extract {archive}: {err}") from err


def _extract_members(archive: Path, into: Path, skip_top: set[str], progress: _Progress) -> None:
    with progress.open(archive) as raw:
        counted: IO[bytes] = io.BufferedReader(_CountedReader(raw, progress))  # type: ignore[arg-type]
        if archive.name.endswith(".zst"):
            import zstandard  # only a zstd backup needs it (the [zstd] extra)

            counted = zstandard.ZstdDecompressor().stream_reader(counted)  # type: ignore[assignment]
        mode = "r|gz" if archive.name.endswith(".gz") else "r|"
        with tarfile.open(fileobj=counted, mode=mode) as tar:
            for member in tar:
                if member.name.split("/", 1)[0] in skip_top:
                    continue
                # 'data': no absolute paths, no links out of ``into``, no device files, no owners.
                tar.extract(member, into, filter="data")
                progress.files += member.isfile()


def _size(folder: Path, skip: set[str]) -> int:
    total = 0
    for top, _dirs, names in os.walk(folder, followlinks=True):
        if Path(top) == folder:
            names = [n for n in names if n not in skip]
        total += sum(
            os.path.getsize(os.path.join(top, n)) for n in names if os.path.isfile(os.path.join(top, n))
        )
    return total


def _copy_backup(
    backup: Path,
    data: Path,
    archives: Mapping[str | None, Path],
    use_backup_pg_wal: bool,
    progress: _Progress,
    result: RestoreResult,
    delta: bool = False,
) -> None:
    """Copy the backup to ``data``, following links (nothing in the copy points back at the backup); a
    tar backup's base.tar is extracted, and its label files, stored beside the archives, copied. ``delta``:
    ``data`` is made to hold the same (only what differs written, what the backup lacks removed)."""
    if archives:
        # The label first: base.tar's last member is pg_control, and a folder with it but without the
        # label would start recovery from the wrong checkpoint.
        beside = {name for name in ("backup_label", "tablespace_map") if (backup / name).is_file()}
        for name in beside:
            shutil.copy2(backup / name, data / name)
        _extract(archives[None], data, SKIP_TOP | beside, progress)
        (data / "pg_wal" / "archive_status").mkdir(parents=True, exist_ok=True)
        (data / "pg_tblspc").mkdir(exist_ok=True)
        return

    progress.copy_tree(backup, data, SKIP_TOP, delta=delta)
    result.not_copied = sorted(
        n for n in os.listdir(backup) if n in SKIP_TOP and n not in ("pg_wal", "pg_tblspc")
    )
    if use_backup_pg_wal and (backup / "pg_wal").is_dir():
        shutil.copytree(
            backup / "pg_wal",
            data / "pg_wal",
            symlinks=False,
            ignore_dangling_symlinks=True,
            ignore=lambda folder, names: set(names) if Path(folder).name == "archive_status" else set(),
        )
        result.used_backup_pg_wal = sorted(p.name for p in (data / "pg_wal").iterdir() if p.is_file())
    (data / "pg_wal" / "archive_status").mkdir(parents=True, exist_ok=True)
    (data / "pg_tblspc").mkdir(exist_ok=delta)


@dataclass(frozen=True)
class _Placement:
    """One tablespace of the backup: its OID and location in tablespace_map, its backup, where it goes."""

    oid: str
    original: str
    source: Path
    where: Path


def _plan_tablespaces(
    backup: Path,
    remap: Mapping[str, Path],
    tablespace_root: Path | None,
    sources: Mapping[str | int, Path | str],
    major: int | None,
    archives: Mapping[str | None, Path],
    delta: Path | None = None,
) -> list[_Placement]:
    """Where each tablespace of the backup goes, checked before anything is copied (``delta``: the data
    directory a delta rewrites, whose own tablespaces, where its pg_tblspc/ links point, may be rewritten).

    :raises RestoreError: a remap of an unknown OID, a tablespace without a backup, a location not empty,
        a pg_tblspc link no tablespace_map line explains.
    """
    map_file = backup / "tablespace_map"
    entries = parse_tablespace_map(map_file.read_text()) if map_file.exists() else []
    listed = {oid for oid, _ in entries}
    unknown = sorted(set(remap) - listed)
    if unknown:
        raise RestoreError(
            f"--tablespace {', '.join(unknown)}: the backup has no such tablespace"
            f" (its tablespace_map lists {', '.join(sorted(listed)) or 'none'})"
        )
    spc = backup / "pg_tblspc"
    for entry in sorted(spc.iterdir()) if spc.is_dir() else []:
        if entry.name not in listed and entry.is_symlink():
            raise RestoreError(
                f"pg_tblspc/{entry.name} in the backup is a link to {os.readlink(entry)} but no "
                "tablespace_map lists it; restoring it would use the original tablespace location"
            )
    plan = []
    for oid, original in entries:
        if archives and oid not in archives:
            raise RestoreError(f"tablespace {oid} ({original} in tablespace_map): no {oid}.tar in {backup}")
        try:
            source = archives.get(oid) or find_tablespace_copy(backup, oid, original, sources, major)
        except TablespaceNotCopied as err:
            raise RestoreError(str(err)) from err
        where = remap.get(oid) or (tablespace_root / oid if tablespace_root else Path(original))
        where = Path(where).absolute()
        if where.exists() and (not where.is_dir() or (any(where.iterdir()) and not _own(delta, oid, where))):
            raise RestoreError(
                f"tablespace {oid} would be restored to {where}, which is not empty (it may be the live"
                f" tablespace); give it an empty folder with --tablespace {oid}=DIR"
            )
        plan.append(_Placement(oid, original, source, where))
    return plan


def _own(delta: Path | None, oid: str, where: Path) -> bool:
    """Whether ``where`` is the tablespace ``oid`` of the data directory ``delta`` rewrites: its
    pg_tblspc/``oid`` link points there. Any other folder that is not empty may be a live tablespace."""
    link = delta / "pg_tblspc" / oid if delta else None
    return link is not None and link.is_symlink() and link.resolve() == where.resolve()


def _check_apart(backup: Path, data: Path, plan: list[_Placement]) -> None:
    """Every place written is apart from the others and from what is read: two tablespaces in one folder
    would merge, and a target inside what is copied would be copied into itself.

    :raises RestoreError: two places overlap (named).
    """
    written = [("TARGET_DIR", data)] + [(f"--tablespace {p.oid}", p.where) for p in plan]
    read = [("BACKUP", backup)] + [(f"the backup of tablespace {p.oid}", p.source) for p in plan]
    for i, (name, place) in enumerate(written):
        others = written[i + 1 :] + read
        for other_name, other in others:
            if place == other or place.is_relative_to(other) or other.is_relative_to(place):
                raise RestoreError(
                    f"{name} ({place}) overlaps {other_name} ({other}): give them apart folders"
                )


def _copy_tablespaces(plan: list[_Placement], progress: _Progress, delta: bool = False) -> None:
    """Copy each tablespace to its place (``delta``: into what it holds). Before the data directory: its
    pg_control, copied last of all, is what makes a folder a data directory a server starts on."""
    for p in plan:
        if p.source.is_file():  # <oid>.tar of a tablespace of a tar backup
            _extract(p.source, p.where, set(), progress)
        else:
            progress.copy_tree(p.source, p.where, delta=delta and p.where.is_dir())
        os.chmod(p.where, 0o700)


def _place_tablespaces(
    backup: Path,
    data: Path,
    plan: list[_Placement],
    progress: _Progress,
    result: RestoreResult,
    delta: bool = False,
) -> None:
    """Link each tablespace, copied to its place (:func:`_copy_tablespaces`), from pg_tblspc/ and name it in
    tablespace_map; an in-place tablespace (allow_in_place_tablespaces) is copied into pg_tblspc/. A delta's
    pg_tblspc/ keeps its links until every place is written (a delta run again finds them)."""
    links = data / "pg_tblspc"
    for entry in list(links.iterdir()) if delta and links.is_dir() else []:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    links.mkdir(exist_ok=True)
    listed = {p.oid for p in plan}
    spc = backup / "pg_tblspc"
    for entry in sorted(spc.iterdir()) if spc.is_dir() else []:
        if entry.name not in listed and entry.is_dir() and not entry.is_symlink():
            progress.copy_tree(entry, links / entry.name)
    for p in plan:
        (links / p.oid).symlink_to(p.where)
        result.tablespaces[p.oid] = {
            "original": p.original,
            "backup": str(p.source),
            "restored_to": str(p.where),
        }
    if plan:
        (data / "tablespace_map").write_text(
            "".join(f"{p.oid} {escape_map_path(str(p.where))}\n" for p in plan)
        )


def _nearest_existing(path: Path) -> Path:
    """``path`` or its nearest folder above that exists."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_reachable(places: list[tuple[str, Path]], owner: str | None) -> None:
    """Each place the restore writes (TARGET_DIR, each tablespace's) can be made and written here, and the
    server's OS user can reach it: checked before the copy, not found out once the server starts.

    :param places: (its flag, its folder).
    :param owner: the OS user to own it (None: the caller, who must write it).
    :raises RestoreError: the flag, the place and the folder in the way.
    """
    for name, place in places:
        existing = _nearest_existing(place)
        if not existing.is_dir():
            raise RestoreError(f"{name} {place}: {existing} is not a folder")
        if os.statvfs(existing).f_flag & os.ST_RDONLY or not os.access(existing, os.W_OK | os.X_OK):
            raise RestoreError(f"{name} {place} cannot be written: {existing} is read-only or closed to us")
        above = _nearest_existing(place.parent)  # the restore makes and owns the rest
        if owner is None or _user_can(owner, "-x", above):
            continue
        blocker = next(f for f in [*reversed(above.parents), above] if not _user_can(owner, "-x", f))
        st = blocker.stat()
        raise RestoreError(
            f"{name} {place} is not reachable by the {owner} OS user (--owner): it cannot enter {blocker}"
            f" (mode {st.st_mode & 0o777:04o}, uid {st.st_uid})"
        )


def _manifest_sizes(backup: Path) -> list[tuple[str, int]] | None:
    """(path, size) of every file the backup_manifest lists; None without a readable one."""
    try:
        files = json.loads((backup / "backup_manifest").read_bytes())["Files"]
        return [
            (f.get("Path") or bytes.fromhex(f["Encoded-Path"]).decode(errors="replace"), f["Size"])
            for f in files
        ]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _bytes_needed(
    backup: Path, archives: Mapping[str | None, Path], plan: list[_Placement], with_pg_wal: bool
) -> dict[str | None, int]:
    """The bytes the restore writes into TARGET_DIR (None) and into each tablespace's place (its OID): a tar
    backup's from its backup_manifest, else its archives' stored size (all a compressed one shows unread)."""
    if not archives:
        wal = _size(backup / "pg_wal", set()) if with_pg_wal and (backup / "pg_wal").is_dir() else 0
        return {None: _size(backup, SKIP_TOP) + wal, **{p.oid: _size(p.source, set()) for p in plan}}
    listed = _manifest_sizes(backup)
    if listed is None:
        return {None: archives[None].stat().st_size, **{p.oid: p.source.stat().st_size for p in plan}}
    needed: dict[str | None, int] = {None: 0, **{p.oid: 0 for p in plan}}
    for path, size in listed:
        parts = path.split("/")
        tablespace = parts[0] == "pg_tblspc" and len(parts) > 2 and parts[1] in needed
        needed[parts[1] if tablespace else None] += size
    return needed


def _check_room(needs: list[tuple[str, Path, int]]) -> None:
    """Each file system written has room for the bytes that go there (places on one file system summed).

    :param needs: (its flag, its folder, bytes).
    :raises RestoreError: the flags, the bytes needed and the bytes free.
    """
    by_fs: dict[int, tuple[list[str], Path, int]] = {}
    for name, place, size in needs:
        existing = _nearest_existing(place)
        names, _, total = by_fs.get(os.stat(existing).st_dev, ([], existing, 0))
        by_fs[os.stat(existing).st_dev] = ([*names, name], existing, total + size)
    for names, existing, size in by_fs.values():
        free = shutil.disk_usage(existing).free
        if size > free:
            raise RestoreError(
                f"{' and '.join(names)}: the backup needs {size} bytes ({size / 2**20:.1f} MB), the file"
                f" system of {existing} has {free} bytes free ({free / 2**20:.1f} MB)"
            )


def _archive_settings(mode: str, major: int | None) -> dict[str, str]:
    """The postgresql.auto.conf lines of ``archive_mode``: 'off' empties the commands too, so that turning
    archive_mode on later does not resume archiving into the backed up cluster's archive."""
    if mode == "on":
        return {"archive_mode": "on"}
    settings = {"archive_mode": "off", "archive_command": "''"}
    if major is not None and major >= 15:  # archive_library is PostgreSQL 15's; an older server refuses it
        settings["archive_library"] = "''"
    return settings


#: A delta restore's mark at the top of its target, from its start to its end: the cluster's system
#: identifier (pg_control is gone meanwhile), so a delta that failed half way can be run again.
DELTA_MARK = "pg_safe_backup_delta_restore"


def _delta_identity(data: Path) -> int:
    """The system identifier of the data directory ``data``: its pg_control's, or a delta's mark's.

    :raises RestoreError: neither can be read.
    """
    mark = data / DELTA_MARK
    try:
        if mark.is_file():
            return int(mark.read_text().split()[0])
        return read_pg_control(data).system_identifier
    except (OSError, ValueError, IndexError, BadPgControl) as err:
        raise RestoreError(
            f"--delta: cannot tell which cluster {data} (TARGET_DIR) is: {' '.join(str(err).split())}"
        ) from None


def _check_delta_target(backup: Path, data: Path, archives: Mapping[str | None, Path]) -> None:
    """A delta restore rewrites ``data`` in place: it must be a stopped data directory of the backup's
    cluster, and the backup a plain one.

    :raises RestoreError: naming what is wrong.
    """
    if archives:
        raise RestoreError(f"--delta rewrites from a plain backup; {backup} is a tar backup")
    if not (data / "PG_VERSION").is_file():
        raise RestoreError(f"--delta: the target {data} (TARGET_DIR) is not a data directory (no PG_VERSION)")
    if (data / "postmaster.pid").exists():
        raise RestoreError(
            f"--delta: {data / 'postmaster.pid'} exists: a server may run on the target; stop it (or remove"
            " a stale postmaster.pid) first"
        )
    ours = backup_system_identifier(backup)
    theirs = _delta_identity(data)
    if ours is None or ours[0] != theirs:
        raise RestoreError(
            f"--delta: the target {data} is of the cluster with system identifier {theirs}, the backup of"
            f" {ours[0] if ours else 'an unknown one'}: restore another cluster into an empty folder"
        )


def _begin_delta(data: Path) -> None:
    """Mark ``data`` as being rewritten (its system identifier, durable), then remove its pg_control: until
    :func:`_end_delta`, no server starts on it."""
    mark = data / DELTA_MARK
    if not mark.exists():
        identity = read_pg_control(data).system_identifier
        with open(mark, "w") as f:
            f.write(f"{identity}\n")
            f.flush()
            os.fsync(f.fileno())
        fsync_path(data)
    (data / "global" / "pg_control").unlink(missing_ok=True)
    fsync_path(data / "global")


def _end_delta(data: Path) -> None:
    """The delta is complete (pg_control back, last): remove its mark."""
    (data / DELTA_MARK).unlink(missing_ok=True)
    fsync_path(data)


def _undo(made: list[tuple[Path, bool]]) -> None:
    """Take back a restore that failed half way, so it can be run again: remove the folders it made and
    empty those that were empty."""
    for folder, existed in made:
        if not existed:
            shutil.rmtree(folder, ignore_errors=True)
            continue
        for child in folder.iterdir() if folder.is_dir() else []:
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)


def _configure(data: Path, settings: Mapping[str, str], archive_recovery: bool) -> None:
    # data_directory is only honoured from postgresql.conf (first pass), so pin it there.
    if (data / "postgresql.conf").exists():
        with open(data / "postgresql.conf", "a") as f:
            f.write(f"\n# pg_safe_backup.restore\ndata_directory = {quote_setting(str(data))}\n")
    with open(data / "postgresql.auto.conf", "a") as f:
        f.write("\n# pg_safe_backup.restore: recovery of a backup\n")
        for key, value in settings.items():
            f.write(f"{key} = {value}\n")
    if archive_recovery:
        (data / "recovery.signal").write_text("")
    # else: a self-contained backup recovers as pg_basebackup -X fetch's does, from backup_label and the
    # WAL in its pg_wal/ (archive recovery would insist on a restore_command).


def prepare_restore(
    backup: Path | str | Any,
    target: Path | str,
    *,
    wal_archive: Path | str | None,
    encryption_key: EncryptionKey | None = None,
    key_flags: str = KEY_FLAGS,
    bindir: Path | str | None = None,
    **options: Any,
) -> RestoreResult:
    """Turn ``backup`` into the data directory ``target`` that recovers when started (module docstring);
    an encrypted backup in a local folder is decrypted first, into a temporary folder beside ``target``; one
    in an object store is decrypted as it is downloaded.

    :param backup: the stored backup: a plain folder with backup_label, or a tar backup's folder; local, or
        in an object store (``s3://...`` read with the store's own credentials, or a path object of
        fsspec's: ``UPath`` with options, Airflow's ``ObjectStoragePath``).
    :param target: the new data directory: absent or empty.
    :param wal_archive: the WAL archive; None only for a self-contained backup.
    :param encryption_key: the key of an encrypted backup.
    :param key_flags: how the caller's user gives a key, for the error.
    :param bindir: the folder of pg_combinebackup, for an incremental backup (default: the backup's major's).
    :param options: :func:`restore_plain`'s other keyword arguments.
    :raises RestoreError: what makes the restore impossible or unsafe, named; an encrypted backup without
        its key, with another key, or with a byte changed (nothing restored).
    """
    data = Path(target).absolute()
    if in_store(backup):
        if is_incremental(url := place_of(backup)):
            return _restore_chain(url, data, wal_archive, bindir, options)
        return _restore_stored(backup, data, wal_archive, encryption_key, key_flags, options)
    backup = Path(backup).absolute()
    try:
        kept = KeptSnapshot.read(backup)
    except SnapshotError as err:
        raise RestoreError(" ".join(str(err).split())) from None
    if kept is not None:
        return _restore_kept(backup, kept, data, wal_archive, options)
    if is_incremental(backup):
        return _restore_chain(backup, data, wal_archive, bindir, options)
    try:
        key_id = check_key(backup, encryption_key, key_flags)
    except CryptError as err:
        raise RestoreError(str(err)) from None
    if key_id is None:
        return restore_plain(backup, data, wal_archive=wal_archive, **options)
    assert encryption_key is not None  # check_key raised otherwise

    def decrypted(staging: Path) -> None:
        try:
            decrypt_backup(backup, staging, encryption_key)
        except CryptError as err:
            raise RestoreError(f"{' '.join(str(err).split())}: nothing restored") from None

    size = [("the decryption beside TARGET_DIR", data.parent, _size(backup, set()))]
    return _restore_staged(backup, data, "decrypting", decrypted, wal_archive, options, size)


def _restore_staged(
    backup: Path,
    data: Path,
    what: str,
    fill: Callable[[Path], None],
    wal_archive: Path | str | None,
    options: dict[str, Any],
    room: list[tuple[str, Path, int]] | None = None,
) -> RestoreResult:
    """:func:`restore_plain` of a plain backup that ``fill`` makes out of ``backup`` in a temporary folder
    beside the target (``.<target>.<what>-*``, removed at the end); errors name ``backup``, not that folder.

    :param room: what must fit beside the target first (:func:`_check_room`).
    """
    if data.exists() and (not data.is_dir() or any(data.iterdir())):
        raise RestoreError(f"the target {data} (TARGET_DIR) is not empty: restore into a new or empty folder")
    if room:
        _check_room(room)
    staging = Path(tempfile.mkdtemp(prefix=f".{data.name}.{what}-", dir=_nearest_existing(data.parent)))
    try:
        fill(staging)
        try:
            return restore_plain(staging, data, wal_archive=wal_archive, **options)
        except RestoreError as err:  # named as the user named it, not as the temporary folder
            raise type(err)(str(err).replace(str(staging), str(backup))) from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _restore_kept(
    entry: Path, kept: KeptSnapshot, data: Path, wal_archive: Path | str | None, options: dict[str, Any]
) -> RestoreResult:
    """:func:`prepare_restore` of a kept snapshot catalogued in ``entry``: its snapshots (each mounted
    where its driver mounts) copied as a base backup (:func:`files.layout.walk`: what a base backup leaves
    out stays out; each tablespace from its own snapshot) into a temporary folder beside the target, with the
    entry's label files and manifest, then restored from there as a plain backup."""
    if options.get("delta"):
        raise RestoreError(
            f"--delta rewrites from a copy; {entry} is a kept snapshot: restore into a new folder"
        )
    try:
        source, tablespaces = read_tree(kept.snapshots, kept.data_directory)
    except SnapshotError as err:
        raise RestoreError(f"{entry} (BACKUP): {' '.join(str(err).split())}") from None

    def copied(staging: Path) -> None:
        try:
            copy_data_directory(source, staging, entries=walk(source, tablespaces=tablespaces))
            for name in (*LABEL_FILES, MANIFEST_NAME):
                if (entry / name).is_file():
                    shutil.copy2(entry / name, staging / name)
        except (CopyError, OSError) as err:
            why = " ".join(str(err).split())
            raise RestoreError(f"cannot read the snapshots of {entry}: {why}") from None

    return _restore_staged(entry, data, "snapshot", copied, wal_archive, options)


def is_incremental(backup: Any) -> bool:
    """Whether ``backup`` (local, or an object-store path) is an incremental backup: its label names a
    parent."""
    try:
        return incremental_from(parse_backup_label((backup / "backup_label").read_text())) is not None
    except (OSError, UnicodeDecodeError, ValueError):
        return False  # restore_plain names what is wrong with the label


def combine_chain(backup: Any, into: Path, work: Path, program: Path, manifest: bool = False) -> list[Link]:
    """The chain of the incremental ``backup`` (:func:`pg_safe_backup.incremental.chain_of`: every link
    proven, the missing one named) combined by pg_combinebackup into the empty folder ``into``; a link in an
    object store is downloaded into ``work`` first (the caller removes ``work``).

    :param program: the pg_combinebackup of the backup's major (``incremental.client_program``).
    :param manifest: give the result a ``backup_manifest`` (a check needs one, a restore none).
    :returns: the chain, full first.
    :raises IncrementalRefused: a link is missing or damaged (``ChainBroken``), or pg_combinebackup refused
        (named): what the chain is.
    :raises IncrementalFailed: pg_combinebackup failed for a reason a retry may get past.
    :raises RestoreError: a link in an object store could not be read.
    """
    chain = chain_of(backup)
    local = []
    for n, link in enumerate(chain):
        if in_store(link.folder):
            copy = work / f"link-{n}"
            download_backup(link.folder, copy)
            link = Link(copy, link.proof)
        local.append(link)
    combine(local, into, program=program, manifest=manifest)
    return chain


def _restore_chain(
    backup: Any,
    data: Path,
    wal_archive: Path | str | None,
    bindir: Path | str | None,
    options: dict[str, Any],
) -> RestoreResult:
    """``prepare_restore`` of an incremental backup (local or in an object store): its chain combined
    (:func:`combine_chain`) into a temporary folder beside the target, then restored from there as a plain
    backup."""
    if options.get("delta"):
        raise RestoreError(
            f"--delta rewrites from a full copy; {backup} is an incremental: restore into a new folder"
        )
    try:
        program = client_program("pg_combinebackup", backup_major(backup) or 0, bindir)
    except IncrementalRefused as err:
        raise RestoreError(" ".join(str(err).split())) from None
    return _restore_staged(
        backup,
        data,
        "combined",
        lambda staging: _combined(backup, staging, program),
        wal_archive,
        options,
    )


def _combined(backup: Any, staging: Path, program: Path) -> None:
    """:func:`combine_chain` into a restore's staging folder, its downloads beside it; its errors as
    RestoreError."""
    work = Path(tempfile.mkdtemp(prefix=f"{staging.name}-links-", dir=staging.parent))
    try:
        combine_chain(backup, staging, work, program)
    except (IncrementalRefused, IncrementalFailed) as err:
        raise RestoreError(" ".join(str(err).split())) from None
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _restore_stored(
    backup: Any,
    data: Path,
    wal_archive: Path | str | None,
    key: EncryptionKey | None,
    key_flags: str,
    options: dict[str, Any],
) -> RestoreResult:
    """:func:`prepare_restore` of a backup in an object store (a URL, or a path object of fsspec's): through
    its outline (:class:`_Remote`), each file downloaded or each archive extracted (and decrypted) as it
    arrives, straight into the target."""
    url = place_of(backup)
    if options.get("delta"):
        raise RestoreError(f"--delta rewrites from a backup in a local folder; {url} is in an object store")
    try:
        key_id = check_key(url, key, key_flags)
    except CryptError as err:
        raise RestoreError(str(err)) from None
    with _outlined(url, key if key_id else None, data) as remote:
        try:
            result = restore_plain(remote.outline, data, wal_archive=wal_archive, remote=remote, **options)
        except RestoreError as err:  # named as the user named it, not as the outline
            raise type(err)(str(err).replace(str(remote.outline), str(url))) from err
        for placed in result.tablespaces.values():
            placed["backup"] = placed["backup"].replace(str(remote.outline), str(url))
        return result


def restore_plain(
    backup: Path | str,
    target: Path | str,
    *,
    wal_archive: Path | str | None,
    recovery: RecoveryTarget | None = None,
    tablespaces: Mapping[str | int, Path | str] | None = None,
    tablespace_root: Path | str | None = None,
    tablespace_sources: Mapping[str | int, Path | str] | None = None,
    restore_command: str | None = None,
    archive_key: ArchiveKey | None = None,
    archive_mode: str = "off",
    extra_settings: Mapping[str, str] | None = None,
    owner: str | None = SERVER_USER,
    require_backup_label: bool = True,
    use_backup_pg_wal: bool = False,
    progress: Callable[[int, int], None] | None = None,
    delta: bool = False,
    remote: _Remote | None = None,
) -> RestoreResult:
    """Turn the backup ``backup``, not encrypted, into the data directory ``target`` that recovers when
    started (module docstring).

    :param backup: the stored backup: a plain folder with backup_label, or a tar backup's folder.
    :param target: the new data directory: absent or empty.
    :param wal_archive: the WAL archive; None only for a self-contained backup.
    :param recovery: where recovery stops (default: the end of the archive, then pause... as PostgreSQL:
        with no target the server promotes at the end of the archive).
    :param tablespaces: OID -> where to restore that tablespace (default: its original location).
    :param tablespace_root: restore every tablespace not in ``tablespaces`` to ``<root>/<OID>`` instead of
        its original location (the restore check's sandbox).
    :param tablespace_sources: OID -> the tablespace's backup, when not where files.tablespaces looks.
    :param restore_command: default :func:`archive_restore_command` of ``wal_archive``: ``wal-fetch`` from an
        archive ``wal-push`` manages, else ``cp``.
    :param archive_key: an encrypted managed archive's key: the archive is read with it now, and wal-fetch
        is told where to find it (a key file must be readable by ``owner``).
    :param archive_mode: 'off' (default): the restored server does not archive, so it never writes into the
        backed up cluster's archive (a test restore, the restore check, the drill); 'on': it archives with
        the backed up server's archive_command (a real replacement).
    :param extra_settings: more postgresql.auto.conf lines (values as written in the file).
    :param owner: the OS user to own it all (as root only; None: leave as copied).
    :param require_backup_label: refuse a backup without backup_label.
    :param use_backup_pg_wal: restore with the backup's own pg_wal/ files (only to show what it leads to).
    :param progress: called with (bytes done, bytes total) every few seconds of the copy.
    :param delta: ``target`` is a stopped data directory of the backup's cluster (a standby to rebuild, a
        failed primary): only the files whose size or SHA-256 differ from the backup's are written, what
        the backup does not hold is removed, and the result is what a restore into an empty folder makes
        (tablespaces too, in their places). Its pg_control goes first and comes back last, so a delta that
        fails half way leaves a directory that does not start, and can be run again. A plain backup only.
    :param remote: ``backup`` is the outline of a backup in an object store (:func:`prepare_restore`).
    :raises RestoreError: what makes the restore impossible or unsafe, named.
    """
    started = time.monotonic()
    backup = Path(backup).absolute()
    data = Path(target).absolute()
    archive = archive_place(wal_archive)
    recovery = recovery or RecoveryTarget()
    recovery.check()
    if archive_mode not in ARCHIVE_MODES:
        raise RestoreError(f"--archive-mode must be off or on, not {archive_mode!r}")
    archives = tar_archives(backup)
    if delta:
        _check_delta_target(backup, data, archives)
    elif data.exists() and (not data.is_dir() or any(data.iterdir())):
        raise RestoreError(
            f"the target {data} (TARGET_DIR) is not empty: restore into a new or empty folder, or rewrite a"
            " stopped data directory of this cluster with --delta"
        )
    if owner is not None and os.geteuid() != 0:
        owner = None  # only root can give files away; they stay the caller's
    key = archive_key.key if archive_key else None
    label = check_backup_dir(
        backup, archive, require_backup_label=require_backup_label, reader=owner, key=key
    )
    if archive is not None and restore_command is None and archive_key is not None:
        _check_key_readable(archive_key, owner)
    _check_not_before_backup(backup, recovery)
    remap = {str(oid): Path(where) for oid, where in (tablespaces or {}).items()}
    result = RestoreResult(
        target=data,
        backup_label=label,
        owner=owner,
        archive_recovery=archive is not None,
        archive_mode=archive_mode,
    )
    plan = _plan_tablespaces(
        backup,
        remap,
        Path(tablespace_root) if tablespace_root else None,
        tablespace_sources or {},
        backup_major(backup),
        archives,
        data if delta else None,
    )
    _check_apart(backup, data, plan)
    # Each place written, keyed as tar_archives keys the archives: None for TARGET_DIR, else the OID.
    places = {None: ("TARGET_DIR", data), **{p.oid: (f"--tablespace {p.oid}", p.where) for p in plan}}
    _check_reachable(list(places.values()), owner)
    needed = _bytes_needed(backup, archives, plan, use_backup_pg_wal or archive is None)
    if not delta:  # a delta needs what differs, unknown before it compares
        _check_room([(name, where, needed[key]) for key, (name, where) in places.items()])
    if archives:  # the archives' stored (compressed) bytes, as they are read
        total = sum(path.stat().st_size for path in archives.values())
    else:
        total = sum(needed.values())
    meter = _Progress(total, progress, remote)
    # Undone on failure: what this restore made or found empty (a delta's target is left, unstartable).
    made = [] if delta else [(folder, folder.exists()) for folder in [data, *(p.where for p in plan)]]
    try:
        data.mkdir(parents=True, exist_ok=True)
        if delta:
            _begin_delta(data)
        _copy_tablespaces(plan, meter, delta)
        _copy_backup(backup, data, archives, use_backup_pg_wal or archive is None, meter, result, delta)
        if archive is not None and backup_system_identifier(backup) is None:  # a tar backup, now extracted
            if backup_system_identifier(data) is not None:
                check_archive(data, archive, reader=None, key=key)
        _place_tablespaces(backup, data, plan, meter, result, delta)
        result.config = restore_config(data, backup)
        command = restore_command or (archive_restore_command(archive, archive_key) if archive else "")
        settings = recovery.settings(command)
        settings.update(_archive_settings(archive_mode, backup_major(data)))
        settings.update(extra_settings or {})
        _configure(data, settings, archive_recovery=archive is not None)
        os.chmod(data, 0o700)
        if owner is not None:
            for folder in [data, *(p.where for p in plan)]:
                subprocess.run(["chown", "-R", f"{owner}:", str(folder)], check=True)
            if not _user_can(owner, "-w", data):
                raise RestoreError(
                    f"the target {data} is not reachable by the {owner} OS user (--owner): a folder above"
                    " it is closed to that user"
                )
        if delta:
            _end_delta(data)
    except BaseException:
        _undo(made)
        raise
    result.delta, result.kept, result.removed = delta, meter.kept, meter.removed
    result.settings = settings
    result.files, result.bytes = meter.files, meter.done
    if progress and meter.total:
        progress(meter.done, meter.total)
    result.seconds = round(time.monotonic() - started, 2)
    return result


def _check_key_readable(key: ArchiveKey, owner: str | None) -> None:
    """wal-fetch, run by the server as ``owner``, can read the key file (checked as root only)."""
    if key.flag != "--encryption-key-file" or owner is None or os.geteuid() != 0:
        return
    cmd = ["runuser", "-u", owner, "--", "test", "-r", key.value]
    if subprocess.run(cmd, capture_output=True).returncode != 0:
        raise RestoreError(
            f"--encryption-key-file {key.value} is not readable by the {owner} OS user (--owner), who runs"
            " wal-fetch as the restored server's restore_command: give that user read access"
        )


def start_command(data: Path, owner: str | None) -> str:
    """The command that starts the restored server (as ``owner`` when we are root)."""
    major = backup_major(data)
    try:
        pg_ctl = str(find_bindir(major) / "pg_ctl")
    except FileNotFoundError:
        pg_ctl = "pg_ctl"
    cmd = f"{shlex.quote(pg_ctl)} -D {shlex.quote(str(data))} start"
    return f"runuser -u {shlex.quote(owner)} -- {cmd}" if owner and os.geteuid() == 0 else cmd


__all__ = [
    "ArchiveKey",
    "ArchiveNotUsable",
    "RecoveryTarget",
    "RestoreError",
    "RestoreResult",
    "archive_restore_command",
    "backup_system_identifier",
    "check_archive",
    "check_archive_cluster",
    "check_backup_dir",
    "download_backup",
    "manifest_field",
    "prepare_restore",
    "quote_setting",
    "restore_plain",
    "start_command",
    "wal_fetch_command",
]
