"""What a base backup of a data directory holds: ONE table of what it leaves out, and why.

After PostgreSQL's src/backend/backup/basebackup.c (``excludeDirContents``, ``excludeFiles`` and
``sendDir()``), which pg_basebackup's server side runs. The copy (and any copy a user writes with
:func:`rsync_exclude_args`) and the manifest writer both read it, so they never disagree on what a
backup is.

Rules, as sendDir() applies them to every entry of every folder:

* names starting with ``pgsql_tmp`` (files or folders, at any depth) are left out;
* :data:`EXCLUDED_FILES`, matched by name at any depth (some by prefix);
* in a database folder (``base/<oid>`` or a tablespace's ``PG_<major>_<catversion>/<oid>``): every fork
  but the init fork of an unlogged relation (one that has a ``<relfilenode>_init`` file), and
  temporary relations ``t<backend>_<relfilenode>``;
* :data:`EXCLUDED_DIR_CONTENTS`, matched by name at any depth: the folder is kept, empty;
* ``pg_wal/`` at the top: kept with an empty ``archive_status/``, its WAL comes from the archive;
* ``global/pg_control`` is copied last (:data:`CONTROL_FILE`).
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

#: Copied after everything else: a backup of a standby ends at the minimum recovery point of the
#: pg_control in the copy, which is only right when it was read last (basebackup.c does the same).
CONTROL_FILE = "global/pg_control"
#: The WAL folder: kept with an empty archive_status/ (permissions); recovery reads WAL from the archive.
WAL_DIR = "pg_wal"
#: Temporary files and folders (PG_TEMP_FILE_PREFIX), left out at any depth.
TEMP_PREFIX = "pgsql_tmp"

#: Folders whose contents are left out; the folder itself is kept, empty, for its permissions.
EXCLUDED_DIR_CONTENTS: dict[str, str] = {
    "pg_stat_tmp": "temporary statistics files (extensions such as pg_stat_statements write there too)",
    "pg_replslot": "replication slots belong to the running server, not to a copy of it (backup.sgml)",
    "pg_dynshmem": "removed at server start (dsm_cleanup_for_mmap)",
    "pg_notify": "removed at server start (AsyncShmemInit)",
    "pg_serial": "kept only for debugging, not needed to run (SerialInit)",
    "pg_snapshots": "removed at server start (DeleteAllExportedSnapshotFiles)",
    "pg_subtrans": "zeroed at server start (StartupSUBTRANS)",
}

#: Files left out wherever they are: name -> (matches as a prefix, why).
EXCLUDED_FILES: dict[str, tuple[bool, str]] = {
    "postgresql.auto.conf.tmp": (False, "ALTER SYSTEM's temporary file"),
    "current_logfiles.tmp": (False, "the logging collector's temporary file"),
    "pg_internal.init": (True, "relation cache (and its .<pid> temporary files), rebuilt at server start"),
    "backup_label": (False, "an earlier backup's; this backup's is written into the copy afterwards"),
    "tablespace_map": (False, "an earlier backup's; this backup's is written into the copy afterwards"),
    "backup_manifest": (False, "describes another backup; this backup's is written after the copy"),
    "postmaster.pid": (False, "the running server's lock file: a restored copy would refuse to start"),
    "postmaster.opts": (False, "the running server's command line"),
}

#: The catalog entry's name: ``<folder>.backup_info.json`` beside a stored backup's top folder
#: (:mod:`pg_safe_backup.catalog`), never in it; an earlier release kept it in the folder, where
#: pg_verifybackup is told to pass over it (``-i backup_info.json``) and a restore leaves it out.
BACKUP_INFO = "backup_info.json"

#: Files the verifier (pg_verifybackup) ignores on disk, so a backup_manifest does not list them.
#: pg_wal/ is not read as files: its WAL is parsed (or skipped) separately.
MANIFEST_IGNORED: tuple[str, ...] = (
    "backup_manifest",
    "pg_wal",
    "postgresql.auto.conf",
    "recovery.signal",
    "standby.signal",
)

_DB_DIR = re.compile(r"^(?:base|pg_tblspc/[^/]+/PG_[^/]+)/\d+$")
#: parse_filename_for_nontemp_relation(): relfilenode, optional fork, optional segment.
_RELATION = re.compile(r"^(\d+)(?:_(fsm|vm|init))?(?:\.\d+)?$")
#: looks_like_temp_rel_name(): t<backend>_<relfilenode>, optional fork, optional segment.
_TEMP_RELATION = re.compile(r"^t\d+_\d+(?:_(?:fsm|vm|init))?(?:\.\d+)?$")


def is_database_dir(folder: str) -> bool:
    """Whether ``folder`` (relative to the data directory, ``/``-separated) holds a database's relations."""
    return bool(_DB_DIR.match(folder))


def excluded(folder: str, name: str, is_dir: bool, siblings: Collection[str] = ()) -> str | None:
    """Why the entry ``name`` of ``folder`` stays out of a base backup, or None when it is copied.

    A folder whose contents are left out (:data:`EXCLUDED_DIR_CONTENTS`, ``pg_wal``) is NOT excluded
    here: it is copied as an empty folder (see :func:`contents_excluded`).

    :param folder: the entry's folder relative to the data directory ("" for the top), ``/``-separated.
    :param name: the entry's name.
    :param is_dir: whether the entry is a folder (a ``pg_tblspc`` link counts as one).
    :param siblings: the names in ``folder``; needed to tell an unlogged relation (it has an init fork).
    """
    if name.startswith(TEMP_PREFIX):
        return "temporary file (pgsql_tmp*), removed at server start"
    if not is_dir:
        for excluded_name, (prefix, why) in EXCLUDED_FILES.items():
            if name == excluded_name or (prefix and name.startswith(excluded_name)):
                return why
        if is_database_dir(folder):
            if _TEMP_RELATION.match(name):
                return "temporary relation, removed at server start"
            m = _RELATION.match(name)
            if m and m.group(2) != "init" and f"{m.group(1)}_init" in siblings:
                return "unlogged relation: rebuilt from its init fork at the end of recovery"
    return None


def contents_excluded(folder: str, name: str) -> str | None:
    """Why the contents of the folder ``name`` in ``folder`` stay out (the folder is kept), or None."""
    if name in EXCLUDED_DIR_CONTENTS:
        return EXCLUDED_DIR_CONTENTS[name]
    if folder == "" and name == WAL_DIR:
        return "WAL: recovery reads it from the archive (pg_wal/ and pg_wal/archive_status/ are kept)"
    return None


def rsync_exclude_args() -> list[str]:
    """The table as rsync ``--exclude`` options, for a copy a user writes with rsync.

    rsync matches patterns, not folders' contents: unlogged relations' main forks (whether a file has a
    ``_init`` sibling) cannot be told, so they are copied; that costs space, never correctness (recovery
    resets them from their init forks). ``global/pg_control`` is excluded too: copy it last, on its own.
    Exit status 24 (a file vanished while rsync ran) is normal on a live cluster: accept it.
    """
    args = [f"--exclude={TEMP_PREFIX}*", f"--exclude=/{WAL_DIR}/*", "--exclude=/base/*/t[0-9]*_[0-9]*"]
    args += [f"--exclude={name}/*" for name in EXCLUDED_DIR_CONTENTS]
    args += [f"--exclude={name}{'*' if prefix else ''}" for name, (prefix, _) in EXCLUDED_FILES.items()]
    args.append(f"--exclude=/{CONTROL_FILE}")
    return args


#: rsync's exit status when source files vanished during the transfer (normal on a live cluster).
RSYNC_VANISHED = 24


@dataclass(frozen=True)
class Entry:
    """One entry of a base backup: where it goes in the backup, and where it is read from."""

    path: str  # in the backup, '/'-separated: base/5/16384, pg_tblspc/16390/PG_15_202209061/5/16391
    source: Path
    is_dir: bool


def walk(
    datadir: Path,
    tablespace_dir: str | None = None,
    special: list[str] | None = None,
    extra: Iterable[Entry] = (),
    tablespaces: Mapping[str, Path] | None = None,
) -> Iterator[Entry]:
    """The entries of a base backup of ``datadir``, folders before their contents, pg_control last.

    Tablespaces (``pg_tblspc/<oid>`` links) are followed into their ``PG_<major>_<catversion>`` folder,
    which the backup holds as ``pg_tblspc/<oid>/PG_...``: one tree, restored with tablespace_map. A file
    or folder that vanishes while it is walked is left out (the server dropped it: WAL replay agrees).
    A socket, FIFO or device is left out too, and counted in ``special``: sendDir() skips it ("skipping
    special file"), and opening a FIFO would wait for a writer for ever. Every copy engine lists through
    here, so none of them opens one.

    :param datadir: the data directory (of a running server: everything is read as it is now).
    :param tablespace_dir: the tablespaces' version folder name; default: ``PG_<major>_<catversion>``
        from PG_VERSION and global/pg_control.
    :param special: where the backup paths of the special files left out are appended (a copy's
        ``CopyResult.special``); None: not counted.
    :param extra: more entries, read from outside the data directory, yielded before pg_control (the
        server's configuration files: :mod:`pg_safe_backup.files.extconfig`).
    :param tablespaces: oid -> the folder to read that tablespace from instead of where its ``pg_tblspc``
        link points (a snapshot of the data directory links to the LIVE tablespace: read each tablespace's
        own snapshot instead).
    """
    datadir = Path(datadir)
    if tablespace_dir is None:
        from pg_safe_backup.files.pgcontrol import read_pg_control

        major = (datadir / "PG_VERSION").read_text().strip()
        tablespace_dir = f"PG_{major}_{read_pg_control(datadir).catalog_version_no}"
    yield from _walk_dir(datadir, "", tablespace_dir, special, tablespaces or {})
    yield from extra
    control = datadir / CONTROL_FILE
    if control.exists():
        yield Entry(CONTROL_FILE, control, False)


def _walk_dir(
    folder: Path, rel: str, tablespace_dir: str, special: list[str] | None, tablespaces: Mapping[str, Path]
) -> Iterator[Entry]:
    try:
        names = sorted(os.listdir(folder))
    except FileNotFoundError:
        return
    siblings = set(names)
    for name in names:
        path = Path(tablespaces[name]) if rel == "pg_tblspc" and name in tablespaces else folder / name
        relpath = f"{rel}/{name}" if rel else name
        try:
            mode = path.stat().st_mode  # follows a pg_tblspc link
        except OSError:
            continue  # vanished, or a link to nothing
        is_dir = stat.S_ISDIR(mode)
        if excluded(rel, name, is_dir, siblings) or relpath == CONTROL_FILE:
            continue
        if not is_dir and not stat.S_ISREG(mode):
            if special is not None:
                special.append(relpath)
            continue
        if not is_dir:
            yield Entry(relpath, path, False)
            continue
        yield Entry(relpath, path, True)
        if contents_excluded(rel, name):
            if rel == "" and name == WAL_DIR:
                yield Entry(f"{WAL_DIR}/archive_status", path / "archive_status", True)
        elif rel == "pg_tblspc":
            version = path / tablespace_dir
            if version.is_dir():
                yield Entry(f"{relpath}/{tablespace_dir}", version, True)
                yield from _walk_dir(version, f"{relpath}/{tablespace_dir}", tablespace_dir, special, {})
        else:
            yield from _walk_dir(path, relpath, tablespace_dir, special, tablespaces)
