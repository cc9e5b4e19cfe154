"""The server's configuration files that live outside its data directory, carried inside the backup.

A Debian/Ubuntu cluster (postgresql-common) keeps ``postgresql.conf``, ``pg_hba.conf``, ``pg_ident.conf``
and ``conf.d/`` in ``/etc/postgresql/<major>/<name>/``, and starts ``postgres -c config_file=...``; a copy
of the data directory alone does not start. As Barman does, the files are copied into the backup, and a
restore puts them back into the new data directory.

On disk, in the copy (so the copy's records, the backup_manifest and pg_verifybackup cover them)::

    pg_safe_backup_config/<kind>/<the file's absolute path>

``<kind>`` says what the file was to the server: ``config_file``, ``hba_file``, ``ident_file`` (the
settings of the same names), ``include`` (a file the configuration includes: ``include``,
``include_if_exists``, a file of an ``include_dir``, or a source file ``pg_file_settings`` names) or
``include_dir`` (a folder the configuration includes, kept even when empty: PostgreSQL refuses to start
when it is missing). Only what lies outside the data directory is captured; the rest is in the copy
anyway.

A restore (:func:`restore_config`) puts ``config_file`` at ``TARGET/postgresql.conf``, ``hba_file`` and
``ident_file`` at ``TARGET/pg_hba.conf`` and ``TARGET/pg_ident.conf``, and every included file or folder
below the configuration file's folder at the same place below TARGET (``include_dir = 'conf.d'`` then
finds ``TARGET/conf.d``), then pins ``hba_file``, ``ident_file`` and ``external_pid_file`` at the end of
``TARGET/postgresql.conf``. An include outside that folder stays where the configuration names it: the
restore names it, and where the backup keeps its copy.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from pg_safe_backup.errors import PermanentError
from pg_safe_backup.files.layout import Entry

#: The copy's folder of the captured files.
CONFIG_DIR = "pg_safe_backup_config"
#: The settings naming a configuration file, and the name each is restored as in the new data directory.
SETTING_FILES: dict[str, str] = {
    "config_file": "postgresql.conf",
    "hba_file": "pg_hba.conf",
    "ident_file": "pg_ident.conf",
}
INCLUDE, INCLUDE_DIR = "include", "include_dir"
KINDS = (*SETTING_FILES, INCLUDE, INCLUDE_DIR)
#: What the server is asked (pg_settings), besides the source files of pg_file_settings.
SERVER_SETTINGS = ("data_directory", *SETTING_FILES)
#: PostgreSQL's CONF_FILE_MAX_DEPTH: includes nested deeper are an error to the server too.
MAX_DEPTH = 10
#: ``include 'x'``, ``include_if_exists = 'x'``, ``include_dir x`` (guc-file.l: the ``=`` is optional, the
#: value quoted or a bare word), at the start of a line.
_DIRECTIVE = re.compile(
    r"^\s*(include_if_exists|include_dir|include)\b\s*=?\s*(?:'((?:[^'\\\n]|''|\\.)*)'|([^\s#']+))", re.M
)


class ConfigCaptureError(PermanentError, ValueError):
    """A configuration file the server uses cannot be read here; the message names it."""


@dataclass(frozen=True)
class ServerConfig:
    """Where the server keeps its configuration, as it said while the backup was held (plain values, the
    gate's XCom ``server_config_files``).

    :param data_directory: its data_directory (None: not readable by the backup's role).
    :param config_file: its config_file.
    :param hba_file: its hba_file.
    :param ident_file: its ident_file.
    :param sources: the source files of its pg_file_settings (the files it read settings from).
    :param unreadable: what the backup's role was not allowed to read, and the GRANT that fixes it.
    """

    data_directory: str | None = None
    config_file: str | None = None
    hba_file: str | None = None
    ident_file: str | None = None
    sources: tuple[str, ...] = ()
    unreadable: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The value as JSON-able plain types (XCom)."""
        return {**self.__dict__, "sources": list(self.sources)}

    @classmethod
    def from_dict(cls, value: Mapping[str, Any]) -> ServerConfig:
        """:param value: what :meth:`as_dict` returned."""
        known = {k: v for k, v in value.items() if k in cls.__dataclass_fields__}
        return cls(**{**known, "sources": tuple(known.get("sources") or ())})


def _inside(path: str, folders: list[str]) -> bool:
    real = os.path.realpath(path)
    return any(real == folder or real.startswith(folder.rstrip("/") + "/") for folder in folders)


def _unquote(quoted: str | None, bare: str | None) -> str:
    """A directive's value as guc-file.l reads it: '' is a quote, a backslash escapes the next
    character."""
    if quoted is None:
        return bare or ""
    return re.sub(r"\\(.)", r"\1", quoted.replace("''", "'"))


def _included(conf: Path, depth: int = 0) -> Iterator[tuple[str, Path, bool]]:
    """What ``conf`` includes, nested includes too: (kind, absolute path, must exist).

    A relative path is relative to the folder of the file naming it; an include_dir's files are its
    ``*.conf`` not starting with a dot (AbsoluteConfigLocation, ParseConfigDirectory in conffiles.c).
    """
    if depth > MAX_DEPTH:
        return
    try:
        text = conf.read_text(errors="replace")
    except FileNotFoundError:
        return
    for m in _DIRECTIVE.finditer(text):
        directive, value = m.group(1), _unquote(m.group(2), m.group(3))
        if not value:
            continue
        path = Path(os.path.normpath(conf.parent / value))
        if directive == "include_dir":
            yield INCLUDE_DIR, path, True
            names = sorted(os.listdir(path)) if path.is_dir() else []
            for name in names:
                if name.endswith(".conf") and not name.startswith(".") and (path / name).is_file():
                    yield INCLUDE, path / name, True
                    yield from _included(path / name, depth + 1)
        else:
            yield INCLUDE, path, directive == "include"
            yield from _included(path, depth + 1)


def files_to_capture(server: ServerConfig, datadir: Path | str) -> dict[str, tuple[str, Path]]:
    """The configuration files and include folders of ``server`` that lie outside its data directory:
    their path in the copy -> (kind, where they are read from).

    :param server: what the server said.
    :param datadir: the data directory as the copy reads it (a mount of the server's, perhaps).
    :raises ConfigCaptureError: a file the server uses is not here (the copy runs where it cannot see it).
    """
    inside = [os.path.realpath(d) for d in (server.data_directory, str(datadir)) if d]
    found: dict[str, tuple[str, Path, bool]] = {}  # absolute path -> (kind, path, must exist)
    for kind in SETTING_FILES:
        if value := getattr(server, kind):
            found.setdefault(value, (kind, Path(value), True))
    for source in server.sources:
        found.setdefault(source, (INCLUDE, Path(source), True))
    if server.config_file:
        for kind, path, required in _included(Path(server.config_file)):
            found.setdefault(str(path), (kind, path, required))
    captured: dict[str, tuple[str, Path]] = {}
    for value, (kind, path, required) in found.items():
        if not path.is_absolute() or _inside(value, inside):
            continue
        is_there = path.is_dir() if kind == INCLUDE_DIR else path.is_file() and os.access(path, os.R_OK)
        if not is_there:
            if not required:
                continue
            what = {INCLUDE: "included file", INCLUDE_DIR: "included folder"}.get(kind, kind)
            raise ConfigCaptureError(
                f"the server's {what} {path} (outside its data directory) is not readable here: run the copy"
                " where the server's configuration files are (or mount them), as an OS user who may read them"
            )
        captured[f"{CONFIG_DIR}/{kind}{path}"] = (kind, path)
    return dict(sorted(captured.items()))


def capture_entries(server: ServerConfig, datadir: Path | str) -> list[Entry]:
    """The entries of :func:`files_to_capture` as a copy engine takes them
    (:func:`~pg_safe_backup.files.layout.walk`'s ``extra``): folders first, each with the data directory's
    mode and owner (never /etc's), then the files.

    :param server: what the server said.
    :param datadir: the data directory the copy reads.
    """
    captured = files_to_capture(server, datadir)
    folders: dict[str, None] = {}
    for backup_path, (kind, _) in captured.items():
        parents = list(reversed(PurePosixPath(backup_path).parents))[1:]
        for parent in parents:
            folders[str(parent)] = None
        if kind == INCLUDE_DIR:
            folders[backup_path] = None
    data = Path(datadir)
    entries = [Entry(folder, data, True) for folder in folders]
    entries += [
        Entry(path, source, False) for path, (kind, source) in captured.items() if kind != INCLUDE_DIR
    ]
    return entries


# ------------------------------------------------------------------------------------------ the restore
@dataclass
class RestoredConfig:
    """What :func:`restore_config` did."""

    #: the server's original path -> where it is now, in the new data directory.
    placed: dict[str, str] = field(default_factory=dict)
    #: the lines appended to TARGET/postgresql.conf.
    settings: dict[str, str] = field(default_factory=dict)
    #: what the restore must tell its user: includes left where the configuration names them, and why.
    notes: list[str] = field(default_factory=list)


def _captured(folder: Path) -> Iterator[tuple[str, str, Path]]:
    """(kind, original absolute path, the captured copy) of each file or include folder in ``folder``."""
    for kind in KINDS:
        top = folder / kind
        for root, dirs, files in os.walk(top) if top.is_dir() else ():
            names = files + (dirs if kind == INCLUDE_DIR else [])
            for name in sorted(names):
                here = Path(root) / name
                if kind == INCLUDE_DIR and (here.is_file() or any(True for _ in here.iterdir())):
                    continue  # a captured folder is an empty leaf; its files are captured as includes
                yield kind, "/" + str(here.relative_to(top)), here


def _quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def restore_config(data: Path, backup: Path | str) -> RestoredConfig | None:
    """Put the configuration files the backup captured (its ``pg_safe_backup_config/``, restored into
    ``data`` with the rest of the copy) where the restored server reads them, pin ``hba_file``,
    ``ident_file`` and ``external_pid_file`` at the end of ``data/postgresql.conf``, and remove the folder.

    :param data: the new data directory, the copy already in it.
    :param backup: the backup, as the notes name it.
    :returns: what was done; None when the backup captured nothing (its configuration was in its data
        directory).
    """
    folder = data / CONFIG_DIR
    if not folder.is_dir():
        return None
    done = RestoredConfig()
    captured = list(_captured(folder))
    config = next((orig for kind, orig, _ in captured if kind == "config_file"), None)
    conf_dir = Path(config).parent if config else None
    for kind, original, copy in captured:
        if kind in SETTING_FILES:
            where = data / SETTING_FILES[kind]
        elif conf_dir is not None and Path(original).is_relative_to(conf_dir):
            where = data / Path(original).relative_to(conf_dir)
        else:
            exists = os.path.isdir(original) if kind == INCLUDE_DIR else os.path.isfile(original)
            done.notes.append(
                f"the configuration includes {original}, outside {conf_dir or 'the data directory'}: the"
                " restored server reads it from this host, as the backed up one did"
                + ("" if exists else ", and it is NOT here: the server does not start until it is")
                + f"; the backup's copy is {CONFIG_DIR}/{kind}{original} in {backup}"
            )
            continue
        if kind == INCLUDE_DIR:
            where.mkdir(parents=True, exist_ok=True)
        else:
            if where.exists() and where.name not in SETTING_FILES.values():
                done.notes.append(
                    f"{original} is not restored to {where}: the data directory has a file of that name"
                    f" (the backup's copy is {CONFIG_DIR}/{kind}{original} in {backup})"
                )
                continue
            where.parent.mkdir(parents=True, exist_ok=True)
            os.replace(copy, where)
        done.placed[original] = str(where)
    shutil.rmtree(folder)
    conf = data / "postgresql.conf"
    if conf.exists():
        for kind, original, _ in captured:
            if kind in ("hba_file", "ident_file") and original in done.placed:
                done.settings[kind] = _quote(done.placed[original])
        # Never the live server's pid file (Debian's /var/run/postgresql/<major>-<name>.pid).
        done.settings["external_pid_file"] = "''"
        with open(conf, "a") as f:
            f.write("\n# pg_safe_backup.restore: the configuration files, restored into this folder\n")
            f.writelines(f"{key} = {value}\n" for key, value in done.settings.items())
    return done


__all__ = [
    "CONFIG_DIR",
    "SERVER_SETTINGS",
    "ConfigCaptureError",
    "RestoredConfig",
    "ServerConfig",
    "capture_entries",
    "files_to_capture",
    "restore_config",
]
