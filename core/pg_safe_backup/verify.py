"""The check pipeline: every check of a stored backup, cheapest first, and its verdict recorded.

:func:`check_backup` runs, in order, the page-LSN check (no server: no page of the copy newer than the
point where its recovery becomes consistent), ``pg_verifybackup`` against the backup's backup_manifest
(:func:`find_verifier` picks a verifier that reads its version), then the restore check on a temporary
server (:func:`pg_safe_backup.restore_check.verify_backup`); each runs whatever the one before found, so
one :class:`BackupCheck` names every problem. :func:`record_check` appends the verdict to the backup's
catalog entry, best-effort: storage it cannot write gets a warning.

An archive ``pg-safe-backup wal-push`` manages (compressed, encrypted) is read through its stored names:
pg_verifybackup parses the backup's WAL decompressed into a temporary folder, the restore check fetches it
with ``wal-fetch``; an encrypted one needs its key (``archive_key``).

A check that could not run is not a verdict: a WAL archive that is missing, closed to the server's OS
user, another cluster's (its oldest segment's system identifier against the backup's) or encrypted
without its key, or no usable
binary (the backup's major's ``postgres`` and ``pg_ctl``; a ``pg_verifybackup`` of any installed major
that reads the backup's manifest), raises :class:`CheckNotRun` before any check, and nothing is recorded.

The restore check's names (``verify_backup``, ``VerifyResult``, ``CheckNotRun``, ``server_bindir``, ...)
are importable from here too, where they were first.

CLI: ``pg-safe-backup verify BACKUP_DIR [WAL_ARCHIVE] [--invariant-sql SQL] [--invariant-db DB] [--keep]``
(:mod:`pg_safe_backup.cli`) prints the summary and exits 0 on PASS, 1 on FAIL, 2 when the checks could not
run.
"""

from __future__ import annotations

import glob
import json
import logging
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pg_safe_backup.catalog import CatalogError, append_verification, entry_path, has_info
from pg_safe_backup.encryption import check_key, decrypt_backup
from pg_safe_backup.files.crypt import CryptError, EncryptionKey
from pg_safe_backup.files.layout import CONTROL_FILE
from pg_safe_backup.files.pgcontrol import (
    BadPgControl,
    CopyMismatch,
    MissingStopLsn,
    check_page_lsns,
    format_lsn,
    read_pg_control,
    stop_lsn_from_manifest,
)
from pg_safe_backup.files.tablespaces import tablespace_copies
from pg_safe_backup.files.wal import is_managed_archive, plain_chunks
from pg_safe_backup.files.walarchive import DamagedFile, MissingCodec, parse_stored_name
from pg_safe_backup.files.xlog import wal_file_holding, wal_segment_names
from pg_safe_backup.incremental import IncrementalFailed, IncrementalRefused, client_program
from pg_safe_backup.local_cluster import find_bindir
from pg_safe_backup.pgverify import run_pg_verifybackup, tool_major
from pg_safe_backup.restore import (
    ArchiveNotUsable,
    RestoreError,
    archive_place,
    backup_major,
    check_archive,
    combine_chain,
    download_backup,
    is_incremental,
    manifest_field,
)
from pg_safe_backup.restore_check import (
    ARCHIVE_ARG,
    LOG_TAIL_LINES,
    LSN,
    SERVER_TOOLS,
    CheckNotRun,
    VerifyResult,
    _one_line,
    server_bindir,
    verify_backup,
)
from pg_safe_backup.state import parse_backup_label
from pg_safe_backup.storage import in_store, place_of

#: The first major whose pg_verifybackup reads each backup_manifest version.
MANIFEST_READERS = {1: 13, 2: 17}
_log = logging.getLogger(__name__)


def find_verifier(
    backup: Path, verifier_bindir: Path | str | None = None, bindir: Path | str | None = None
) -> Path:
    """The folder of the pg_verifybackup that checks the backup's manifest: ``verifier_bindir``; else, of
    ``bindir``, the backup's major's binaries and every installed PostgreSQL's, one whose verifier reads the
    manifest's version (13+ reads version 1, 17+ version 2): the backup's own major, else the nearest.

    :param backup: the backup, with its backup_manifest.
    :param verifier_bindir: the folder given (--verifier-bindir), if any: it is used or refused.
    :param bindir: the server binaries given (--bindir), if any: tried first.
    :raises CheckNotRun: ``verifier_bindir`` has no verifier that reads the manifest, or none is installed.
    """
    # Unreadable: any verifier runs and says what is wrong with it.
    version = manifest_field(backup, "PostgreSQL-Backup-Manifest-Version") or 1
    lowest = MANIFEST_READERS.get(version, max(MANIFEST_READERS.values()))
    if verifier_bindir:
        folder = Path(verifier_bindir)
        found = tool_major(folder / "pg_verifybackup") if (folder / "pg_verifybackup").is_file() else None
        if found is None or found < lowest:
            raise CheckNotRun(
                f"no pg_verifybackup of PostgreSQL {lowest} or later in {folder} (--verifier-bindir): the"
                f" backup_manifest is of version {version}"
            )
        return folder
    major = backup_major(backup)
    candidates = [Path(bindir)] if bindir else []
    try:
        candidates.append(find_bindir(major))
    except FileNotFoundError:
        pass
    candidates += [Path(folder) for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"))]
    if on_path := shutil.which("pg_verifybackup"):
        candidates.append(Path(on_path).parent)
    usable: dict[Path, int] = {}
    for folder in candidates:
        if folder not in usable and (folder / "pg_verifybackup").is_file():
            found = tool_major(folder / "pg_verifybackup")
            if found is not None and found >= lowest:
                usable[folder] = found
    if not usable:
        raise CheckNotRun(
            f"no installed pg_verifybackup reads {backup}/backup_manifest (version {version}: PostgreSQL"
            f" {lowest} or later): install one, pass --verifier-bindir, or skip it (--no-verifybackup)"
        )
    # The same major parses the WAL too; else the nearest, the newer of two as near.
    return min(usable, key=lambda f: (usable[f] != major, abs(usable[f] - (major or usable[f])), -usable[f]))


# ------------------------------------------------------------------------------ every check of a backup
PASS, FAIL, SKIPPED = "PASS", "FAIL", "SKIPPED"
#: The checks :func:`check_backup` runs, cheapest first.
CHECKS = ("page-LSN check", "pg_verifybackup", "restore check")
#: The step before them for an encrypted backup: every file decrypted (and so authenticated) with its key.
DECRYPTION = "decryption"
#: The step before them for a backup in an object store: downloaded (decrypted, extracted) to be read.
DOWNLOAD = "download"
#: The step before them for an incremental backup: its chain combined (pg_combinebackup), then checked.
COMBINE = "combine"


@dataclass
class CheckStep:
    """One check of a backup: PASS, FAIL or SKIPPED, and why, naming the file or page at fault."""

    name: str
    status: str
    summary: str
    details: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        return f"{self.name}: {self.status}: {self.summary}"


@dataclass
class BackupCheck:
    """The checks of one backup, in the order they ran."""

    steps: list[CheckStep]

    @property
    def ok(self) -> bool:
        return all(step.status != FAIL for step in self.steps)

    def step(self, name: str) -> CheckStep | None:
        return next((step for step in self.steps if step.name == name), None)

    def summary(self) -> str:
        """One verdict line (``PASS: ...`` or ``FAIL: ...``, naming each check), then a line per check."""
        verdict = ", ".join(f"{step.name} {step.status.lower()}" for step in self.steps)
        failed = [step.line() for step in self.steps if step.status == FAIL]
        head = f"{PASS if self.ok else FAIL}: {verdict}" + (f" ({'; '.join(failed)})" if failed else "")
        return "\n".join([head, *(f"  {step.line()}" for step in self.steps)])

    def as_dict(self) -> dict[str, Any]:
        """Plain values for XCom: ok, summary and each check's status, summary and details."""
        return {
            "ok": self.ok,
            "summary": self.summary(),
            "checks": {
                s.name: {"status": s.status, "summary": s.summary, "details": s.details} for s in self.steps
            },
        }


def check_backup(
    backup_dir: Path | str,
    wal_archive: Path | str | None,
    *,
    stop_lsn: str | None = None,
    page_lsns: bool = True,
    manifest: bool = True,
    restore: bool = True,
    verifier_bindir: Path | str | None = None,
    tablespace_dirs: Mapping[str | int, Path | str] | None = None,
    progress: Callable[[str], None] | None = None,
    archive_key: EncryptionKey | None = None,
    encryption_key: EncryptionKey | None = None,
    **restore_options: Any,
) -> BackupCheck:
    """Check a stored backup, cheapest first: its page LSNs, ``pg_verifybackup``, then the restore check.

    Each check runs whatever the one before found, so one report names every problem.

    :param backup_dir: the copy, with its backup_label (and backup_manifest, tablespace_map).
    :param wal_archive: the WAL archive; None for a self-contained backup (its WAL in its pg_wal/).
    :param stop_lsn: the backup's stop LSN, for the page-LSN check of a backup of a primary; default:
        the End-LSN of its backup_manifest, else the backup history file in the archive.
    :param page_lsns: run the page-LSN check (seconds per GB, no server).
    :param manifest: run pg_verifybackup when the copy has a backup_manifest.
    :param restore: run the restore check (a temporary server: minutes per GB).
    :param verifier_bindir: the folder of pg_verifybackup; default: the backup's major's binaries.
    :param tablespace_dirs: tablespace OID -> its backup, when not where the module docstring looks.
    :param progress: called with a line as each check starts (the CLI prints it).
    :param archive_key: the key of an archive ``wal-push`` encrypts.
    :param encryption_key: the key of an encrypted backup: it is decrypted into a temporary folder (in
        ``work_dir``) and checked there; a file that does not authenticate FAILs the ``decryption`` step.
    :param restore_options: :func:`verify_backup`'s keyword arguments.
    :raises CheckNotRun: before any check: the WAL archive is missing, closed to the server's OS user,
        another cluster's or encrypted without ``archive_key``; no pg_verifybackup reads the manifest
        (``manifest``); no server binaries of the backup's major (``restore``).
    """
    stored = in_store(backup_dir)
    backup = place_of(backup_dir) if stored else Path(backup_dir).absolute()
    try:
        key_id = check_key(backup, encryption_key)
    except CryptError as err:  # no key, or another one: nothing can be checked, no verdict
        raise CheckNotRun(str(err)) from None

    def again(copy: Path) -> BackupCheck:  # the same checks of the local, plaintext (or combined) copy
        return check_backup(
            copy,
            wal_archive,
            stop_lsn=stop_lsn,
            page_lsns=page_lsns,
            manifest=manifest,
            restore=restore,
            verifier_bindir=verifier_bindir,
            tablespace_dirs=tablespace_dirs,
            progress=progress,
            archive_key=archive_key,
            **restore_options,
        )

    if is_incremental(backup):
        try:
            program = client_program(
                "pg_combinebackup", backup_major(backup) or 0, restore_options.get("bindir")
            )
        except IncrementalRefused as err:  # nothing can be checked: no verdict
            raise CheckNotRun(_one_line(err)) from None

        def combined(backup: Any, into: Path, key_id: str | None, key: EncryptionKey | None) -> CheckStep:
            """The combine step: the chain proven link by link (downloaded from a store) and combined."""
            try:
                chain = combine_chain(backup, into, into.parent, program, manifest=True)
            except (IncrementalRefused, IncrementalFailed, RestoreError) as err:  # a missing or damaged link
                return CheckStep(COMBINE, FAIL, _one_line(err))
            names = " <- ".join(str(link.folder) for link in chain)
            return CheckStep(COMBINE, PASS, f"{len(chain)} backups combined: {names}", {"chain": names})

        say = progress or (lambda line: None)
        say(f"{COMBINE}: combining the chain of {backup} ...")
        return _check_a_copy(backup, combined, None, None, again, restore_options.get("work_dir"))
    if stored or key_id is not None:
        fill = _download if stored else _decrypt
        (progress or (lambda line: None))(
            f"{DOWNLOAD}: downloading {backup} ..." if stored else f"{DECRYPTION}: decrypting {backup} ..."
        )
        return _check_a_copy(backup, fill, key_id, encryption_key, again, restore_options.get("work_dir"))
    archive = archive_place(wal_archive)
    if archive is not None:
        try:
            check_archive(backup, archive, flag=ARCHIVE_ARG, key=archive_key)
        except ArchiveNotUsable as err:
            raise CheckNotRun(str(err)) from err
    verifier = None
    if manifest and (backup / "backup_manifest").is_file():
        verifier = find_verifier(backup, verifier_bindir, restore_options.get("bindir"))
    if restore:
        server_bindir(backup_major(backup), restore_options.get("bindir"))
    say = progress or (lambda line: None)
    steps = []
    if page_lsns:
        say(f"{CHECKS[0]}: reading every page of {backup} ...")
        steps.append(_page_lsn_step(backup, archive, stop_lsn, tablespace_dirs, archive_key))
    if manifest:
        say(f"{CHECKS[1]}: checking {backup} against its backup_manifest ...")
        steps.append(
            _verifybackup_step(backup, archive, verifier, archive_key, restore_options.get("work_dir"))
        )
    if restore:
        say(f"{CHECKS[2]}: copying {backup} and recovering it on a temporary server ...")
        result = verify_backup(
            backup, archive, tablespace_dirs=tablespace_dirs, archive_key=archive_key, **restore_options
        )
        steps.append(CheckStep(CHECKS[2], PASS if result.ok else FAIL, result.summary()[6:], result.details))
    return BackupCheck(steps)


def _check_a_copy(
    backup: Any,
    fill: Callable[[Any, Path, str | None, EncryptionKey | None], CheckStep],
    key_id: str | None,
    key: EncryptionKey | None,
    again: Callable[[Path], BackupCheck],
    work_dir: Path | str | None,
) -> BackupCheck:
    """The checks of a backup that cannot be read where it is (in an object store, or encrypted), run on a
    local plaintext copy in a temporary folder of ``work_dir``: ``fill`` makes the copy (its step; a FAIL
    ends the checks there: the stored backup is damaged), ``again`` checks it; the folder is removed."""
    staging = Path(tempfile.mkdtemp(prefix="pgsb-staged-", dir=work_dir))
    copy = staging / "copy"
    try:
        first = fill(backup, copy, key_id, key)
        if first.status == FAIL:
            return BackupCheck([first])
        report = again(copy)
        # Each step names the backup as the user named it, not the temporary folder it was checked in.
        steps = [
            CheckStep(step.name, step.status, step.summary.replace(str(copy), str(backup)), step.details)
            for step in report.steps
        ]
        return BackupCheck([first, *steps])
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _decrypt(backup: Path, into: Path, key_id: str | None, key: EncryptionKey | None) -> CheckStep:
    """The decryption step: every file of the local ``backup`` decrypted into ``into``."""
    assert key is not None  # check_key raised otherwise
    try:
        files = decrypt_backup(backup, into, key)
    except CryptError as err:  # a changed or cut byte: the stored backup is damaged, a verdict
        return CheckStep(DECRYPTION, FAIL, _one_line(err), {"key_id": key_id})
    return CheckStep(DECRYPTION, PASS, f"{len(files)} files decrypted with key {key_id}", {"key_id": key_id})


def _download(backup: Any, into: Path, key_id: str | None, key: EncryptionKey | None) -> CheckStep:
    """The download step: the backup in an object store as a local copy in ``into`` (decrypted)."""
    details = {"key_id": key_id} if key_id else {}
    try:
        size, files = download_backup(backup, into, key if key_id else None)
    except CryptError as err:  # a changed or cut byte: the stored backup is damaged, a verdict
        return CheckStep(DOWNLOAD, FAIL, _one_line(err), details)
    except RestoreError as err:  # the store could not be read: no verdict
        raise CheckNotRun(_one_line(err)) from err
    how = f", decrypted with key {key_id}" if key_id else ""
    return CheckStep(DOWNLOAD, PASS, f"{files} files, {size / 2**20:.1f} MB read from {backup}{how}", details)


def record_check(
    backup_dir: Path | str,
    report: BackupCheck,
    seconds: float,
    by: str,
    warn: Callable[[str], None] | None = None,
    encryption_key: EncryptionKey | None = None,
) -> bool:
    """Append the outcome of the checks to the backup's ``backup_info.json`` (the catalog), when it has one.
    Best-effort: the verdict stands when it cannot be written (read-only storage), with a warning.

    :param backup_dir: the backup checked.
    :param report: what the checks found.
    :param seconds: how long they took (a drill's restore time).
    :param by: who checked: ``pg-safe-backup verify``, a task's id, ...
    :param warn: where to say it was not recorded (default: this module's logger).
    :param encryption_key: the key of an encrypted backup (the record names the manifest it proves).
    :returns: whether it was recorded.
    """
    folder = place_of(backup_dir)
    if not has_info(folder):  # beside the folder, or inside it (an earlier release's)
        return False
    try:
        append_verification(
            folder,
            {
                "ok": report.ok,
                "by": by,
                "seconds": round(seconds, 1),
                "checks": {step.name: step.status for step in report.steps},
                "summary": report.summary().splitlines()[0],
            },
            encryption_key,
        )
    except (OSError, CatalogError) as err:
        (warn or _log.warning)(f"the verdict was not recorded in {entry_path(folder)}: {_one_line(err)}")
        return False
    return True


def backup_stop_lsn(
    backup: Path, wal_archive: Path | None, key: EncryptionKey | None = None
) -> tuple[str, str] | None:
    """The backup's stop LSN and where it was read: its backup_manifest's WAL-Ranges, else the backup
    history file (``<segment>.<offset>.backup``, under any stored name) pg_backup_stop wrote into the
    archive for this very backup (same start, label and start time; a standby writes none); None if
    neither.

    :param key: the archive's key, for an encrypted archive (one it cannot read is passed over)."""
    manifest_file = backup / "backup_manifest"
    if manifest_file.is_file():
        try:
            return stop_lsn_from_manifest(manifest_file.read_text()), str(manifest_file)
        except ValueError:
            pass
    label = backup / "backup_label"
    if not isinstance(wal_archive, Path) or not label.is_file():  # none, or an object store's
        return None
    ours = parse_backup_label(label.read_text())
    start = ours.get("START WAL LOCATION", "")
    m = re.match(r"(\S+) \(file ([0-9A-F]{24})\)", start)
    # A standby writes no backup history file; one with the same start is another backup's (the primary's
    # backup a standby was made from starts at the same point until the standby's first restartpoint).
    if not m or ours.get("BACKUP FROM") == "standby":
        return None
    for history in sorted(wal_archive.glob(f"{m.group(2)}.*.backup*")):
        parsed = parse_stored_name(history.name)
        if parsed is None or not parsed.name.endswith(".backup"):
            continue
        try:
            text = b"".join(plain_chunks(history, key)).decode(errors="replace")
        except (OSError, CryptError, DamagedFile, MissingCodec):
            continue  # unreadable: the page-LSN check says it found no stop LSN
        fields = parse_backup_label(text)
        same = all(fields.get(key) == ours.get(key) for key in ("START WAL LOCATION", "LABEL", "START TIME"))
        if same and fields.get("STOP WAL LOCATION"):
            return fields["STOP WAL LOCATION"].split(" ")[0], str(history)
    return None


def _page_lsn_step(
    backup: Path,
    archive: Path | None,
    stop_lsn: str | None,
    overrides: Mapping[str | int, Path | str] | None,
    key: EncryptionKey | None = None,
) -> CheckStep:
    name = CHECKS[0]
    label = backup / "backup_label"
    if not label.is_file():
        return CheckStep(name, SKIPPED, f"{backup} has no backup_label: no backup to hold its pages against")
    details: dict[str, Any] = {}
    if stop_lsn:
        details["stop_lsn_from"] = "given"
    elif found := backup_stop_lsn(backup, archive, key):
        stop_lsn, details["stop_lsn_from"] = found
    try:
        spaces = tablespace_copies(backup, overrides, backup_major(backup))
        result = check_page_lsns(
            backup, backup_label=label.read_text(), stop_lsn=stop_lsn, tablespaces=spaces
        )
    except MissingStopLsn as err:
        return CheckStep(name, SKIPPED, str(err), details)
    except (ValueError, CopyMismatch, OSError) as err:
        return CheckStep(name, FAIL, _one_line(err), details)
    details.update(
        newest_page=str(result.newest) if result.newest else None,
        consistency_lsn=format_lsn(result.consistency_lsn),
        consistency_from=result.source,
        bytes_scanned=result.bytes_scanned,
        files=result.files,
        seconds=round(result.seconds, 2),
    )
    return CheckStep(name, PASS if result.ok else FAIL, result.message, details)


def _verifybackup_step(
    backup: Path,
    archive: Path | None,
    folder: Path | None,
    key: EncryptionKey | None = None,
    work_dir: Path | str | None = None,
) -> CheckStep:
    """pg_verifybackup of ``folder`` (:func:`find_verifier`; None: the backup has no manifest); the WAL of a
    managed archive staged decompressed into a temporary folder under ``work_dir`` (pg_waldump reads
    only plain segments)."""
    name = CHECKS[1]
    major = backup_major(backup)
    if folder is None:
        why = (
            "an earlier release wrote none for PostgreSQL 12" if major == 12 else "the store task wrote none"
        )
        return CheckStep(name, SKIPPED, f"no backup_manifest in {backup} ({why})")
    verifier_major = tool_major(folder / "pg_verifybackup")
    # Another major's verifier of a version 2 manifest refuses the copy's pg_control version.
    ignore = () if verifier_major == major or (major or 0) < 17 else (CONTROL_FILE,)
    same = verifier_major == major and (folder / "pg_waldump").is_file()  # pg_waldump parses the WAL
    notes = []
    if not same:
        notes.append(
            f"WAL not parsed: no pg_waldump in {folder}"
            if verifier_major == major
            else f"WAL not parsed: pg_waldump {verifier_major} reads only its own major's WAL"
        )
    if ignore:
        notes.append(f"{CONTROL_FILE} not checked: pg_verifybackup {verifier_major} refuses another major's")
    note = f" ({'; '.join(notes)})" if notes else ""
    staged = None
    try:
        if same and archive is not None and (isinstance(archive, str) or is_managed_archive(archive)):
            staged = Path(tempfile.mkdtemp(prefix="pgsb-wal-", dir=work_dir))
            _stage_backup_wal(backup, str(archive), staged, key)
        wal_path = staged or archive
        run = run_pg_verifybackup(backup, bindir=folder, wal_path=wal_path, skip_wal=not same, ignore=ignore)
    except (OSError, CryptError, DamagedFile, MissingCodec, ValueError, BadPgControl) as err:
        return CheckStep(name, FAIL, f"cannot read the backup's WAL from {archive}: {_one_line(err)}")
    finally:
        if staged is not None:
            shutil.rmtree(staged, ignore_errors=True)
    details = {"command": run.cmd, "verifier_major": verifier_major, "wal_parsed": same}
    if run.ok:
        return CheckStep(
            name, PASS, run.output.splitlines()[-1] + note if run.output else "ok" + note, details
        )
    return CheckStep(name, FAIL, " | ".join(run.output.splitlines()[:10]) + note, details)


def _stage_backup_wal(backup: Path, archive: str, into: Path, key: EncryptionKey | None) -> None:
    """The segments of the backup's manifest's WAL-Ranges fetched from a managed archive (folder or URL) into
    ``into`` as wal-fetch writes them (decrypted, decompressed, checked against the archive's identity); a
    timeline's last one from its ``.partial`` when that is all the archive has; one missing is left for
    pg_waldump to name. The segment holding each range's end goes too when archived: pg_waldump may read
    past a range that ends on a segment boundary.

    :raises ValueError: the manifest has no WAL-Ranges.
    :raises BadPgControl: the copy's pg_control (the segment size) cannot be read.
    """
    from pg_safe_backup.wal_archive import fetch, open_store

    size = read_pg_control(backup).xlog_seg_size
    ranges = json.loads((backup / "backup_manifest").read_text()).get("WAL-Ranges") or []
    if not ranges:
        raise ValueError(f"{backup}/backup_manifest has no WAL-Ranges")
    store = open_store(archive)
    for r in ranges:
        tli, start, end = int(r["Timeline"]), r["Start-LSN"], r["End-LSN"]
        for name in [*wal_segment_names(start, end, tli, size), wal_file_holding(end, tli, size)]:
            for source in (name, f"{name}.partial"):
                if store.find(source):
                    fetch(source, into / name, store, key=key)
                    break


__all__ = [
    "ARCHIVE_ARG",
    "CHECKS",
    "FAIL",
    "LOG_TAIL_LINES",
    "LSN",
    "MANIFEST_READERS",
    "PASS",
    "SERVER_TOOLS",
    "SKIPPED",
    "BackupCheck",
    "CheckNotRun",
    "CheckStep",
    "VerifyResult",
    "backup_stop_lsn",
    "check_backup",
    "find_verifier",
    "record_check",
    "server_bindir",
    "verify_backup",
]
