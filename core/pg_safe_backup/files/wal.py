"""Reading a WAL archive by name, and self-contained backups: the WAL a backup needs, copied from the
archive into the copy's pg_wal/.

An archive is read as ``cp %p ARCHIVE/%f`` leaves it or as ``pg-safe-backup wal-push`` stores it
(:mod:`pg_safe_backup.files.walarchive`: ``<%f>[.gz|.lz4|.zst][.enc]``, an identity file at the top):
:func:`find_stored` finds a file PostgreSQL archived under any of its stored names, :func:`plain_chunks`
gives its bytes as PostgreSQL wrote them (decrypted with the archive's key, decompressed).

pg_basebackup's ``-X fetch`` makes the same kind of backup: the copy then recovers to consistency with no
archive at all (no restore_command), and ``pg_verifybackup`` parses that WAL from the copy's own pg_wal/.
The segments are those from the one holding the label's START WAL LOCATION through the one before the
stop LSN (basebackup.c's range), on each timeline of the backup's WAL ranges (a standby's backup that
followed a promotion spans two), and the timeline history files up to the stop's.
"""

from __future__ import annotations

# Imports kept light (manifest and pg_control read lazily): wal-push reads each segment's header here.
import contextlib
import logging
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from pg_safe_backup.errors import TransientError
from pg_safe_backup.files.crypt import CryptError, EncryptionKey
from pg_safe_backup.files.walarchive import (
    IDENTITY_FILE,
    ArchiveIdentity,
    StoredName,
    candidates,
    decode,
    parse_stored_name,
)
from pg_safe_backup.files.walheader import LONG_HEADER, fsync_path, header_system_identifier
from pg_safe_backup.files.walheader import NotWal as NotWal  # re-exported: the WAL module's errors
from pg_safe_backup.files.xlog import (
    WAL_NAME,
    history_file_name,
    wal_file_position,
    wal_file_timeline,
    wal_segment_names,
)

_log = logging.getLogger(__name__)


class WalMissing(TransientError):
    """The archive lacks (a whole copy of) a WAL file the backup needs."""


#: A WAL segment as ``cp`` archives it (not partial), gzip or zstd of it: what carries a long page header
#: (:func:`archived_segments` knows every stored name).
WAL_SEGMENT = re.compile(rf"^{WAL_NAME}(\.gz|\.zst)?$")


class KeyNeeded(CryptError):
    """A file of the archive is encrypted and no key was given (the caller names its flags)."""


def is_managed_archive(archive: Path) -> bool:
    """Whether ``archive`` is one ``pg-safe-backup wal-push`` writes (its identity file is at the top).

    :param archive: the WAL archive folder.
    """
    return (Path(archive) / IDENTITY_FILE).is_file()


def archive_identity(archive: Path) -> ArchiveIdentity | None:
    """The identity file of a managed archive, None for an archive without one (``cp``'s).

    :param archive: the WAL archive folder.
    :raises ArchiveFormatError: it is not an identity file this version reads.
    :raises OSError: it cannot be read.
    """
    path = Path(archive) / IDENTITY_FILE
    return ArchiveIdentity.from_bytes(path.read_bytes(), str(path)) if path.is_file() else None


def find_stored(archive: Path, name: str) -> Path | None:
    """Where ``archive`` holds the file PostgreSQL archived as ``name``: as ``cp`` leaves it, or compressed
    and/or encrypted as ``wal-push`` stores it; None when it holds none.

    :param archive: the WAL archive folder.
    :param name: the archived name (``%f``): a segment, ``.partial``, ``.history`` or ``.backup`` file.
    """
    for stored in candidates(name):
        path = Path(archive) / stored.stored
        if path.is_file():
            return path
    return None


def plain_chunks(path: Path, key: EncryptionKey | None = None) -> Iterator[bytes]:
    """The bytes PostgreSQL archived as ``path`` (a stored name), decrypted and decompressed as its name
    says (:func:`~pg_safe_backup.files.walarchive.decode`), chunk by chunk; a name that is no stored name
    is read as it is. Close the iterator when not read to its end.

    :param path: a file in the archive.
    :param key: the archive's key, for an encrypted file (``.enc``).
    :raises KeyNeeded: the file is encrypted and ``key`` is None.
    :raises CryptError: another key's file, or a changed or cut one: before any byte of a bad chunk.
    :raises DamagedFile: the decompressed stream is damaged or cut short.
    :raises MissingCodec: its compression's package is not installed.
    """
    path = Path(path)
    stored = parse_stored_name(path.name) or StoredName(path.name)
    if stored.encrypted and key is None:
        raise KeyNeeded(f"{path} is encrypted: reading it needs the archive's encryption key")
    with open(path, "rb") as raw:
        yield from decode(raw, stored, key, str(path))


def _head(path: Path, size: int, key: EncryptionKey | None) -> bytes:
    """The first ``size`` plain bytes of a stored file (or fewer: all it has)."""
    head = b""
    with contextlib.closing(plain_chunks(path, key)) as chunks:
        for piece in chunks:
            head += piece
            if len(head) >= size:
                break
    return head[:size]


def segment_system_identifier(path: Path, key: EncryptionKey | None = None) -> int:
    """The system identifier in a WAL segment's first page (its long page header): which cluster wrote it.

    :param path: a WAL segment file, under a stored name (plain, ``.gz``, ``.lz4``, ``.zst``, ``.enc``).
    :param key: the archive's key, for an encrypted one.
    :raises NotWal: the file is too short or its first page has no long header.
    :raises KeyNeeded: it is encrypted and no key was given.
    :raises CryptError: it does not decrypt with ``key``.
    :raises DamagedFile: it does not decompress.
    :raises OSError: it cannot be read.
    """
    path = Path(path)
    return header_system_identifier(_head(path, LONG_HEADER.size, key), str(path))


def archived_segments(names: Iterable[str]) -> dict[str, str]:
    """The whole WAL segments among an archive's file names: segment name -> its stored name (as ``cp`` or
    ``wal-push`` left it; ``.partial``, history files, the identity file and temporary files are not).

    :param names: file names in the archive.
    """
    found: dict[str, str] = {}
    for stored in names:
        parsed = parse_stored_name(stored)
        if parsed is not None and re.fullmatch(WAL_NAME, parsed.name):
            found.setdefault(parsed.name, stored)
    return found


def archive_system_identifier(archive: Path, key: EncryptionKey | None = None) -> tuple[int, str] | None:
    """The system identifier of the cluster whose WAL ``archive`` holds, read from its oldest segment, and
    that segment's stored name; None when it holds no segment (an empty archive proves nothing).

    :param archive: the WAL archive folder.
    :param key: the archive's key, when its segments are encrypted.
    :raises NotWal: its oldest segment is not WAL.
    :raises KeyNeeded: its oldest segment is encrypted and no key was given.
    :raises CryptError: it does not decrypt with ``key``.
    :raises DamagedFile: it does not decompress.
    :raises OSError: the folder or the segment cannot be read.
    """
    segments = archived_segments(os.listdir(archive))
    if not segments:
        return None
    oldest = min(segments, key=lambda n: (wal_file_position(n), wal_file_timeline(n)))
    return segment_system_identifier(Path(archive) / segments[oldest], key), segments[oldest]


def backup_wal_names(
    copy_dir: Path,
    backup_label: str,
    stop_lsn: str,
    stop_timeline: int | None = None,
    timeline_history: str | None = None,
) -> list[str]:
    """The WAL segment file names the backup in ``copy_dir`` needs to become consistent, oldest first:
    those of each of its WAL ranges (:func:`~pg_safe_backup.files.manifest.backup_wal_ranges`), so a
    segment where the timeline changed is named on both timelines, as pg_verifybackup reads each.

    :param copy_dir: the copy (its global/pg_control gives the WAL segment size).
    :param backup_label: the label pg_backup_stop returned.
    :param stop_lsn: the backup's stop LSN.
    :param stop_timeline: the timeline it stopped on (default: the label's START TIMELINE).
    :param timeline_history: the history file of ``stop_timeline`` when it is not the start's.
    :raises ValueError: the label has no start, or the history does not lead from its timeline.
    """
    from pg_safe_backup.files.manifest import backup_wal_ranges
    from pg_safe_backup.files.pgcontrol import read_pg_control

    size = read_pg_control(Path(copy_dir)).xlog_seg_size
    # The major only chooses how a manifest prints LSNs; they are read back here.
    ranges = backup_wal_ranges(backup_label, stop_lsn, 13, stop_timeline, timeline_history)
    return [
        name
        for r in reversed(ranges)
        if r.start_lsn != r.end_lsn  # a range that ends where it begins needs no WAL
        for name in wal_segment_names(r.start_lsn, r.end_lsn, r.timeline, size)
    ]


def include_wal(
    copy_dir: Path,
    wal_archive: Path,
    *,
    backup_label: str,
    stop_lsn: str,
    stop_timeline: int | None = None,
    timeline_history: str | None = None,
    key: EncryptionKey | None = None,
    log: logging.Logger | Any = _log,
) -> list[str]:
    """Copy the WAL the backup needs from ``wal_archive`` into ``copy_dir``/pg_wal, fsynced.

    Each file is found under any of its stored names (:func:`find_stored`) and copied as PostgreSQL wrote
    it (decrypted, decompressed); each segment must be whole (the segment size). The last segment of a
    timeline that ended during the backup may be there only as the ``.partial`` file the promoted server
    archived: it holds that timeline's WAL up to the switch, all the backup needs of it, and is copied
    under the segment's own name (what pg_verifybackup reads). The history file of the stop's timeline
    must be there when the backup changed timeline. What is already in the copy's pg_wal/ under the same
    name is replaced, only once every file was read whole.

    :param copy_dir: the copy, with its global/pg_control.
    :param wal_archive: the folder archive_command copies WAL into.
    :param backup_label: the label pg_backup_stop returned.
    :param stop_lsn: the backup's stop LSN.
    :param stop_timeline: the timeline it stopped on (default: the label's START TIMELINE).
    :param timeline_history: the history file of ``stop_timeline`` when it is not the start's.
    :param key: the archive's encryption key, when ``wal-push`` encrypts it.
    :param log: where to say what was copied.
    :returns: the names of the files copied, segments first, then history files.
    :raises WalMissing: a file is missing from the archive or a segment is not whole; nothing was copied.
    :raises KeyNeeded: the archive is encrypted and no key was given; nothing was copied.
    :raises CryptError: a file does not decrypt with ``key``; nothing was copied.
    :raises ManifestError: the label has no start, or the history does not lead from its timeline.
    """
    from pg_safe_backup.files.manifest import ManifestError
    from pg_safe_backup.files.pgcontrol import read_pg_control

    copy_dir, wal_archive = Path(copy_dir), Path(wal_archive)
    segment_size = read_pg_control(copy_dir).xlog_seg_size
    try:
        names = backup_wal_names(copy_dir, backup_label, stop_lsn, stop_timeline, timeline_history)
    except ValueError as err:
        raise ManifestError(str(err)) from err
    # The last segment of each timeline that ended during the backup (the next one is on another).
    ends = {
        name
        for name, after in zip(names, names[1:], strict=False)
        if wal_file_timeline(name) != wal_file_timeline(after)
    }
    sources = {name: _archived(wal_archive, name, ended=name in ends) for name in names}
    timeline = wal_file_timeline(names[-1])
    history = [history_file_name(t) for t in range(2, timeline + 1)]
    if timeline != wal_file_timeline(names[0]) and find_stored(wal_archive, history[-1]) is None:
        raise WalMissing(
            f"the timeline history file {history[-1]}, which the backup needs to follow timeline {timeline},"
            f" is not in the archive {wal_archive}"
        )
    found = {name: find_stored(wal_archive, name) for name in history}
    history = [name for name, path in found.items() if path is not None]
    target = copy_dir / "pg_wal"
    (target / "archive_status").mkdir(parents=True, exist_ok=True)
    stage_wal({**sources, **{name: found[name] for name in history}}, target, key, segment_size)
    partial = [source.name for source in sources.values() if ".partial" in source.name]
    log.info(
        "copied %d WAL segments (%s .. %s)%s from %s into %s%s: the backup recovers without an archive",
        len(names),
        names[0],
        names[-1],
        f" and {', '.join(history)}" if history else "",
        wal_archive,
        target,
        f" ({', '.join(partial)} under its segment's name)" if partial else "",
    )
    return names + history


def stage_wal(
    sources: dict[str, Path], target: Path, key: EncryptionKey | None, segment_size: int | None
) -> None:
    """Write each source's plain bytes (:func:`plain_chunks`) into ``target`` under its archived name,
    fsynced: all under temporary names first, renamed only once every one was read whole, then the folder
    fsynced; on any error the temporary files are removed and nothing was renamed.

    :param sources: archived name (what it is written as) -> its stored file.
    :param target: an existing folder.
    :param key: the archive's key, for encrypted files.
    :param segment_size: every segment (a WAL file name) must be this many bytes; None: not checked.
    :raises WalMissing: a segment of another size.
    """
    staged: dict[str, Path] = {}
    try:
        for name, source in sources.items():
            partial = target / f".{name}.tmp"  # no WAL file name: a server ignores it
            staged[name] = partial
            with open(partial, "wb") as out:
                for piece in plain_chunks(source, key):
                    out.write(piece)
                out.flush()
                size = out.tell()
                os.fsync(out.fileno())
            if segment_size is not None and re.fullmatch(WAL_NAME, name) and size != segment_size:
                raise WalMissing(f"{source} holds {size} bytes, not a whole {segment_size}-byte WAL segment")
        for name, partial in staged.items():
            os.replace(partial, target / name)
        staged.clear()
    finally:
        for partial in staged.values():
            partial.unlink(missing_ok=True)
    fsync_path(target)


def _archived(wal_archive: Path, name: str, ended: bool) -> Path:
    """Where the archive holds segment ``name`` (any stored name): the segment, or (``ended``: the last
    segment of a timeline that ended during the backup) its ``.partial``.

    :raises WalMissing: neither is there.
    """
    source = find_stored(wal_archive, name)
    if source is None and ended:
        source = find_stored(wal_archive, f"{name}.partial")
    if source is None:
        raise WalMissing(f"WAL segment {name}, which the backup needs, is not in the archive {wal_archive}")
    return source
