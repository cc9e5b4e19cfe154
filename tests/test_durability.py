"""Durable before declared: a backup's data files, then its label and map, then its WAL (include_wal), then
its manifest, then its catalog entry, each fsynced with its folder before the next is written.

Seen from outside, as strace sees it: the copy and the store task each run in a process of their own
under ``strace -f -y`` (the file behind every descriptor). A file is durable once its bytes were fsynced
(under its name, or under a temporary name renamed to it afterwards) and its folder was fsynced after
it got its name; a folder likewise, its parent fsynced after it was made. The order is read from the
trace: a step is durable before the next one opens its first file for writing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from demo.load import wait_archived
from pg_safe_backup.files.wal import include_wal
from pg_safe_backup.hooks.backup import PostgresBackupHook
from pg_safe_backup.local_cluster import find_bindir, give_to_server_user
from pg_safe_backup.verify import check_backup

from backup_helpers import cluster_with_space, run_backup
from conftest import CONN_ID

SYSCALLS = "openat,fsync,fdatasync,rename,renameat,renameat2,mkdir,mkdirat"
INVARIANT = "SELECT count(*) = 3000 AND sum(id) = 4501500 FROM ledger"
#: What the finish task hands the store (its XCom).
FINISH_KEYS = ("backup_label", "tablespace_map", "system_identifier", "stop_lsn")

COPY = """
import json, sys
from pathlib import Path
from pg_safe_backup.files.copier import copy_data_directory
from pg_safe_backup.files.tarball import write_tar_backup
source, destination, engine, out = sys.argv[1:]
if engine == "tar":
    result = write_tar_backup(Path(source), Path(destination), compression="zstd")
else:
    result = copy_data_directory(source, destination)
Path(out).write_text(json.dumps({"sizes": result.sizes, "mtimes_ns": result.mtimes_ns,
                                 "checksums": result.checksums}))
"""
STORE = """
import json, sys
from pg_safe_backup.files.copier import CopyResult
from pg_safe_backup.operators.backup import Copied, PostgresStoreBackupLabelOperator
from pg_safe_backup.operators.copy import files_xcom
destination, wal_archive, given, out = sys.argv[1:]
given = json.loads(open(given).read())
copied = None
if given["copied"]:
    result = CopyResult(**given["copied"])
    copied = Copied.from_xcom([files_xcom(result, given["major"], "tar", "zstd")])
store = PostgresStoreBackupLabelOperator(
    task_id="store", backup="finish", destination="unused", include_wal=copied is None,
    wal_archive=wal_archive,
)
written = store.store(destination, given["backup"], copied, {"dag_id": "durability", "run_id": "r"})
open(out, "w").write(json.dumps(written))
"""


@dataclass(frozen=True)
class Call:
    """One system call that succeeded: its name, the paths it names (strace -y), its place in the trace."""

    at: int
    name: str
    paths: tuple[str, ...]
    args: str


_START = re.compile(r"^(\d+)\s+(\w+)\((.*)$")  # strace pads a short pid
_RESUMED = re.compile(r"^(\d+)\s+<\.\.\. (\w+) resumed>(.*)$")
_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')
_RETURNED = re.compile(r"^(.*)\)\s+= (.*)$")  # strace pads the " = " of a resumed call
_FD_PATH = re.compile(r"^\s*-?\d+<(.*)>")


def _path_of(fd: str, line: str) -> str:
    """The path strace -y gives a descriptor."""
    m = _FD_PATH.match(fd)
    assert m, f"no path in: {line}"
    return m.group(1)


def parse_trace(text: str) -> list[Call]:
    """The successful calls of ``strace -f -y -qq -s 4096`` output, each placed where it returned."""
    calls: list[Call] = []
    pending: dict[str, tuple[str, str]] = {}
    for line in text.splitlines():
        if m := _RESUMED.match(line):
            name, head = pending.pop(m.group(1))
            args = head + m.group(3)
        elif m := _START.match(line):
            name, args = m.group(2), m.group(3)
            if args.endswith("<unfinished ...>"):
                pending[m.group(1)] = (name, args[: -len("<unfinished ...>")])
                continue
        else:
            continue  # signals, exits
        args, ret = _RETURNED.match(args).groups()
        if ret.startswith("-1"):
            continue
        if name in ("fsync", "fdatasync"):
            paths = (_path_of(args, line),)
        elif name == "openat":
            paths = (_path_of(ret, line),)
        else:  # rename, renameat(2), mkdir(at): absolute paths here (the copy and store pass them so)
            paths = tuple(os.path.normpath(p) for p in _QUOTED.findall(args))
        calls.append(Call(len(calls), name, paths, args))
    return calls


def durable(calls: list[Call]) -> dict[str, int]:
    """Path -> the call after which it survives a power loss: its bytes fsynced (as its name, or as a name
    renamed to it afterwards), and its folder fsynced after it got its name (made, created or renamed)."""
    data: dict[str, int] = {}  # path -> when its bytes (or a folder's entries) were first fsynced
    named: dict[str, int] = {}  # path -> when it got its name
    entry: dict[str, int] = {}  # path -> when its folder was first fsynced after that
    for call in calls:
        if call.name == "openat" and "O_CREAT" in call.args:
            named.setdefault(call.paths[0], call.at)
        elif call.name in ("mkdir", "mkdirat"):
            named[call.paths[0]] = call.at
        elif call.name.startswith("rename"):
            old, new = call.paths
            named[new] = call.at
            entry.pop(new, None)
            if old in data:
                data[new] = data.pop(old)
            else:
                data.pop(new, None)
        elif call.name in ("fsync", "fdatasync"):
            path = call.paths[0]
            data.setdefault(path, call.at)
            for child, when in named.items():
                if os.path.dirname(child) == path and when < call.at:
                    entry.setdefault(child, call.at)
    return {path: max(data[path], entry[path]) for path in data.keys() & entry.keys()}


def first_write_open(calls: list[Call], matches: Callable[[str], bool]) -> int:
    """Where the first file ``matches`` accepts was opened to be written (or made)."""
    for c in calls:
        if c.name in ("openat", "mkdir", "mkdirat") and matches(c.paths[0]):
            if c.name != "openat" or re.search(r"O_WRONLY|O_RDWR|O_CREAT", c.args):
                return c.at
    raise AssertionError("no such file was opened to be written")


def traced(script: str, args: list[str], trace: Path) -> list[Call]:
    """Run ``script`` with ``args`` in a Python of its own under strace; its successful file calls."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    strace = ["strace", "-f", "-y", "-qq", "-s", "4096", "-e", f"trace={SYSCALLS}", "-o", str(trace)]
    command = [*strace, sys.executable, "-c", script, *args]
    done = subprocess.run(command, env=env, capture_output=True, timeout=600)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    return parse_trace(trace.read_text())


@dataclass
class Traced:
    """One backup copied by the plain and the tar engine and stored, each step traced."""

    root: Path
    copies: dict[str, Path]  # engine -> its copy
    copy_calls: dict[str, list[Call]]
    store_calls: dict[str, list[Call]]
    written: dict[str, dict]  # engine -> what the store wrote (its XCom)
    archive: Path
    backup: dict  # the finish's XCom


@pytest.fixture(scope="module")
def backed_up(module_tmp_root: Path) -> Iterator[Traced]:
    root = module_tmp_root
    with cluster_with_space(root) as (cluster, archive, location):
        cluster.sql(f"CREATE TABLESPACE space1 LOCATION '{location}'")
        # In the tablespace: the store writes a tablespace_map too.
        cluster.sql(
            "CREATE TABLE ledger TABLESPACE space1 AS"
            " SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 3000) g"
        )
        cluster.sql("CHECKPOINT")
        copies = {engine: root / "backups" / engine for engine in ("plain", "tar")}
        (root / "backups").mkdir()
        copy_calls: dict[str, list[Call]] = {}

        def copy() -> None:
            for engine, destination in copies.items():
                out = root / f"{engine}.copy.json"
                args = [str(cluster.datadir), str(destination), engine, str(out)]
                copy_calls[engine] = traced(COPY, args, root / f"{engine}.copy.trace")

        backup = run_backup(PostgresBackupHook(CONN_ID), "durability/run/backup", copy)
        wait_archived(cluster)
        major = cluster.server_version() // 10000
        store_calls, written = {}, {}
        for engine, destination in copies.items():
            tar = json.loads((root / f"{engine}.copy.json").read_text()) if engine == "tar" else None
            given = root / f"{engine}.store.json"
            finished = {key: backup[key] for key in FINISH_KEYS}
            given.write_text(json.dumps({"backup": finished, "copied": tar, "major": major}))
            out = root / f"{engine}.written.json"
            args = [str(destination), str(archive), str(given), str(out)]
            store_calls[engine] = traced(STORE, args, root / f"{engine}.store.trace")
            written[engine] = json.loads(out.read_text())
        yield Traced(root, copies, copy_calls, store_calls, written, archive, backup)


def catalog_entry(folder: Path) -> Path:
    """The backup's catalog entry: in its folder, or beside it in the root."""
    for path in (folder / "backup_info.json", folder.parent / f"{folder.name}.backup_info.json"):
        if path.exists():
            return path
    raise AssertionError(f"no catalog entry for {folder}")


@pytest.mark.parametrize("engine", ["plain", "tar"])
def test_label_and_map_then_wal_then_manifest_then_catalog_entry_each_durable_before_the_next(
    backed_up, engine
):
    folder = backed_up.copies[engine]
    calls = backed_up.store_calls[engine]
    done = durable(calls)
    label, tablespace_map = str(folder / "backup_label"), str(folder / "tablespace_map")
    manifest, entry = str(folder / "backup_manifest"), catalog_entry(folder)
    assert label in done, f"{label} was never fsynced with its folder"
    assert tablespace_map in done, f"{tablespace_map} was never fsynced with its folder"
    labelled = max(done[label], done[tablespace_map])
    wal_dir = str(folder / "pg_wal") + "/"
    wal = [wal_dir + name for name in backed_up.written[engine].get("wal", [])]
    assert bool(wal) == (engine == "plain")  # include_wal: only into a plain local copy
    for segment in wal:
        assert segment in done, f"{segment} was never fsynced with its folder"
    if wal:
        assert labelled < first_write_open(calls, lambda path: path.startswith(wal_dir))
    walled = max([labelled, *(done[segment] for segment in wal)])
    assert walled < first_write_open(calls, lambda path: path.startswith(manifest))
    assert manifest in done, f"{manifest} was never fsynced with its folder"
    catalogued = first_write_open(calls, lambda path: entry.name in os.path.basename(path))
    assert done[manifest] < catalogued
    assert str(entry) in done, f"{entry} was never fsynced with its folder"


@pytest.mark.parametrize("engine", ["plain", "tar"])
def test_every_file_and_folder_of_a_copy_is_durable_when_the_copy_returns(backed_up, engine):
    folder = backed_up.copies[engine]
    done = durable(backed_up.copy_calls[engine])
    made = [folder, *sorted(folder.rglob("*"))]
    copied = [
        str(path)
        for path in made
        if path.name not in ("backup_label", "tablespace_map", "backup_manifest", "backup_info.json")
        and "pg_wal/0" not in str(path)
    ]
    assert [path for path in copied if path not in done] == []


def test_the_traced_backup_restores_with_its_rows(backed_up):
    copy = backed_up.copies["plain"]
    give_to_server_user(copy)
    check = check_backup(copy, None, invariant_sql=INVARIANT, work_dir=backed_up.root)
    assert check.ok, check


def test_the_bare_pg_verifybackup_passes_on_an_extracted_tar_copy(backed_up, tmp_path):
    """Item 12: the tar copy's archives extracted as a plain data directory (each tablespace's into
    pg_tblspc/<oid>), its label files and manifest beside them copied in, its WAL fetched into pg_wal/:
    ``pg_verifybackup DIR`` with no option passes (nothing of ours lies among the backup's files)."""
    stored = backed_up.copies["tar"]
    extracted = tmp_path / "extracted"
    for archive in sorted(stored.glob("*.tar.zst")):
        oid = archive.name.split(".")[0]
        into = extracted if oid == "base" else extracted / "pg_tblspc" / oid
        into.mkdir(parents=True, exist_ok=True)
        subprocess.run(["tar", "--zstd", "-xf", str(archive), "-C", str(into)], check=True)
    for name in ("backup_label", "tablespace_map", "backup_manifest"):
        shutil.copy2(stored / name, extracted / name)
    assert sorted(p.name for p in stored.iterdir() if not p.name.endswith(".tar.zst")) == [
        "backup_label",
        "backup_manifest",
        "tablespace_map",
    ], "the tar copy's folder holds the archives, the label files and the manifest, nothing else"
    include_wal(
        extracted,
        backed_up.archive,
        backup_label=backed_up.backup["backup_label"],
        stop_lsn=backed_up.backup["stop_lsn"],
    )
    verifier = str(find_bindir(None) / "pg_verifybackup")
    bare = subprocess.run([verifier, str(extracted)], capture_output=True, text=True, timeout=300)
    assert bare.returncode == 0, bare.stdout + bare.stderr
