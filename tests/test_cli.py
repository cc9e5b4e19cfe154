"""The ``pg-safe-backup`` command as a DBA runs it: ``--version``, ``--json`` on every subcommand, one error
format and the exit statuses the main ``--help`` documents, flags (never Python parameters) in messages,
``list``'s age, duration and cluster columns, and a closed pipe that ends the output, never the work.

Real backups of two real clusters under one root (:func:`backup_helpers.cluster_with_space` twice), each
command run as a process (:func:`backup_helpers.run_cli`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pytest

from demo.load import wait_archived
from pg_safe_backup import __version__
from pg_safe_backup.catalog import CLUSTER_DIGITS, entry_path, read_info, span
from pg_safe_backup.cli import EXIT_STATUSES, FAILED, FETCH_FAILED, NO_VERDICT, OK, USAGE
from pg_safe_backup.local_cluster import LocalCluster, give_to_server_user
from pg_safe_backup.proof import prove_backup

from backup_helpers import catalogued_backup, cli_env, cluster_with_space, run_cli
from pg_versions import verifier_for


@dataclass
class Fleet:
    """Two clusters, each with one catalogued backup under one ``root``; ``a`` has a second one."""

    a: LocalCluster
    b: LocalCluster
    archive_a: Path
    archive_b: Path
    root: Path
    backup_a: Path  # a's newest
    older_a: Path
    backup_b: Path
    scratch: Path


def _server_dir(parent: Path, name: str) -> Path:
    folder = parent / name
    folder.mkdir()
    os.chmod(folder, 0o755)
    return folder


@pytest.fixture(scope="module")
def fleet(module_tmp_root: Path) -> Iterator[Fleet]:
    root = module_tmp_root / "backups"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    with cluster_with_space(_server_dir(module_tmp_root, "a")) as (a, archive_a, _):
        a.sql("CREATE TABLE t (n int)")
        a.sql("INSERT INTO t SELECT g FROM generate_series(1, 100) g")
        catalogued_backup(a, root / "a" / "older", "cli/run1/backup")
        a.sql("INSERT INTO t SELECT g FROM generate_series(101, 200) g")
        catalogued_backup(a, root / "a" / "newest", "cli/run2/backup")
        wait_archived(a)
        with cluster_with_space(_server_dir(module_tmp_root, "b"), fresh=True) as (b, archive_b, _):
            catalogued_backup(b, root / "b" / "nightly", "cli/run1/backup")
            wait_archived(b)
            scratch = _server_dir(module_tmp_root, "scratch")
            give_to_server_user(scratch)  # restores and checks write beside their data
            yield Fleet(
                a, b, archive_a, archive_b, root, root / "a" / "newest", root / "a" / "older",
                root / "b" / "nightly", scratch,
            )  # fmt: skip


def system_identifier(cluster: LocalCluster) -> str:
    return str(cluster.sql("SELECT system_identifier FROM pg_control_system()")[0][0])


def one_document(done: subprocess.CompletedProcess) -> object:
    """The one JSON document ``--json`` prints on stdout (nothing before or after it)."""
    return json.loads(done.stdout)


def error_line(done: subprocess.CompletedProcess, command: str) -> str:
    """The one ``pg-safe-backup COMMAND: error: ...`` line on stderr (after argparse's usage, if any)."""
    errors = [line for line in done.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1, done.stderr
    assert errors[0].startswith(f"pg-safe-backup {command}: error: "), done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    return errors[0].removeprefix(f"pg-safe-backup {command}: error: ")


# ----------------------------------------------------------------------------------- --version, --help
def test_version_prints_the_package_version():
    done = run_cli("--version")
    assert done.returncode == OK, done.stderr
    assert done.stdout == f"pg-safe-backup {__version__}\n"


def test_the_main_help_documents_each_exit_status_and_the_json_shape():
    done = run_cli("--help")
    assert done.returncode == OK, done.stderr
    assert EXIT_STATUSES in done.stdout
    for status in (OK, FAILED, USAGE, NO_VERDICT, FETCH_FAILED):
        assert re.search(rf"^  {status} +\w", done.stdout, re.MULTILINE), status
    assert '{"ok": false, "error": WHAT,\n"exit_code": N}' in done.stdout


@pytest.mark.parametrize(
    "command", ["verify", "list", "retention", "restore", "check", "wal-push", "wal-fetch"]
)
def test_every_subcommand_takes_json(command):
    done = run_cli(command, "--help")
    assert done.returncode == OK, done.stderr
    assert "--json" in done.stdout and "print one JSON document" in done.stdout


# ------------------------------------------------------------------------------------------------ list
def table(stdout: str) -> list[dict[str, str]]:
    """``list``'s rows by column, cut where each header starts (cells are padded to the header's place)."""
    head, *rows = stdout.splitlines()
    names = re.findall(r"\S+(?: \S+)*", head)
    starts = [head.index(name) for name in names]
    ends = [*starts[1:], None]
    backups = [r for r in rows if not r.startswith("/") and not re.fullmatch(r"\d+ backups?", r)]
    return [{n: row[s:e].strip() for n, s, e in zip(names, starts, ends, strict=True)} for row in backups]


def seconds_of(shown: str) -> float:
    """The seconds a :func:`span` stands for (``0.3s``, ``4m12s``, ``2d03h``)."""
    scale = {"d": 86400, "h": 3600, "m": 60, "s": 1}
    parts = re.findall(r"(\d+(?:\.\d+)?)([dhms])", shown)
    assert parts and "".join(n + u for n, u in parts) == shown, shown
    return sum(float(n) * scale[u] for n, u in parts)


def test_list_shows_each_backups_age_duration_and_cluster_two_clusters_apart(fleet):
    before = datetime.now(timezone.utc)
    done = run_cli("list", fleet.root, timeout=60)
    after = datetime.now(timezone.utc)
    assert done.returncode == OK, done.stderr
    rows = {Path(r["folder"]).name: r for r in table(done.stdout)}
    assert set(rows) == {"older", "newest", "nightly"}, done.stdout
    for cluster, folders in ((fleet.a, ("older", "newest")), (fleet.b, ("nightly",))):
        for folder in folders:
            assert rows[folder]["cluster"] == system_identifier(cluster)[-CLUSTER_DIGITS:], rows[folder]
    assert rows["newest"]["cluster"] != rows["nightly"]["cluster"], "two clusters must look different"
    for name, folder in (("older", fleet.older_a), ("newest", fleet.backup_a), ("nightly", fleet.backup_b)):
        info, proof = read_info(folder), prove_backup(folder)
        took = (info.stopped - proof.start_time).total_seconds()
        assert rows[name]["took"] == span(took), rows[name]
        # Counted when list ran, between the two reads of the clock (a span shows tenths below 10 s,
        # whole seconds up to a minute: within one second of that range).
        low, high = ((at - info.stopped).total_seconds() for at in (before, after))
        assert low - 1 <= seconds_of(rows[name]["age"]) <= high + 1, (rows[name], low, high)


def test_list_json_has_the_same_fields_and_keeps_the_earlier_keys(fleet):
    before = datetime.now(timezone.utc)
    done = run_cli("list", fleet.root, "--json", timeout=60)
    after = datetime.now(timezone.utc)
    assert done.returncode == OK, done.stderr
    listed = {Path(e["folder"]).name: e for e in one_document(done)}
    for name, folder, cluster in (
        ("older", fleet.older_a, fleet.a),
        ("newest", fleet.backup_a, fleet.a),
        ("nightly", fleet.backup_b, fleet.b),
    ):
        entry = listed[name]
        assert {"folder", "status", "verified", "proof", "info", "info_error"} <= set(entry), entry.keys()
        assert entry["cluster"] == system_identifier(cluster)[-CLUSTER_DIGITS:]
        info, proof = read_info(folder), prove_backup(folder)
        assert entry["duration_seconds"] == round((info.stopped - proof.start_time).total_seconds(), 1)
        since = [(at - info.stopped).total_seconds() for at in (before, after)]
        assert since[0] - 0.05 <= entry["age_seconds"] <= since[1] + 0.05, (entry["age_seconds"], since)


# ------------------------------------------------------------------------------------- JSON of each one
def test_verify_json_is_the_report_and_where_it_was_recorded(fleet):
    verifier = verifier_for(fleet.b.server_version() // 10000)[0]
    done = run_cli(
        "verify", fleet.backup_b, fleet.archive_b, "--no-restore", "--verifier-bindir", verifier, "--json",
        timeout=120,
    )  # fmt: skip
    assert done.returncode == OK, done.stdout + done.stderr
    report = one_document(done)
    assert report["ok"] is True and report["summary"].startswith("PASS: "), report
    assert report["checks"]["pg_verifybackup"]["status"] == "PASS", report["checks"]
    assert report["recorded"] == str(entry_path(fleet.backup_b))
    assert read_info(fleet.backup_b).verifications[-1]["summary"] == report["summary"].splitlines()[0]


def test_retention_json_of_a_plan_and_of_a_run_that_deletes(fleet):
    root = fleet.scratch / "retention"
    shutil.copytree(fleet.root / "a", root, symlinks=True)
    before = sorted(p.name for p in root.iterdir())

    planned = run_cli("retention", root, "--keep-last", "1", "--dry-run", "--json", timeout=120)
    assert planned.returncode == OK, planned.stdout + planned.stderr
    plan = one_document(planned)
    assert plan["ok"] is True and plan["dry_run"] is True
    assert plan["deleted"] == [str(root / "older")] and list(plan["kept"]) == [str(root / "newest")]
    assert f"would delete {root / 'older'}" in planned.stderr, "the lines for a person go to stderr"
    assert sorted(p.name for p in root.iterdir()) == before, "a dry run changes nothing"

    done = run_cli("retention", root, "--keep-last", "1", "--json", timeout=120)
    assert done.returncode == OK, done.stdout + done.stderr
    report = one_document(done)
    assert report["dry_run"] is False and report["deleted"] == [str(root / "older")]
    assert not (root / "older").exists() and (root / "newest" / "backup_label").is_file()


def test_restore_json_says_what_was_restored_and_how_to_start_it(fleet):
    target = fleet.scratch / "restored"
    done = run_cli(
        "restore", fleet.backup_a, target, "--wal-archive", fleet.archive_a, "--archive-mode", "off", "--json"
    )
    assert done.returncode == OK, done.stdout + done.stderr
    result = one_document(done)
    assert (
        result["ok"] is True and result["target"] == str(target) and result["backup"] == str(fleet.backup_a)
    )
    assert result["files"] > 0 and result["bytes"] > 0 and result["archive_mode"] == "off"
    assert f"-D {target} start" in result["start_command"]
    assert " MB of " in done.stderr, "the copy's progress goes to stderr"
    assert (target / "recovery.signal").is_file() and (target / "PG_VERSION").is_file()


def test_check_json_is_the_findings_and_the_status_follows_them(fleet):
    dsn = f"host={fleet.a.socket_dir} port={fleet.a.port} dbname=postgres user=postgres"
    done = run_cli("check", "--dsn", dsn, "--archive", fleet.archive_a, "--timeout", "30", "--json")
    result = one_document(done)
    levels = {f["level"] for f in result["findings"]}
    expected = OK if result["ok"] else FAILED if "PROBLEM" in levels else NO_VERDICT
    assert done.returncode == expected, done.stdout + done.stderr
    assert result["ok"] is True, result  # a superuser of an archiving cluster with its state table
    assert result["summary"].startswith("check of ") and "ready" in result["summary"]
    assert {"wal_level", "archiving"} <= {f["check"] for f in result["findings"]}


def test_wal_push_and_wal_fetch_json_by_hand(fleet):
    archive = fleet.scratch / "wal_by_hand"
    archive.mkdir()
    name = min(p.name for p in fleet.archive_a.iterdir() if re.fullmatch(r"[0-9A-F]{24}", p.name))
    # wal-push reads the archive's identity from the data directory it runs in, as archive_command does
    pushed = run_cli("wal-push", "--archive", archive, fleet.archive_a / name, "--json", cwd=fleet.a.datadir)
    assert pushed.returncode == OK, pushed.stderr
    assert one_document(pushed) == {"ok": True, "wal": name}
    fetched_to = fleet.scratch / "fetched"
    fetched = run_cli("wal-fetch", "--archive", archive, name, fetched_to, "--json")
    assert fetched.returncode == OK, fetched.stderr
    assert one_document(fetched) == {"ok": True, "wal": name, "path": str(fetched_to)}
    assert fetched_to.read_bytes() == (fleet.archive_a / name).read_bytes()
    absent = "00000001000000FF00000000"
    missing = run_cli("wal-fetch", "--archive", archive, absent, fleet.scratch / "never", "--json")
    assert missing.returncode == FAILED and missing.stderr == "", "the end of the archive is silent"
    assert one_document(missing) == {
        "ok": False,
        "error": f"the archive does not hold {absent}",
        "exit_code": FAILED,
    }


# ------------------------------------------------------------------- one error format, the exit statuses
#: (what to run, from the fleet; its exit status; what its one error line holds)
ERRORS = {
    "list: ROOT not there": (
        lambda f: ["list", f.scratch / "none"],
        USAGE,
        "ROOT {scratch}/none is not a folder",
    ),
    "list: an unknown flag": (
        lambda f: ["list", f.root, "--bogus"],
        USAGE,
        "unrecognized arguments: --bogus",
    ),
    "verify: BACKUP not there": (
        lambda f: ["verify", f.scratch / "none"],
        USAGE,
        "BACKUP {scratch}/none is not a folder",
    ),
    "verify: a key file that is not there": (
        lambda f: ["verify", f.backup_b, "--encryption-key-file", f.scratch / "no.key"],
        USAGE,
        "{scratch}/no.key",
    ),
    "verify: could not check (no archive)": (
        lambda f: ["verify", f.backup_b, f.scratch / "no_archive", "--no-restore"],
        NO_VERDICT,
        "{scratch}/no_archive",
    ),
    "retention: no policy": (
        lambda f: ["retention", f.root],
        USAGE,
        "give --keep-last N and/or --keep-days D",
    ),
    "retention: --keep-last 0": (
        lambda f: ["retention", f.root, "--keep-last", "0"],
        USAGE,
        "--keep-last must be at least 1, got 0",
    ),
    "retention: --keep-days -1": (
        lambda f: ["retention", f.root, "--keep-days", "-1"],
        USAGE,
        "--keep-days must not be negative, got -1.0",
    ),
    "retention: not a number": (
        lambda f: ["retention", f.root, "--keep-last", "x"],
        USAGE,
        "argument --keep-last: invalid int value: 'x'",
    ),
    "retention: two clusters": (
        lambda f: ["retention", f.root, "--keep-last", "1", "--dry-run"],
        FAILED,
        "holds backups of 2 clusters",
    ),
    "retention: --wal-archive not there": (
        lambda f: ["retention", f.root / "a", "--keep-last", "1", "--wal-archive", f.scratch / "none"],
        USAGE,
        "--wal-archive {scratch}/none is not a folder",
    ),
    "restore: a bad --target-action": (
        lambda f: [
            "restore",
            f.backup_a,
            f.scratch / "never",
            "--wal-archive",
            f.archive_a,
            "--target-action",
            "x",
        ],
        USAGE,
        "argument --target-action: invalid choice: 'x'",
    ),
    "restore: another cluster's archive": (
        lambda f: ["restore", f.backup_a, f.scratch / "never", "--wal-archive", f.archive_b],
        FAILED,
        "another cluster",
    ),
    "check: --timeout 0": (
        lambda f: ["check", "--dsn", "host=/nonexistent", "--timeout", "0"],
        USAGE,
        "--timeout must be a number of seconds > 0, got 0",
    ),
    "check: a server out of reach": (
        lambda f: ["check", "--dsn", f"host={f.scratch} port=1", "--timeout", "1"],
        NO_VERDICT,
        "--dsn: cannot connect to the server",
    ),
    "wal-push: --parallel 0": (
        lambda f: ["wal-push", "--archive", f.scratch, "--parallel", "0", "pg_wal/x"],
        USAGE,
        "--parallel 0: give 1 or more",
    ),
    "wal-push: no archive folder": (
        lambda f: ["wal-push", "--archive", f.scratch / "none", f.archive_a / "x"],
        FAILED,
        "--archive {scratch}/none: no such folder",
    ),
    "wal-fetch: no archive folder": (
        lambda f: ["wal-fetch", "--archive", f.scratch / "none", "000000010000000000000001", f.scratch / "w"],
        FETCH_FAILED,
        "--archive {scratch}/none: no such folder",
    ),
    "wal-fetch: an unknown flag": (
        lambda f: ["wal-fetch", "--bogus", "000000010000000000000001", f.scratch / "w"],
        FETCH_FAILED,
        "unrecognized arguments: --bogus",
    ),
}


@pytest.mark.parametrize("json_mode", [False, True], ids=["text", "json"])
@pytest.mark.parametrize("case", list(ERRORS))
def test_each_failure_is_one_error_line_with_its_documented_status(fleet, case, json_mode):
    args, status, named = ERRORS[case]
    argv = [str(a) for a in args(fleet)] + (["--json"] if json_mode else [])
    done = run_cli(*argv, timeout=120, cwd=fleet.a.datadir if argv[0] == "wal-push" else None)
    assert done.returncode == status, done.stdout + done.stderr
    line = error_line(done, argv[0])
    assert named.format(scratch=fleet.scratch) in line, line
    if json_mode:
        assert one_document(done) == {"ok": False, "error": line, "exit_code": status}
    else:
        assert "exit_code" not in done.stdout


def test_messages_name_flags_never_python_parameters(fleet):
    """The domain's messages serve the operators too (``keep_last``, ``require_backup_label=False``): the
    command names its flags."""
    zero = run_cli("retention", fleet.root, "--keep-last", "0")
    assert "--keep-last" in zero.stderr and "keep_last" not in zero.stderr, zero.stderr
    unlabeled = fleet.scratch / "unlabeled"
    shutil.copytree(fleet.backup_b, unlabeled, symlinks=True)
    (unlabeled / "backup_label").unlink()
    for json_mode in ([], ["--json"]):
        done = run_cli("verify", unlabeled, fleet.archive_b, "--no-page-lsn", "--no-verifybackup", *json_mode)
        assert done.returncode == FAILED, done.stdout + done.stderr
        assert "has no backup_label" in done.stdout and "--allow-missing-label" in done.stdout, done.stdout
        assert "require_backup_label" not in done.stdout + done.stderr


# ---------------------------------------------------------------------------------------- a closed pipe
def closed_stdout(*args: str | Path, cwd: Path | None = None, timeout: float = 300) -> tuple[int, str]:
    """``pg-safe-backup ARGS`` whose reader is gone before it writes (stdout's pipe closed at once), as
    ``| head -1`` leaves it: its exit status and stderr."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "pg_safe_backup", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=cli_env(),
        cwd=cwd,
    )
    proc.stdout.close()  # before the interpreter has even started: every write finds no reader
    try:
        stderr = proc.stderr.read().decode()
        return proc.wait(timeout=timeout), stderr
    finally:
        proc.kill()


@pytest.mark.parametrize("args", [["list", "--json"], ["list"], ["--help"], ["--version"]], ids=" ".join)
def test_a_closed_pipe_ends_the_output_quietly(fleet, args):
    argv = [args[0], fleet.root, *args[1:]] if args[0] == "list" else args
    status, stderr = closed_stdout(*argv)
    assert (status, stderr) == (OK, "")


def test_list_json_into_head_prints_its_first_line_and_nothing_else(fleet):
    script = f'"{sys.executable}" -m pg_safe_backup list "{fleet.root}" --json | head -1'
    script += '; echo "${PIPESTATUS[0]}"'
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=cli_env(), timeout=60)
    assert done.stdout.splitlines() == ["[", str(OK)], done.stdout
    assert done.stderr == ""


def test_a_closed_pipe_never_stops_a_restore_nor_a_retention_nor_a_push(fleet):
    target = fleet.scratch / "restored_unread"
    status, stderr = closed_stdout("restore", fleet.backup_a, target, "--wal-archive", fleet.archive_a)
    assert (status, stderr) == (OK, "")
    assert (target / "recovery.signal").is_file() and (target / "postgresql.auto.conf").is_file()
    assert "restore_command" in (target / "postgresql.auto.conf").read_text(), "written after a line was lost"

    root = fleet.scratch / "retention_unread"
    shutil.copytree(fleet.root / "a", root, symlinks=True)
    status, stderr = closed_stdout("retention", root, "--keep-last", "1")  # a line per backup, kept first
    assert (status, stderr) == (OK, "")
    assert not (root / "older").exists() and not entry_path(root / "older").exists(), "carried out to its end"
    assert (root / "newest" / "backup_label").is_file()

    archive = fleet.scratch / "wal_unread"
    archive.mkdir()
    name = min(p.name for p in fleet.archive_a.iterdir() if re.fullmatch(r"[0-9A-F]{24}", p.name))
    status, stderr = closed_stdout(
        "wal-push", "--archive", archive, fleet.archive_a / name, "--json", cwd=fleet.a.datadir
    )
    assert (status, stderr) == (OK, "")
    assert (archive / name).read_bytes() == (fleet.archive_a / name).read_bytes()
