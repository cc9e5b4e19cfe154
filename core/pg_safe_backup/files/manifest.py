"""Write a ``backup_manifest`` into a backup's copy, byte for byte as the server writes it.

After PostgreSQL's src/backend/backup/backup_manifest.c (the writer), src/common/parse_manifest.c (the
reader) and src/bin/pg_verifybackup/pg_verifybackup.c (what the verifier checks), so that
``pg_verifybackup`` accepts a file-system backup taken with pg_backup_start()/pg_backup_stop():

* one line per file of the copy, except what pg_verifybackup itself skips on disk
  (:data:`~pg_safe_backup.files.layout.MANIFEST_IGNORED`); links are followed, as its ``stat()`` does,
  so a tablespace is listed as ``pg_tblspc/<oid>/PG_<major>_<catversion>/...`` either way;
* ``Path`` when the name is valid UTF-8 (JSON-escaped like the server's ``escape_json``), else
  ``Encoded-Path`` (hex); ``Size``; ``Last-Modified`` (UTC); the checksum of the file's bytes;
* the WAL the backup needs to be consistent (``WAL-Ranges``, newest timeline first);
* ``Manifest-Checksum``: SHA-256 of every byte before its own line, which is the last.

Version 1 for PostgreSQL 13 to 16; version 2 (with the ``System-Identifier`` that pg_verifybackup
compares with global/pg_control) from 17. PostgreSQL 12 has none of its own: its copies get version 1,
the first format (what pg_verifybackup 13 and later read), so that they too prove themselves.
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol

from pg_safe_backup.errors import PermanentError
from pg_safe_backup.files.layout import BACKUP_INFO, CONTROL_FILE, MANIFEST_IGNORED
from pg_safe_backup.files.pgcontrol import crc32c
from pg_safe_backup.files.tablespaces import link_tablespace_copies
from pg_safe_backup.files.xlog import backup_start, format_lsn, parse_history, parse_lsn, timeline_at

MANIFEST_NAME = "backup_manifest"
#: Written first, then renamed to MANIFEST_NAME; never listed (one a crash left is overwritten).
MANIFEST_TMP = "backup_manifest.tmp"
#: Bytes per digest of each algorithm pg_verifybackup knows (pg_checksum_parse_type), "NONE" has none.
DIGEST_SIZES: dict[str, int] = {
    "NONE": 0,
    "CRC32C": 4,
    "SHA224": 28,
    "SHA256": 32,
    "SHA384": 48,
    "SHA512": 64,
}
#: Large reads: hashlib releases the GIL for them, so a few threads hash files side by side.
CHUNK = 1 << 20
_SHA = {"SHA224": "sha224", "SHA256": "sha256", "SHA384": "sha384", "SHA512": "sha512"}
#: Always given a checksum, whatever the manifest's algorithm: what proves a stored backup (proof.py).
LABEL_FILES = (b"backup_label", b"tablespace_map", b"global/pg_control")


class ManifestError(PermanentError, ValueError):
    """No manifest can be written for this copy (the message says why)."""


class ManifestUnsupported(ManifestError):
    """The server's major version is older than any this package backs up (before 12)."""


@dataclass(frozen=True)
class WalRange:
    """The WAL of one timeline that a backup needs: ``Start-LSN`` to ``End-LSN`` (``X/Y`` text)."""

    timeline: int
    start_lsn: str
    end_lsn: str


@dataclass(frozen=True)
class ManifestSummary:
    """What :func:`write_manifest` wrote."""

    path: Path
    version: int
    checksum_algorithm: str
    files: int  # files listed
    bytes: int  # their total size
    hashed_bytes: int  # bytes read here (files whose checksum was not given)
    seconds: float
    checksum: str  # its Manifest-Checksum


def manifest_version(major: int) -> int:
    """The manifest version the server of ``major`` writes: 1 for 13 to 16, 2 from 17; 1 for a copy of 12,
    which writes none of its own (the first format: a backup proves itself from its manifest).

    :param major: the server's major version (12, 13, ...).
    :raises ManifestUnsupported: before 12, which this package does not back up.
    """
    if major < 12:
        raise ManifestUnsupported(f"PostgreSQL {major} is older than 12: no backup_manifest is written")
    return 1 if major < 17 else 2


def manifest_lsn(lsn: int, major: int) -> str:
    """``lsn`` as the server of ``major`` prints it in a manifest: ``%X/%X``, zero-padded (``%X/%08X``)
    from 19, where LSN_FORMAT_ARGS' users changed.

    :param lsn: the LSN as an integer.
    :param major: the server's major version.
    """
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:08X}" if major >= 19 else format_lsn(lsn)


def wal_ranges_for(
    start_lsn: str, start_tli: int, end_lsn: str, end_tli: int, history_text: str | None, major: int = 13
) -> list[WalRange]:
    """The ``WAL-Ranges`` of a backup, newest timeline first, as AddWALInfoToBackupManifest() computes them.

    :param start_lsn: the backup's start (the label's START WAL LOCATION).
    :param start_tli: the timeline it started on (START TIMELINE).
    :param end_lsn: the backup's stop LSN.
    :param end_tli: the timeline it ended on.
    :param history_text: the content of ``<end_tli>.history`` (``tli<TAB>switchpoint<TAB>reason`` lines);
        needed only when the timelines differ.
    :param major: the server's major version (how LSNs are printed).
    :raises ValueError: the timelines differ and the history is missing, or does not lead from start_tli.
    """
    start, end = parse_lsn(start_lsn), parse_lsn(end_lsn)
    if start_tli == end_tli:
        return [WalRange(end_tli, manifest_lsn(start, major), manifest_lsn(end, major))]
    if not history_text:
        raise ValueError(
            f"the backup started on timeline {start_tli} and ended on {end_tli}: the WAL ranges need the"
            f" timeline history file of {end_tli}"
        )
    ranges = []
    for tli, begin, tl_end in parse_history(history_text, end_tli):
        if tl_end is not None and tl_end < start:
            continue  # ended before the backup started
        if not ranges and tli != end_tli:
            raise ValueError(f"expected end timeline {end_tli} but found timeline {tli}")
        if tli != start_tli and begin == 0:
            raise ValueError(f"expected start timeline {start_tli} but found timeline {tli}")
        ranges.append(
            WalRange(tli, manifest_lsn(start if tli == start_tli else begin, major), manifest_lsn(end, major))
        )
        if tli == start_tli:
            return ranges
        end = begin
    raise ValueError(f"start timeline {start_tli} not found in history of timeline {end_tli}")


def escape_json(text: str) -> str:
    """``text`` as a JSON string literal, escaped as PostgreSQL's escape_json() does it.

    :param text: the string.
    """
    out = ['"']
    for ch in text:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ch < " ":
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


_ESCAPES = {"\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t", '"': '\\"', "\\": "\\\\"}


class _Crc32c:
    """CRC-32C with hashlib's update()/digest() face. digest() is in the host's byte order, as
    pg_checksum_final() memcpy()s the uint32: little-endian on x86 and ARM, NOT the big-endian
    order a CRC is usually printed in.

    Pure Python (no C library is required): far slower than SHA-256, which is the default for that
    reason.
    """

    def __init__(self) -> None:
        self.value = 0

    def update(self, data: bytes | memoryview) -> None:
        self.value = crc32c(bytes(data), self.value)

    def digest(self) -> bytes:
        return struct.pack("=I", self.value)


class _Hash(Protocol):
    def update(self, data: bytes | memoryview, /) -> None: ...
    def digest(self) -> bytes: ...


def _hasher(algorithm: str) -> Callable[[], _Hash]:
    if algorithm == "CRC32C":
        return _Crc32c
    return lambda: hashlib.new(_SHA[algorithm])


@dataclass(frozen=True)
class FileEntry:
    """One file a manifest lists."""

    relpath: bytes  # '/'-separated, relative to the data directory
    path: bytes  # where the file is on disk


def _walk(
    top: bytes, rel: bytes, skip: AbstractSet[bytes], seen: set[tuple[int, int]], out: list[FileEntry]
) -> None:
    """Every regular file under ``top`` (links followed), its path relative to the data directory
    prefixed with ``rel``."""
    st = os.stat(top)
    if (st.st_dev, st.st_ino) in seen:
        raise ManifestError(f"{os.fsdecode(top)}: a link loop (a folder reached twice)")
    seen.add((st.st_dev, st.st_ino))
    with os.scandir(top) as entries:
        for entry in entries:
            relpath = rel + entry.name if not rel else rel + b"/" + entry.name
            if relpath in skip:
                continue
            try:
                is_dir, is_file = entry.is_dir(), entry.is_file()  # both follow links, as stat() does
            except OSError as exc:
                raise ManifestError(f"cannot stat {os.fsdecode(entry.path)}: {exc}") from exc
            if is_dir:
                _walk(entry.path, relpath, skip, seen, out)
            elif is_file:
                out.append(FileEntry(relpath, entry.path))
            else:
                # pg_verifybackup reports it ("is not a regular file or directory"): a broken link,
                # a socket or a FIFO has no place in a backup.
                raise ManifestError(f"{os.fsdecode(entry.path)} is not a regular file or directory")


def list_files(copy_dir: Path, tablespaces: Mapping[int | str, Path] | None = None) -> list[FileEntry]:
    """The files a manifest of ``copy_dir`` lists, in the order it lists them.

    Sorted by path, ``global/pg_control`` last (as a base backup sends it last).

    :param copy_dir: the copy of the data directory.
    :param tablespaces: OID -> folder holding that tablespace's copy, for a tablespace kept outside
        ``copy_dir/pg_tblspc/<oid>`` (which is then not read); its files are listed as
        ``pg_tblspc/<oid>/...``.
    """
    spaces = {str(oid).encode(): os.fsencode(folder) for oid, folder in (tablespaces or {}).items()}
    skip = {name.encode() for name in (*MANIFEST_IGNORED, MANIFEST_TMP, BACKUP_INFO)} | {
        b"pg_tblspc/" + oid for oid in spaces
    }
    out: list[FileEntry] = []
    seen: set[tuple[int, int]] = set()
    _walk(os.fsencode(copy_dir), b"", skip, seen, out)
    for oid, folder in spaces.items():
        if not os.path.isdir(folder):
            raise ManifestError(f"tablespace {oid.decode()}: {os.fsdecode(folder)} is not a folder")
        _walk(folder, b"pg_tblspc/" + oid, skip, seen, out)
    control = CONTROL_FILE.encode()
    out.sort(key=lambda e: (e.relpath == control, e.relpath))
    return out


def _algorithm_of(relpath: bytes, algorithm: str) -> str:
    """The checksum algorithm of one file: the manifest's, but SHA256 for the label files and pg_control
    when it is NONE, so a backup can still prove its label and its cluster (a per-file Checksum-Algorithm
    is valid for pg_verifybackup)."""
    return "SHA256" if algorithm == "NONE" and relpath in LABEL_FILES else algorithm


def _path_field(relpath: bytes) -> str:
    try:
        return f'"Path": {escape_json(relpath.decode("utf-8"))}'
    except UnicodeDecodeError:
        # The manifest is UTF-8: the server hex-encodes a name that is not (pg_verify_mbstr()).
        return f'"Encoded-Path": "{relpath.hex()}"'


def _checksum_file(entry: FileEntry, new_hash: Callable[[], _Hash] | None) -> tuple[os.stat_result, str]:
    """The file's stat and hex digest (empty without ``new_hash``), both from one open file."""
    if new_hash is None:
        return os.stat(entry.path), ""
    digest = new_hash()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    read = 0
    with open(entry.path, "rb", buffering=0) as f:
        st = os.fstat(f.fileno())
        while n := f.readinto(buf):
            digest.update(view[:n])
            read += n
    if read != st.st_size:
        raise ManifestError(
            f"{os.fsdecode(entry.path)} changed while it was read ({read} bytes read, {st.st_size} stated)"
        )
    return st, digest.digest().hex()


def _file_line(relpath: bytes, size: int, mtime_ns: int, algorithm: str, checksum: str) -> str:
    # pg_gmtime() of the whole seconds of the file's mtime, printed with %Z: always "GMT".
    modified = time.strftime("%Y-%m-%d %H:%M:%S GMT", time.gmtime(mtime_ns // 1_000_000_000))
    line = f'{{ {_path_field(relpath)}, "Size": {size}, "Last-Modified": "{modified}"'
    if algorithm != "NONE":
        line += f', "Checksum-Algorithm": "{algorithm}", "Checksum": "{checksum}"'
    return line + " }"


def render_manifest(
    version: int,
    system_identifier: int | str | None,
    file_lines: Sequence[str],
    wal_ranges: Sequence[WalRange],
) -> bytes:
    """The whole manifest, its checksum line included.

    :param version: 1 or 2.
    :param system_identifier: the cluster's (required by version 2).
    :param file_lines: one ``{ "Path": ... }`` object per file.
    :param wal_ranges: the WAL-Ranges, newest timeline first.
    """
    if version == 2 and system_identifier is None:
        raise ManifestError("a version 2 manifest (PostgreSQL 17+) needs the cluster's system identifier")
    if not wal_ranges:
        raise ManifestError("a manifest needs at least one WAL range")
    head = f'{{ "PostgreSQL-Backup-Manifest-Version": {version},\n'
    if version == 2:
        # uint64 (UINT64_FORMAT): a negative bigint from pg_control_system() wraps.
        head += f'"System-Identifier": {int(system_identifier) % (1 << 64)},\n'
    head += '"Files": ['
    files = "".join(("\n" if i == 0 else ",\n") + line for i, line in enumerate(file_lines))
    ranges = ",\n".join(
        f'{{ "Timeline": {r.timeline}, "Start-LSN": "{r.start_lsn}", "End-LSN": "{r.end_lsn}" }}'
        for r in wal_ranges
    )
    body = (head + files + '\n],\n"WAL-Ranges": [\n' + ranges + "\n],\n").encode("utf-8")
    return body + b'"Manifest-Checksum": "' + hashlib.sha256(body).hexdigest().encode() + b'"}\n'


def _check_given(checksums: Mapping[str, str], algorithm: str) -> dict[bytes, str]:
    size = DIGEST_SIZES[algorithm] * 2
    given = {}
    for relpath, digest in checksums.items():
        digest = digest.lower()
        if len(digest) != size or any(c not in "0123456789abcdef" for c in digest):
            raise ManifestError(
                f"the given {algorithm} checksum of {relpath} is not {size} hex digits: {digest!r}"
            )
        given[os.fsencode(relpath)] = digest
    return given


def write_manifest(
    copy_dir: Path,
    *,
    major: int,
    system_identifier: int | str | None,
    wal_ranges: Sequence[WalRange],
    checksum_algorithm: str = "SHA256",
    checksums: Mapping[str, str] | None = None,
    tablespaces: Mapping[int | str, Path] | None = None,
    threads: int | None = None,
) -> ManifestSummary:
    """Write ``copy_dir/backup_manifest`` for the copy as it is now; atomically (a temporary file renamed),
    and synced to disk.

    Run it after everything is in the copy, backup_label and tablespace_map included: a file added
    later is reported by pg_verifybackup as not in the manifest.

    :param copy_dir: the copy of the data directory (a local folder).
    :param major: the backed up server's major version: chooses the manifest version.
    :param system_identifier: the backed up cluster's (written from 17 on, where pg_verifybackup compares
        it with the copy's global/pg_control).
    :param wal_ranges: the WAL the backup needs (:func:`wal_ranges_for`), newest timeline first.
    :param checksum_algorithm: SHA256 (default), SHA224, SHA384, SHA512, CRC32C (pure Python here: slow)
        or NONE.
    :param checksums: relative path (``/``-separated) -> hex digest of ``checksum_algorithm`` computed
        while copying: those files are not read again (their size and time still come from ``stat``).
    :param tablespaces: OID -> folder, for tablespaces copied outside ``copy_dir/pg_tblspc/<oid>``
        (see :func:`list_files`).
    :param threads: files hashed side by side (default: up to 4, by CPU count).
    :raises ManifestUnsupported: ``major`` is older than 12.
    :raises ManifestError: the copy cannot be described (see the message); no manifest is written.
    """
    began = time.monotonic()
    version = manifest_version(major)
    algorithm = checksum_algorithm.upper()
    if algorithm not in DIGEST_SIZES:
        raise ManifestError(
            f"unknown checksum algorithm {checksum_algorithm!r}: one of {', '.join(DIGEST_SIZES)}"
        )
    if version == 2 and system_identifier is None:
        raise ManifestError(
            f"a PostgreSQL {major} manifest (version 2) needs the cluster's system identifier"
        )
    given = _check_given(checksums or {}, algorithm)
    entries = list_files(Path(copy_dir), tablespaces)

    def one(entry: FileEntry) -> tuple[os.stat_result, str, int]:
        if entry.relpath in given and _algorithm_of(entry.relpath, algorithm) == algorithm:
            return os.stat(entry.path), given[entry.relpath], 0
        file_algorithm = _algorithm_of(entry.relpath, algorithm)
        new_hash = None if file_algorithm == "NONE" else _hasher(file_algorithm)
        st, digest = _checksum_file(entry, new_hash)
        return st, digest, st.st_size if new_hash else 0

    workers = threads or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(one, entries))
    lines = [
        _file_line(e.relpath, st.st_size, st.st_mtime_ns, _algorithm_of(e.relpath, algorithm), digest)
        for e, (st, digest, _) in zip(entries, results, strict=True)
    ]
    content = render_manifest(version, system_identifier, lines, wal_ranges)
    path = Path(copy_dir) / MANIFEST_NAME
    write_atomically(path, content)
    return ManifestSummary(
        path=path,
        version=version,
        checksum_algorithm=algorithm,
        files=len(entries),
        bytes=sum(st.st_size for st, _, _ in results),
        hashed_bytes=sum(n for _, _, n in results),
        seconds=time.monotonic() - began,
        checksum=manifest_checksum(content),
    )


def write_atomically(path: Path, content: bytes, tmp_name: str = MANIFEST_TMP) -> None:
    """Write ``content`` to ``path`` through a temporary file beside it, renamed once synced, then the
    folder synced: a reader sees the old file or the whole new one. Mode and owner follow the copy's
    PG_VERSION (the data directory's), so a restore run as the server's user can read it.

    :param path: the file to write.
    :param content: its bytes.
    :param tmp_name: the temporary file's name (one a crash left is overwritten).
    """
    tmp = path.with_name(tmp_name)
    like = path.parent / "PG_VERSION"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "wb", closefd=False) as f:
                f.write(content)
                f.flush()
            if like.exists():
                st = like.stat()
                os.fchmod(fd, st.st_mode & 0o777)
                if os.geteuid() == 0:
                    os.fchown(fd, st.st_uid, st.st_gid)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


__all__ = [
    "DIGEST_SIZES",
    "FileEntry",
    "FileRecord",
    "MANIFEST_TMP",
    "MANIFEST_NAME",
    "ManifestError",
    "ManifestSummary",
    "ManifestUnsupported",
    "WalRange",
    "backup_manifest_of_records",
    "backup_wal_ranges",
    "escape_json",
    "manifest_checksum",
    "manifest_lsn",
    "manifest_of_records",
    "list_files",
    "manifest_version",
    "render_manifest",
    "timeline_at",
    "wal_ranges_for",
    "write_backup_manifest",
    "write_manifest",
    "write_atomically",
    "write_manifest_file",
]


def write_backup_manifest(
    copy_dir: Path,
    *,
    backup_label: str,
    stop_lsn: str,
    system_identifier: int | str | None,
    checksum_algorithm: str = "SHA256",
    checksums: Mapping[str, str] | None = None,
    stop_timeline: int | None = None,
    timeline_history: str | None = None,
) -> ManifestSummary:
    """Write the backup_manifest of a stored backup: the copy with its label files, and its tablespaces.

    The copy's ``pg_tblspc/<oid>`` links are first pointed at the tablespaces' copies
    (:func:`~pg_safe_backup.files.tablespaces.link_tablespace_copies`): a manifest never describes a live
    tablespace. The WAL ranges run from the label's START WAL LOCATION to ``stop_lsn``, one per timeline
    (see :func:`backup_wal_ranges`).

    :param copy_dir: the copy, with backup_label and tablespace_map already in it.
    :param backup_label: the label pg_backup_stop returned.
    :param stop_lsn: the backup's stop LSN.
    :param system_identifier: the backed up cluster's (required from PostgreSQL 17).
    :param checksum_algorithm: see :func:`write_manifest`.
    :param checksums: see :func:`write_manifest`.
    :param stop_timeline: see :func:`backup_wal_ranges`.
    :param timeline_history: see :func:`backup_wal_ranges`.
    :raises ManifestUnsupported: a major older than 12.
    :raises ManifestError: the copy cannot be described.
    :raises TablespaceNotCopied: a tablespace of the backup has no copy.
    """
    copy_dir = Path(copy_dir)
    major = int((copy_dir / "PG_VERSION").read_text().strip())
    wal_ranges = backup_wal_ranges(backup_label, stop_lsn, major, stop_timeline, timeline_history)
    tablespaces = link_tablespace_copies(copy_dir)
    return write_manifest(
        copy_dir,
        major=major,
        system_identifier=system_identifier,
        wal_ranges=wal_ranges,
        checksum_algorithm=checksum_algorithm,
        checksums=checksums,
        tablespaces=tablespaces,
    )


def backup_wal_ranges(
    backup_label: str,
    stop_lsn: str,
    major: int,
    stop_timeline: int | None = None,
    timeline_history: str | None = None,
) -> list[WalRange]:
    """The WAL-Ranges of a backup, newest timeline first: from the label's START WAL LOCATION on its START
    TIMELINE to ``stop_lsn`` on ``stop_timeline``, one range per timeline of ``timeline_history`` between
    (a standby whose upstream was promoted during the backup follows it onto the new timeline).

    :param backup_label: the label pg_backup_stop returned.
    :param stop_lsn: the backup's stop LSN.
    :param major: the server's major version.
    :param stop_timeline: the timeline the backup stopped on (default: the start's; a backup of a primary
        always stops on the timeline it started on).
    :param timeline_history: the history file of ``stop_timeline``, needed when it is not the start's.
    :raises ManifestError: the label has no start, or the history does not lead from the start's timeline.
    """
    try:
        start, timeline = backup_start(backup_label)
        return wal_ranges_for(start, timeline, stop_lsn, stop_timeline or timeline, timeline_history, major)
    except ValueError as err:
        raise ManifestError(f"the WAL ranges of this backup: {err}") from err


class FileRecord(NamedTuple):
    """One file of a copy as its copier recorded it (:class:`~pg_safe_backup.files.copier.CopyResult`):
    all a manifest lists of it, so a copy that is not local (an object store, tar archives) is not read."""

    size: int  # the bytes stored (a tar member's, padding included)
    mtime_ns: int  # the source's modification time
    sha256: str  # hex, of the bytes stored


def _listed(relpath: str) -> bool:
    """Whether a manifest lists ``relpath``: not what pg_verifybackup passes over (nor anything in it)."""
    return not any(
        relpath == name or relpath.startswith(name + "/")
        for name in (*MANIFEST_IGNORED, MANIFEST_TMP, BACKUP_INFO)
    )


def manifest_of_records(
    records: Mapping[str, FileRecord],
    *,
    major: int,
    system_identifier: int | str | None,
    wal_ranges: Sequence[WalRange],
    checksum_algorithm: str = "SHA256",
) -> bytes:
    """The manifest of a copy described by ``records`` alone, as :func:`write_manifest` would write it
    of the same files on disk (same order, same lines): nothing is read.

    :param records: backup path (``/``-separated) -> :class:`FileRecord`, label files included.
    :param major: the server's major version.
    :param system_identifier: the cluster's (required from 17).
    :param wal_ranges: the WAL the backup needs, newest timeline first.
    :param checksum_algorithm: SHA256 (the records') or NONE.
    :raises ManifestUnsupported: a major older than 12.
    :raises ManifestError: another algorithm, or a malformed checksum.
    """
    version = manifest_version(major)
    algorithm = checksum_algorithm.upper()
    if algorithm not in ("SHA256", "NONE"):
        raise ManifestError(
            f"a manifest of a copy that is not read back has SHA256 or NONE checksums, not {algorithm!r}"
        )
    given = _check_given({path: r.sha256 for path, r in records.items()}, "SHA256")
    paths = sorted((p for p in records if _listed(p)), key=lambda p: (p == CONTROL_FILE, os.fsencode(p)))
    lines = []
    for path in paths:
        relpath = os.fsencode(path)
        lines.append(
            _file_line(
                relpath,
                records[path].size,
                records[path].mtime_ns,
                _algorithm_of(relpath, algorithm),
                given[relpath],
            )
        )
    return render_manifest(version, system_identifier, lines, wal_ranges)


def backup_manifest_of_records(
    records: Mapping[str, FileRecord],
    *,
    label_files: Mapping[str, str | None],
    stop_lsn: str,
    system_identifier: int | str | None,
    major: int,
    checksum_algorithm: str = "SHA256",
    stop_timeline: int | None = None,
    timeline_history: str | None = None,
) -> bytes:
    """The backup_manifest of a stored backup whose copy is described by ``records`` (an object store's,
    or tar archives): its files, plus the label files as stored (UTF-8), written now.

    :param records: the copier's records of the copy.
    :param label_files: ``backup_label`` and ``tablespace_map`` as stored (None or empty: not stored).
    :param stop_lsn: the backup's stop LSN.
    :param system_identifier: the cluster's (required from 17).
    :param major: the server's major version.
    :param checksum_algorithm: SHA256 or NONE.
    :param stop_timeline: see :func:`backup_wal_ranges`.
    :param timeline_history: see :func:`backup_wal_ranges`.
    :raises ManifestUnsupported: a major older than 12.
    :raises ManifestError: the label has no start, or see :func:`manifest_of_records`.
    """
    now = time.time_ns()
    everything = dict(records)
    for name, text in label_files.items():
        if text:
            data = text.encode("utf-8")
            everything[name] = FileRecord(len(data), now, hashlib.sha256(data).hexdigest())
    return manifest_of_records(
        everything,
        major=major,
        system_identifier=system_identifier,
        wal_ranges=backup_wal_ranges(
            label_files["backup_label"] or "", stop_lsn, major, stop_timeline, timeline_history
        ),
        checksum_algorithm=checksum_algorithm,
    )


def manifest_checksum(content: bytes) -> str:
    """The ``Manifest-Checksum`` of a manifest (its last line).

    :param content: the manifest.
    :raises ManifestError: it has none.
    """
    last = content.rstrip(b"\n").rsplit(b"\n", 1)[-1]
    found = re.fullmatch(rb'"Manifest-Checksum": "([0-9a-f]{64})"\}', last)
    if not found:
        raise ManifestError("the manifest's last line is not its Manifest-Checksum")
    return found.group(1).decode()


def write_manifest_file(folder: Path, content: bytes) -> Path:
    """Write ``content`` as ``folder/backup_manifest``, atomically, synced (see :func:`write_manifest`).

    :param folder: a local folder (a copy, or tar archives).
    :returns: the manifest's path.
    """
    path = Path(folder) / MANIFEST_NAME
    write_atomically(path, content)
    return path


def add_to_manifest(
    content: bytes, relpath: str, data: bytes, mtime_ns: int, algorithm: str = "SHA256"
) -> bytes:
    """``content`` (a manifest, e.g. pg_basebackup's) with the file ``relpath`` listed first, and its
    Manifest-Checksum made anew: the file written beside what the server sent is proven like the rest.

    :param content: the manifest.
    :param relpath: the file's path in the backup (e.g. ``tablespace_map``).
    :param data: its bytes.
    :param mtime_ns: its modification time.
    :param algorithm: its checksum's algorithm.
    :raises ManifestError: ``content`` is not a manifest with a Files list and a checksum, or lists the file.
    """
    manifest_checksum(content)  # raises for what is not a whole manifest
    head, sep, rest = content.partition(b'"Files": [\n')
    if not sep:
        raise ManifestError("the manifest has no Files list")
    if _path_field(relpath.encode()).encode() + b"," in rest:
        raise ManifestError(f"the manifest lists {relpath} already")
    digest = _hasher(algorithm)()
    digest.update(data)
    line = _file_line(relpath.encode(), len(data), mtime_ns, algorithm, digest.digest().hex())
    body = head + sep + line.encode() + b",\n" + rest[: rest.rindex(b'"Manifest-Checksum": "')]
    return body + b'"Manifest-Checksum": "' + hashlib.sha256(body).hexdigest().encode() + b'"}\n'
