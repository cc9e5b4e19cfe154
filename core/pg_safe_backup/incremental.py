"""Incremental backups chained to a full of ours (PostgreSQL 17+): take one, find its chain, combine it.

A full backup of this project carries a version 2 ``backup_manifest`` (PostgreSQL 17+), which the server
accepts as the parent of ``pg_basebackup --incremental``: only the blocks changed since the parent's start
are copied (the server reads them from its WAL summaries, ``summarize_wal = on``). The incremental is laid
out like our fulls: each tablespace as a real folder ``pg_tblspc/<oid>/PG_...`` (pg_basebackup writes it
beside the backup, we move it in), with a ``tablespace_map`` that the backup's manifest lists. Its label's
``INCREMENTAL FROM LSN / TLI`` lines name its parent's start; the manifest proves the label, so the chain is
proven by the backups' own files (:meth:`pg_safe_backup.proof.Proof.follows`). The catalog entry records the
parent's folder and Manifest-Checksum: where to look first, and which of two backups starting at one LSN
it was.

A chain restores through ``pg_combinebackup`` (the backup's major's; a clear error when absent) into a
folder that is then restored as a plain backup (:func:`pg_safe_backup.restore.prepare_restore`).

Airflow-free: the operator (:mod:`pg_safe_backup.operators.incremental`) and the CLI call it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from psycopg.conninfo import make_conninfo

from pg_safe_backup.catalog import (
    CatalogEntry,
    CatalogError,
    info_for_backup,
    list_backups,
    parent_finder,
    read_info,
    write_info,
)
from pg_safe_backup.errors import PermanentError, TransientError
from pg_safe_backup.files.copier import is_local_path
from pg_safe_backup.files.layout import Entry
from pg_safe_backup.files.manifest import (
    MANIFEST_NAME,
    add_to_manifest,
    write_atomically,
    write_manifest_file,
)
from pg_safe_backup.files.objects import close_durably, open_for_writing, upload_tree
from pg_safe_backup.files.tablespaces import escape_map_path
from pg_safe_backup.files.walheader import fsync_path
from pg_safe_backup.files.xlog import format_lsn, parse_lsn
from pg_safe_backup.hooks.server import IncrementalFacts, pinned_conninfo
from pg_safe_backup.proof import LABEL_NAME, MAP_NAME, Proof, prove_backup

_log = logging.getLogger(__name__)

#: The first major with incremental backups.
FIRST_MAJOR = 17
#: The fix of most refusals.
NEW_FULL = "take a new full backup"


class IncrementalRefused(PermanentError, ValueError):
    """An incremental backup cannot be taken, or a chain cannot be restored, as things are: the message names
    the fix (often: take a new full backup)."""


class ChainBroken(IncrementalRefused):
    """A backup of the chain is missing or no longer proves itself: the missing link is named."""


class IncrementalFailed(TransientError, RuntimeError):
    """pg_basebackup or pg_combinebackup failed for a reason a retry may get past (the server unreachable, a
    time limit)."""


@dataclass(frozen=True)
class Link:
    """One backup of a chain: its folder and what it proves."""

    folder: Any  # a local Path, or an object-store path
    proof: Proof


# ----------------------------------------------------------------------------------------- the programs
def client_program(name: str, major: int, bindir: Path | str | None = None) -> Path:
    """``name`` (pg_basebackup, pg_combinebackup) of PostgreSQL ``major``: from ``bindir``, $PG_BINDIR,
    Debian's folder of that major, or PATH, the first whose ``--version`` is of ``major``.

    :param name: the program.
    :param major: the backup's major version.
    :param bindir: a folder to look in first (``--bindir``).
    :raises IncrementalRefused: none of that major is installed.
    """
    places: list[Path] = [Path(bindir)] if bindir else []
    if os.environ.get("PG_BINDIR"):
        places.append(Path(os.environ["PG_BINDIR"]))
    places.append(Path(f"/usr/lib/postgresql/{major}/bin"))
    with_path = shutil.which(name)
    if with_path:
        places.append(Path(with_path).parent)
    seen = []
    for folder in dict.fromkeys(places):
        program = folder / name
        if program.is_file() and os.access(program, os.X_OK):
            found = _major_of(program)
            if found == major:
                return program
            seen.append(f"{program} is {found or 'of an unknown version'}")
    looked = ", ".join(str(p) for p in dict.fromkeys(places))
    also = f" ({'; '.join(seen)})" if seen else ""
    raise IncrementalRefused(
        f"{name} of PostgreSQL {major} not found in {looked}{also}: install PostgreSQL {major}'s client"
        " programs or give their folder (--bindir, bindir=)"
    )


def _major_of(program: Path) -> int | None:
    try:
        out = subprocess.run([str(program), "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"\(PostgreSQL\) (\d+)", out)
    return int(found.group(1)) if found else None


# ------------------------------------------------------------------------------------------- the parent
def usable_parent(entry: CatalogEntry) -> str | None:
    """Why ``entry`` cannot be an incremental's parent (None: it can): it must prove itself, be a plain copy
    (local or in an object store), not encrypted, not failed by its newest check, with a version 2 manifest
    (PostgreSQL 17+: its System-Identifier)."""
    proof = entry.proof
    if not proof.ok:
        return proof.status
    if proof.format != "plain":
        return f"a {proof.format} backup"
    if entry.info is not None and entry.info.encryption_key_id:
        return "encrypted"
    if entry.failed:
        return "its newest check FAILED"
    manifest = entry.folder / MANIFEST_NAME
    if not manifest.exists():
        return f"no plain {MANIFEST_NAME}"
    if proof.system_identifier is None or b'"System-Identifier"' not in manifest.read_bytes()[:200]:
        return f"its {MANIFEST_NAME} is version 1 (PostgreSQL 16 or earlier)"
    return None


def find_parent(root: Path, system_identifier: str) -> CatalogEntry:
    """The newest backup of the cluster ``system_identifier`` under ``root`` (by proven stop LSN): the
    parent of the next incremental, a full of ours or an incremental.

    :param root: the folder of the cluster's backups.
    :param system_identifier: the live cluster's.
    :raises IncrementalRefused: no backup of the cluster under ``root`` proves itself, or the newest cannot be
        a parent (the reason named).
    """
    entries = [e for e in list_backups(root) if e.proof.ok and e.proof.system_identifier == system_identifier]
    if not entries:
        raise IncrementalRefused(
            f"root: no backup of this cluster (system identifier {system_identifier}) under {root} proves"
            f" itself: {NEW_FULL} first"
        )
    newest = entries[-1]
    why = usable_parent(newest)
    if why:
        raise IncrementalRefused(
            f"root: the newest backup under {root}, {newest.name}, cannot be a parent ({why}): {NEW_FULL}"
        )
    return newest


def check_ready(facts: IncrementalFacts, parent: CatalogEntry, role: str = "the backup role") -> None:
    """Refuse, before anything is taken, what would make the server refuse the incremental.

    :param facts: the live server's (:func:`pg_safe_backup.hooks.server.incremental_facts`).
    :param parent: the backup to take it against (:func:`find_parent`).
    :param role: how messages name the connecting role.
    :raises IncrementalRefused: the first condition not met, with its fix.
    """
    major = facts.server_version // 10000
    if major < FIRST_MAJOR:
        raise IncrementalRefused(
            f"incremental backups need PostgreSQL {FIRST_MAJOR} or later; the server is {major}:"
            " take full backups"
        )
    if facts.summarize_wal != "on":
        raise IncrementalRefused(
            f"summarize_wal is {facts.summarize_wal}: as a superuser run ALTER SYSTEM SET summarize_wal = on;"
            f" SELECT pg_reload_conf(); then {NEW_FULL} (an incremental needs the WAL summaries since its"
            " full started)"
        )
    if not facts.may_replicate:
        raise IncrementalRefused(
            f"{role} has no REPLICATION: ALTER ROLE ... REPLICATION, and a pg_hba.conf line for the"
            " replication pseudo-database (pg_basebackup takes the incremental over a replication connection)"
        )
    why = usable_parent(parent)
    if why:
        raise IncrementalRefused(f"{parent.name} cannot be a parent ({why}): {NEW_FULL}")
    proof = parent.proof
    if proof.system_identifier != facts.system_identifier:
        raise IncrementalRefused(
            f"{parent.name} is a backup of another cluster ({proof.system_identifier}; the server is"
            f" {facts.system_identifier})"
        )
    assert proof.start_lsn is not None  # a proven backup's
    on_its_timeline = [s for s in facts.summaries or [] if s[0] == proof.start_tli]
    if facts.summaries is not None and on_its_timeline:
        first = min(s[1] for s in on_its_timeline)
        if first > parse_lsn(proof.start_lsn):
            raise IncrementalRefused(
                f"the WAL summaries begin at {format_lsn(first)}, after {parent.name} started"
                f" ({proof.start_lsn}): summarize_wal was off then, or wal_summary_keep_time removed them:"
                f" {NEW_FULL}"
            )
    elif facts.summaries is not None and proof.start_tli == _current_timeline(facts):
        raise IncrementalRefused(
            f"no WAL summaries on timeline {proof.start_tli} since {parent.name} started ({proof.start_lsn}):"
            f" summarize_wal was off then: {NEW_FULL}"
        )


def _current_timeline(facts: IncrementalFacts) -> int | None:
    return max((s[0] for s in facts.summaries or []), default=None)


# ------------------------------------------------------------------------------------------- the taking
#: pg_basebackup's and the server's refusals (any of the words), and what to do (the first match wins).
_CHANGED = f"the parent's {MANIFEST_NAME} was changed: {NEW_FULL}"
_HINTS: tuple[tuple[tuple[str, ...], str], ...] = (
    (
        ("pg_hba.conf rejects replication", "no pg_hba.conf entry for replication"),
        "add a pg_hba.conf line for the replication pseudo-database for this role and host, then SELECT"
        " pg_reload_conf()",
    ),
    (("replication role", "permission denied to start WAL sender"), "ALTER ROLE ... REPLICATION"),
    (("cannot be taken unless WAL summarization is enabled",), f"set summarize_wal = on, then {NEW_FULL}"),
    (("system identifier in backup manifest",), f"the parent is another cluster's backup: {NEW_FULL}"),
    (("manifest version 1 does not support",), f"the parent's manifest is version 1: {NEW_FULL} on 17+"),
    (("manifest checksum", "manifest has no checksum"), _CHANGED),
    (("not in this server's history",), f"the parent is on a timeline this server never had: {NEW_FULL}"),
    (
        ("WAL summaries are required",),
        "the WAL summaries since the parent started are gone or incomplete"
        f" (summarize_wal was off, or wal_summary_keep_time removed them): {NEW_FULL}",
    ),
    (("manifest requires WAL",), f"the parent does not lead to this server's WAL: {NEW_FULL}"),
)
#: What a retry may get past: the server unreachable.
_TRANSIENT = ("could not connect", "connection to server", "server closed the connection", "timeout expired")


def _refusal(program: str, stderr: str, where: str) -> PermanentError | TransientError:
    """One line of a failed program's stderr (its last error), with the fix when known."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line or "FATAL:" in line or "ERROR:" in line]
    said = (errors or lines or ["no message"])[-1]
    said = re.sub(r"^\S+: error: ", "", said)
    for needles, fix in _HINTS:
        if any(needle in stderr for needle in needles):
            return IncrementalRefused(f"{program} refused {where}: {said}: {fix}")
    if any(needle in stderr for needle in _TRANSIENT):
        return IncrementalFailed(f"{program} failed {where}: {said}")
    return IncrementalRefused(f"{program} failed {where}: {said}")


def _conninfo(dsn: str) -> tuple[str, dict[str, str]]:
    """The connection string pg_basebackup is given (no password) and its environment (PGPASSWORD): the
    password is never in a command line."""
    kwargs = pinned_conninfo(dsn, "pg_safe_backup incremental")
    kwargs.pop("options", None)  # a walsender takes no search_path; its commands are not SQL
    password = kwargs.pop("password", None)
    env = {**os.environ, **({"PGPASSWORD": str(password)} if password else {})}
    return make_conninfo(**{k: str(v) for k, v in kwargs.items()}), env


def tablespace_map_text(tablespaces: Mapping[str, str]) -> str:
    """``tablespace_map`` as pg_backup_stop writes it: ``OID PATH`` lines, the path escaped."""
    return "".join(
        f"{oid} {escape_map_path(path)}\n"
        for oid, path in sorted(tablespaces.items(), key=lambda t: int(t[0]))
    )


def take_incremental(
    dsn: str,
    parent: CatalogEntry,
    destination: Path,
    *,
    tablespaces: Mapping[str, str],
    bindir: Path | str | None = None,
    label: str = "pg-safe-backup incremental",
    fast_checkpoint: bool = True,
    run: Mapping[str, Any] | None = None,
    timeout: float | None = None,
    work_dir: Path | str | None = None,
    log: logging.Logger | Any = _log,
) -> dict[str, Any]:
    """Take an incremental backup of the server at ``dsn`` against ``parent`` into the new folder
    ``destination``: pg_basebackup --incremental (plain, WAL from the archive), each tablespace moved into
    ``pg_tblspc/<oid>``, ``tablespace_map`` written and listed in the manifest, the whole proven against the
    parent, then its catalog entry (parent, parent's Manifest-Checksum), last.

    :param dsn: a libpq connection string of a role with REPLICATION (its password goes by environment).
    :param parent: the backup to take it against (:func:`find_parent`, checked by :func:`check_ready`); in an
        object store, its manifest is read into the temporary folder.
    :param destination: the new backup's folder, absent or empty: a local path, or an object-store path
        (``ObjectStoragePath``, ``UPath``): the backup is taken into a local temporary folder, then uploaded
        (its manifest last) and catalogued there.
    :param tablespaces: oid -> live location of each tablespace (:class:`IncrementalFacts`).
    :param bindir: the folder of pg_basebackup of the server's major (default: looked for).
    :param label: the backup's label.
    :param fast_checkpoint: start with an immediate checkpoint (else a spread one).
    :param run: the DAG run (:data:`pg_safe_backup.store.RUN_KEYS`) for the catalog entry.
    :param timeout: seconds pg_basebackup may take (None: no limit).
    :param work_dir: where the local temporary folder goes, for an object store (default: the system's).
    :param log: where to say what was done.
    :returns: folder, parent, bytes, files, seconds, start_lsn, stop_lsn, manifest_checksum, backup_info.
    :raises IncrementalRefused: the destination is not empty, or the server refused (the fix named).
    :raises IncrementalFailed: the server could not be reached.
    """
    local = is_local_path(destination)
    if local:
        destination = Path(destination).absolute()
    if destination.exists() and (not destination.is_dir() or any(destination.iterdir())):
        raise IncrementalRefused(f"destination {destination} is not empty: each backup gets a new folder")
    major = int((parent.folder / "PG_VERSION").read_text().strip())
    program = client_program("pg_basebackup", major, bindir)
    # Taken into the destination itself, or, for an object store, into a local folder then uploaded.
    work = (
        None
        if local and is_local_path(parent.folder)
        else Path(tempfile.mkdtemp(prefix="pgsb-incremental-", dir=work_dir))
    )
    target = destination if local else work / "backup"  # type: ignore[operator]
    stage = target.parent / f".{target.name}.tablespaces"
    map_text = tablespace_map_text(tablespaces) if tablespaces else None
    shutil.rmtree(stage, ignore_errors=True)  # ours by its name, left by a crash before the backup was
    try:
        manifest = parent.folder / MANIFEST_NAME
        if not is_local_path(parent.folder):
            assert work is not None
            (work / MANIFEST_NAME).write_bytes(manifest.read_bytes())
            manifest = work / MANIFEST_NAME
        began = time.monotonic()
        proof = _take(
            program, dsn, manifest, target, stage, tablespaces, map_text, label, fast_checkpoint, timeout, log
        )
        if not proof.follows(parent.proof):
            _discard(target, stage)
            raise IncrementalRefused(
                f"the incremental in {target} does not prove itself a child of {parent.name}"
                f" ({proof.status}): nothing kept"
            )
        files, size = _count(target)
        if not local:
            upload_backup(target, destination, log)
        log.info(
            "took %s: %d files, %.1f MB; checking that its parent is still there",
            destination,
            files,
            size / 1e6,
        )
        _check_parent_kept(parent, destination, target, stage, local)
        info = info_for_backup(
            backup_label=(target / LABEL_NAME).read_text(),
            stop_lsn=str(proof.stop_lsn),
            tablespace_map=map_text,
            system_identifier=proof.system_identifier,
            pg_major=major,
            stop_timeline=proof.stop_tli if proof.stop_tli != proof.start_tli else None,
            format="plain",
            bytes=size,
            files=files,
            manifest_checksum=proof.manifest_checksum,
            parent=str(parent.folder),
            parent_manifest_checksum=parent.proof.manifest_checksum,
            **{key: (run or {}).get(key) for key in ("dag_id", "run_id", "task_id", "map_index", "attempt")},
        )
        entry = write_info(destination, info)
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
    seconds = time.monotonic() - began
    log.info(
        "incremental backup %s: %d files, %.1f MB, from %s to %s, in %.1f s; catalogued in %s",
        destination,
        files,
        size / 1e6,
        proof.start_lsn,
        proof.stop_lsn,
        seconds,
        entry,
    )
    return {
        "folder": str(destination),
        "parent": str(parent.folder),
        "bytes": size,
        "files": files,
        "seconds": round(seconds, 3),
        "start_lsn": proof.start_lsn,
        "stop_lsn": proof.stop_lsn,
        "manifest_checksum": proof.manifest_checksum,
        "backup_info": entry,
    }


def _check_parent_kept(
    parent: CatalogEntry, destination: Any, target: Path, stage: Path, local: bool
) -> None:
    """Refuse to catalogue an incremental whose parent no longer proves itself as it did when it was taken
    (removed meanwhile, by hand or by a retention run that did not know of it yet): it could never restore.
    What was taken is removed."""
    now = prove_backup(parent.folder)
    if now.ok and now.manifest_checksum == parent.proof.manifest_checksum:
        return
    _discard(target, stage)
    if not local:
        with contextlib.suppress(Exception):
            destination.rmdir(recursive=True)
    raise IncrementalRefused(
        f"the parent {parent.name} changed or went away while the incremental was taken ({now.status}):"
        f" nothing kept; {NEW_FULL} if it is gone"
    )


def _take(
    program: Path,
    dsn: str,
    manifest: Path,
    target: Path,
    stage: Path,
    tablespaces: Mapping[str, str],
    map_text: str | None,
    label: str,
    fast_checkpoint: bool,
    timeout: float | None,
    log: logging.Logger | Any,
) -> Proof:
    """pg_basebackup --incremental against ``manifest`` into the local folder ``target``, each tablespace
    through ``stage`` into ``pg_tblspc/<oid>``, ``tablespace_map`` listed: what it proves. On any failure
    nothing is left."""
    conninfo, env = _conninfo(dsn)
    command = [
        str(program),
        "--pgdata",
        str(target),
        "--format",
        "plain",
        "--wal-method",
        "none",
        "--checkpoint",
        "fast" if fast_checkpoint else "spread",
        "--incremental",
        str(manifest),
        "--manifest-checksums",
        "SHA256",
        "--label",
        label,
        "--no-password",
        "--dbname",
        conninfo,
    ]
    for oid, location in tablespaces.items():
        command += ["--tablespace-mapping", f"{location.replace('=', chr(92) + '=')}={stage / oid}"]
    log.info("taking an incremental backup against %s into %s (%s)", manifest.parent, target, program)
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        _discard(target, stage)
        raise IncrementalFailed(f"pg_basebackup took longer than {timeout:g} s: nothing kept") from None
    if done.returncode != 0:
        _discard(target, stage)
        raise _refusal("pg_basebackup", done.stderr, f"the incremental backup against {manifest.parent}")
    try:
        _move_in_tablespaces(target, stage, tablespaces)
        if map_text:
            _list_tablespace_map(target, map_text)
        return prove_backup(target)
    except BaseException:
        _discard(target, stage)
        raise


def upload_backup(folder: Path, destination: Any, log: logging.Logger | Any = _log) -> None:
    """The local backup ``folder`` into the object store folder ``destination``: its data first (the copy
    engine, pg_control last), then its label files, then its manifest, each object whole: a cut upload
    holds no manifest, and proves nothing. A failed upload removes what it put."""
    entries = []
    for top, folders, names in os.walk(folder):
        rel = os.path.relpath(top, folder)
        for name in folders + names:
            path = name if rel == "." else f"{rel}/{name}"
            entries.append(Entry(path.replace(os.sep, "/"), Path(top) / name, name in folders))
    last = (LABEL_NAME, MAP_NAME, MANIFEST_NAME)
    try:
        upload_tree(folder, destination, entries=[e for e in entries if e.path not in last], log=log)
        for name in last:
            if (folder / name).exists():
                out = open_for_writing(destination / name)
                out.write((folder / name).read_bytes())
                close_durably(out, False)
    except BaseException:
        with contextlib.suppress(Exception):
            destination.rmdir(recursive=True)
        raise


def _discard(destination: Path, stage: Path) -> None:
    """Remove what a failed incremental left: it is no backup (pg_basebackup removes most itself)."""
    shutil.rmtree(destination, ignore_errors=True)
    shutil.rmtree(stage, ignore_errors=True)


def _move_in_tablespaces(destination: Path, stage: Path, tablespaces: Mapping[str, str]) -> None:
    """Each tablespace pg_basebackup wrote into ``stage/<oid>`` (linked from ``pg_tblspc/<oid>``) moved to
    ``pg_tblspc/<oid>``, as our fulls hold it, the folders synced."""
    spc = destination / "pg_tblspc"
    for oid in tablespaces:
        link = spc / oid
        if not link.is_symlink() or Path(os.readlink(link)) != stage / oid:
            raise IncrementalRefused(f"pg_basebackup left no link {link} to {stage / oid}: nothing kept")
        link.unlink()
        os.rename(stage / oid, link)
    if tablespaces:
        fsync_path(spc)
        stage.rmdir()
        fsync_path(destination.parent)


def _list_tablespace_map(destination: Path, text: str) -> None:
    """Write ``tablespace_map`` (synced), then the manifest listing it (atomically, synced)."""
    data = text.encode()
    write_atomically(destination / MAP_NAME, data, f".{MAP_NAME}.tmp")
    mtime_ns = (destination / MAP_NAME).stat().st_mtime_ns
    manifest = (destination / MANIFEST_NAME).read_bytes()
    write_manifest_file(destination, add_to_manifest(manifest, MAP_NAME, data, mtime_ns))


def _count(folder: Path) -> tuple[int, int]:
    files = size = 0
    for top, _, names in os.walk(folder):
        for name in names:
            files += 1
            size += os.lstat(os.path.join(top, name)).st_size
    return files, size


# -------------------------------------------------------------------------------------------- the chain
def chain_of(folder: Any) -> list[Link]:
    """The chain that restores the backup in ``folder``: its full first, ``folder``'s last (just
    ``folder`` for a full). Each parent is the backup its child's label names (start LSN and timeline, one
    cluster; :func:`pg_safe_backup.catalog.parent_finder`), looked for where the child's catalog entry says,
    then beside the child.

    :param folder: a backup's folder: local, or an object-store path (its parents looked for beside it).
    :raises ChainBroken: a backup of the chain does not prove itself, or a parent is missing (named).
    """
    chain: list[Link] = []
    here = Path(folder).absolute() if is_local_path(folder) else folder
    while True:
        proof = prove_backup(here)
        if not proof.ok:
            child = f", the parent of {chain[0].folder}," if chain else ""
            raise ChainBroken(
                f"{here}{child} does not prove itself ({proof.status}): the chain cannot restore"
            )
        chain.insert(0, Link(here, proof))
        if not proof.incremental:
            return chain
        if len(chain) > 1000:
            raise ChainBroken(f"the chain of {folder} does not end in a full backup within 1000 links")
        here = _parent_folder(here, proof)


def _parent_folder(child: Any, proof: Proof) -> Any:
    """The folder of ``child``'s parent, looked for beside the folder its catalog entry records (a local
    child's), then beside ``child``."""
    try:
        info = read_info(child)
    except (CatalogError, OSError):  # the entry only tells where to look first: the files decide
        info = None
    recorded = info.parent if info else None
    local = is_local_path(child)
    places = [Path(recorded).parent] if recorded and local else []
    places = list(dict.fromkeys([*places, child.parent]))
    for place in (p for p in places if p.is_dir()):
        others = [e for e in list_backups(place, max_depth=2) if str(e.folder) != str(child)]
        parent = parent_finder(others)(CatalogEntry(child, info, proof))
        if parent is not None:
            return Path(parent.folder).absolute() if local else parent.folder
    named = f" (recorded as {recorded})" if recorded else ""
    raise ChainBroken(
        f"the parent of {child} is missing: no backup starting at {proof.incremental_from_lsn} on timeline"
        f" {proof.incremental_from_tli}{named} proves itself under {', '.join(map(str, places))}"
        " (deleted by hand?): restore another backup, or put the parent back"
    )


def combine(
    chain: Sequence[Link],
    output: Path,
    *,
    program: Path,
    manifest: bool = True,
    log: logging.Logger | Any = _log,
) -> None:
    """``pg_combinebackup`` of ``chain`` (full first) into the empty folder ``output``, a folder to be read
    and removed (a restore's or a check's staging): a plain backup with the newest link's label, tablespaces
    in ``pg_tblspc/<oid>`` and ``tablespace_map``. Nothing is synced (``--no-sync``: it is copied on and
    synced there, or only checked). Its files are copies, not ``--link``s to the chain's: nothing done to
    them can reach a backup (and a copy of linked files measured 3 times slower here, bench figure 13).

    :param program: the pg_combinebackup of the chain's major (:func:`client_program`).
    :param manifest: write its ``backup_manifest`` (CRC32C: what ``pg_verifybackup`` checks; a restore needs
        none).
    :raises IncrementalRefused: pg_combinebackup refused (its line named).
    """
    command = [str(program), "--output", str(output), "--no-sync"]
    command += ["--manifest-checksums", "CRC32C"] if manifest else ["--no-manifest"]
    command += [str(link.folder) for link in chain]
    log.info(
        "combining %d backups (%s ... %s) with %s", len(chain), chain[0].folder, chain[-1].folder, program
    )
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise _refusal("pg_combinebackup", done.stderr, f"the chain of {chain[-1].folder}")


__all__ = [
    "ChainBroken",
    "IncrementalFailed",
    "IncrementalRefused",
    "Link",
    "chain_of",
    "check_ready",
    "client_program",
    "combine",
    "find_parent",
    "take_incremental",
]
