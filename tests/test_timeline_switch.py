"""A backup of a cascading standby whose upstream is promoted while the backup runs.

P (primary, archiving into ARCH) -> S1 (streaming standby of P, archive_mode=on: archives once promoted)
-> S2 (cascading standby of S1, restore_command from ARCH). The backup of S2 starts on timeline 1; S1 is
promoted and written to, S2 follows it onto timeline 2, the copy is taken there and the backup stops on
timeline 2. Its WAL spans two timelines: backup_manifest.c writes one WAL-Range per timeline, from the
history file, newest first; recovery must follow the stop's timeline; ``include_wal`` must copy both
timelines' segments and the history file.

One scenario (module fixture) serves every test: clusters are costly.
"""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import subprocess
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from demo.load import invariant_sql, wait_archived
from pg_safe_backup.catalog import list_backups
from pg_safe_backup.files.copier import copy_data_directory
from pg_safe_backup.files.manifest import ManifestError, backup_wal_ranges, timeline_at
from pg_safe_backup.hooks.backup import PostgresBackupHook
from pg_safe_backup.local_cluster import LocalCluster, as_server_user, give_to_server_user
from pg_safe_backup.operators.backup import TIMELINE_KEYS, PostgresStoreBackupLabelOperator
from pg_safe_backup.verify import PASS, check_backup, verify_backup

from backup_helpers import Pair, finish, pair_maker, req, started
from conftest import PASSWORD
from pg_versions import verifier_for

#: What the store task reads of the finish's XCom.
KEYS = ("backup_label", "tablespace_map", "system_identifier", "stop_lsn", *TIMELINE_KEYS)


@dataclass
class Switched:
    """The scenario, after the backup of S2 stopped on timeline 2."""

    pair: Pair  # P (primary) and S1 (standby, promoted during the backup)
    s2: LocalCluster
    archive: Path
    backup: dict  # the finish's event's backup (what the finish pushes to XCom)
    copy: Path  # S2's copy (the copy engine's), label files and manifest not yet stored
    rows_before_promotion: int
    rows_on_timeline_2: int  # ids 1..this are committed, the last ones on S1 after its promotion
    basebackup: Path  # pg_basebackup's backup of S2 in the same situation (extracted; its manifest inside)


def _wait(what: str, done, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.1)


def _replayed(standby: LocalCluster, source: LocalCluster) -> None:
    ((lsn,),) = source.sql(
        "SELECT CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()"
        " ELSE pg_current_wal_lsn() END::text"
    )
    _wait(
        f"{standby.datadir.name} replayed {lsn}",
        lambda: standby.sql("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", [lsn]) == [(True,)],
    )


def _cascading_standby(pair: Pair, folder: Path) -> LocalCluster:
    """S2: a standby of the standby S1 (pg_basebackup of S1), following the latest timeline, WAL also
    from the archive."""
    s1 = pair.standby
    subprocess.run(
        as_server_user(
            [
                str(s1.bindir / "pg_basebackup"),
                f"--host={s1.socket_dir}",
                f"--port={s1.port}",
                "--username=postgres",
                f"--pgdata={folder}",
                "--wal-method=stream",
                "--checkpoint=fast",
                "--no-manifest",
            ]
        ),
        check=True,
        capture_output=True,
    )
    s2 = LocalCluster(folder)
    (folder / "standby.signal").touch()
    s2.configure(
        {
            "primary_conninfo": f"'host={s1.socket_dir} port={s1.port} user=postgres'",
            "restore_command": f"'cp {pair.archive}/%f %p'",
            "recovery_target_timeline": "'latest'",
            "archive_mode": "off",
            "port": s2.port,
        }
    )
    give_to_server_user(folder)
    s2.start()
    _wait(
        "S2 streams from S1",
        lambda: s2.sql("SELECT count(*) FROM pg_stat_wal_receiver WHERE status = 'streaming'") == [(1,)],
    )
    return s2


def _controldata(datadir: Path) -> dict[str, str]:
    """pg_controldata of a data directory (a copy)."""
    out = subprocess.run(
        [str(LocalCluster(datadir).bindir / "pg_controldata"), str(datadir)],
        capture_output=True,
        text=True,
        check=True,
        env={"LC_ALL": "C"},
    ).stdout
    return dict(line.split(":", 1) for line in out.splitlines() if ":" in line) | {}


def _insert(cluster: LocalCluster, first: int, last: int) -> int:
    cluster.sql(
        "INSERT INTO ledger SELECT g, md5(g::text) FROM generate_series(%s::bigint, %s::bigint) g",
        [first, last],
    )
    return last


class _PausedBasebackup:
    """pg_basebackup of S2 as a tar on its stdout, not read until :meth:`finish`: the server blocks
    sending the data, so its backup spans whatever happens meanwhile (S1's promotion)."""

    def __init__(self, s2: LocalCluster) -> None:
        self.proc = subprocess.Popen(
            as_server_user(
                [
                    str(s2.bindir / "pg_basebackup"),
                    f"--host={s2.socket_dir}",
                    f"--port={s2.port}",
                    "--username=postgres",
                    "--pgdata=-",
                    "--format=tar",
                    "--wal-method=none",
                    "--checkpoint=fast",
                ]
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        streaming = [("streaming database files",)]
        _wait(
            "pg_basebackup of S2 sends files",
            lambda: s2.sql("SELECT phase FROM pg_stat_progress_basebackup") == streaming,
        )

    def finish(self, folder: Path) -> Path:
        """Let it end; its backup (the tar on stdout, backup_manifest included) extracted into ``folder``."""
        out, err = self.proc.communicate(timeout=120)
        assert self.proc.returncode == 0, err.decode(errors="replace")
        with tarfile.open(fileobj=io.BytesIO(out)) as tar:
            tar.extractall(folder, filter="tar")
        assert (folder / "backup_manifest").is_file()
        return folder


@pytest.fixture(scope="module")
def switched(module_tmp_root: Path) -> Iterator[Switched]:
    root = module_tmp_root
    env = pytest.MonkeyPatch()
    with pair_maker(root, env) as make:
        archive = root / "archive"
        pair = make(archive_mode="on", archive_command=f"'cp %p {archive}/%f'", checkpoint_timeout="'1h'")
        s2 = _cascading_standby(pair, root / "s2")
        try:
            env.setenv("AIRFLOW_CONN_PG_S2", s2.airflow_conn_uri(password=PASSWORD))
            hook = PostgresBackupHook("pg_s2", state_conn_id="pg_primary")
            rows = _insert(pair.primary, 1, 5000)
            _replayed(pair.standby, pair.primary)
            _replayed(s2, pair.standby)
            s1 = pair.standby
            copy = root / "copy"
            result: dict = {}

            def promote_then_copy() -> None:
                paused = _PausedBasebackup(s2)
                s1.run("pg_ctl", "-D", str(s1.datadir), "-w", "promote")
                result["rows_on_1"] = rows
                last = _insert(s1, rows + 1, rows + 3000)
                # The promoted S1 archives the history file and, once switched, timeline 2's segments.
                _wait("00000002.history archived", lambda: (archive / "00000002.history").is_file())
                _replayed(s2, s1)
                assert s2.sql("SELECT received_tli FROM pg_stat_wal_receiver") == [(2,)]
                # S2 has replayed no checkpoint record of timeline 2 yet (S1's is spread over its long
                # checkpoint_timeout): its CHECKPOINT skips the restartpoint but moves its minimum recovery
                # point to what it replayed, on timeline 2, while its checkpoint stays on timeline 1.
                s2.sql("CHECKPOINT")
                copy_data_directory(s2.datadir, copy, fsync=False)
                result["control"] = _controldata(copy)
                # The stop in a later segment than the switch: timeline 1 has no WAL there at all.
                s1.sql("SELECT pg_switch_wal()")
                last = _insert(s1, last + 1, last + 1000)
                s1.sql("CHECKPOINT")
                _replayed(s2, s1)
                s2.sql("CHECKPOINT")
                result["rows_on_2"] = last
                result["basebackup"] = paused

            async def backup() -> tuple[dict, dict]:
                r = req("nightly/switch/s2", poll_interval=0.5, wait_for_archive=False)
                holder, opened = await started(hook, r)
                await asyncio.to_thread(promote_then_copy)
                done = await finish(hook, r.attempt, opened["backup"]["start_lsn"], timeout=120)
                return await asyncio.wait_for(holder, 60), done

            held, done = asyncio.run(backup())
            control = {k: v.strip() for k, v in result["control"].items()}
            # The case of the issue: the copy is consistent on timeline 2, its checkpoint is on timeline 1.
            assert control["Latest checkpoint's TimeLineID"] == "1", control
            assert control["Min recovery ending loc's timeline"] == "2", control
            assert done["status"] == held["status"] == "complete", (held, done)
            basebackup = result["basebackup"].finish(root / "basebackup")
            wait_archived(s1)  # the end of timeline 2's WAL (and what came before) is in ARCH
            # The old primary archives its last segment of timeline 1 whole (S1 archived it as .partial).
            wait_archived(pair.primary)
            yield Switched(
                pair=pair,
                s2=s2,
                archive=archive,
                backup=done["backup"],
                copy=copy,
                rows_before_promotion=result["rows_on_1"],
                rows_on_timeline_2=result["rows_on_2"],
                basebackup=basebackup,
            )
        finally:
            s2.stop("immediate")
            env.undo()


def _stored(s: Switched, folder: Path, **store_options) -> tuple[Path, dict]:
    """A copy of the scenario's copy, stored by the store task (label files, manifest, catalog entry)."""
    shutil.copytree(s.copy, folder, symlinks=True)
    store = PostgresStoreBackupLabelOperator(
        task_id="store", backup="backup.finish_backup", destination=str(folder), **store_options
    )
    written = store.store(str(folder), {key: s.backup.get(key) for key in KEYS})
    return folder, written


def _wal_ranges(manifest: dict) -> list[tuple[int, str, str]]:
    return [(r["Timeline"], r["Start-LSN"], r["End-LSN"]) for r in manifest["WAL-Ranges"]]


def _failover_archive(s: Switched, folder: Path) -> tuple[Path, str]:
    """ARCH as it is when the old primary is gone: its last segment of timeline 1, the one where S1 was
    promoted, only as the ``.partial`` S1 archived. Returns the folder and that segment's name."""
    (partial,) = [f.name for f in s.archive.iterdir() if f.name.endswith(".partial")]
    segment = partial.removesuffix(".partial")
    folder.mkdir()
    for f in s.archive.iterdir():
        if not (f.name[:8] == segment[:8] and len(f.name) == 24 and f.name >= segment):
            shutil.copy2(f, folder / f.name)
    return folder, segment


def _pg_verifybackup(s: Switched, folder: Path, wal: Path | None) -> subprocess.CompletedProcess:
    bindir, _ = verifier_for(s.s2.server_version() // 10000)
    # backup_info.json is not in the manifest (while the catalog lives in the backup's folder).
    ignore = ["-i", "backup_info.json"] if (folder / "backup_info.json").exists() else []
    wal_path = ["-w", str(wal)] if wal else []
    return subprocess.run(
        [str(bindir / "pg_verifybackup"), *wal_path, *ignore, str(folder)], capture_output=True, text=True
    )


def _every_check_passes(s: Switched, folder: Path, archive: Path | None) -> None:
    """check_backup (page LSNs, pg_verifybackup, the restore check to the backup's consistent point, with
    every row committed before the promotion) passes ``folder``; ``archive`` None: self-contained."""
    report = check_backup(
        folder,
        archive,
        verifier_bindir=verifier_for(s.s2.server_version() // 10000)[0],
        invariant_sql=invariant_sql(("ledger",), s.rows_before_promotion),
    )
    assert report.ok, report.summary()
    assert [step.status for step in report.steps] == [PASS, PASS, PASS], report.summary()


def test_the_manifest_has_one_wal_range_per_timeline_as_pg_basebackup_writes_them(switched, tmp_root):
    folder, _ = _stored(switched, tmp_root / "stored")
    ranges = _wal_ranges(json.loads((folder / "backup_manifest").read_text()))
    switch = (switched.archive / "00000002.history").read_text().split()[1]
    start, stop = switched.backup["start_lsn"], switched.backup["stop_lsn"]
    assert ranges == [(2, switch, stop), (1, start, switch)]
    assert switched.backup["stop_timeline"] == 2
    (listed,) = list_backups(tmp_root)
    assert (listed.proof.ok, listed.proof.start_tli, listed.proof.stop_tli) == (True, 1, 2), listed.proof
    assert listed.info.stop_wal.startswith("00000002"), "the catalog names the stop WAL on timeline 2"
    # pg_basebackup of the same standby, across the same promotion: the same ranges but for its own
    # start and stop.
    theirs = _wal_ranges(json.loads((switched.basebackup / "backup_manifest").read_text()))
    assert [(tli, tli_start) for tli, tli_start, _ in theirs][:1] == [(2, switch)], theirs
    assert [(tli, tli_end) for tli, _, tli_end in theirs][1:] == [(1, switch)], theirs


def test_pg_verifybackup_parses_both_timelines_from_the_archive(switched, tmp_root):
    folder, _ = _stored(switched, tmp_root / "stored")
    run = _pg_verifybackup(switched, folder, switched.archive)
    assert run.returncode == 0, run.stdout + run.stderr
    assert _pg_verifybackup(switched, switched.basebackup, switched.archive).returncode == 0


def test_without_the_old_timeline_s_last_segment_pg_verifybackup_fails_alike_for_pg_basebackup(
    switched, tmp_root
):
    """pg_waldump reads no .partial file: with the old primary gone, the archive lacks timeline 1's last
    segment whole, and pg_verifybackup -w fails a pg_basebackup of the same standby the same way
    (include_wal below makes a copy that needs no archive)."""
    archive, segment = _failover_archive(switched, tmp_root / "failover_archive")
    folder, _ = _stored(switched, tmp_root / "stored")
    ours = _pg_verifybackup(switched, folder, archive)
    theirs = _pg_verifybackup(switched, switched.basebackup, archive)
    assert ours.returncode == theirs.returncode == 1, (ours.stderr, theirs.stderr)
    assert f'could not find file "{segment}"' in ours.stderr, ours.stderr
    assert f'could not find file "{segment}"' in theirs.stderr, theirs.stderr


def test_verify_passes_it_page_lsns_pg_verifybackup_and_restore_check(switched, tmp_root):
    folder, _ = _stored(switched, tmp_root / "stored")
    _every_check_passes(switched, folder, switched.archive)


def test_include_wal_copies_both_timelines_and_it_recovers_without_an_archive(switched, tmp_root):
    archive, segment = _failover_archive(switched, tmp_root / "failover_archive")
    folder, written = _stored(
        switched, tmp_root / "self_contained", include_wal=True, wal_archive=str(archive)
    )
    assert "00000002.history" in written["wal"]
    assert segment in written["wal"]  # from its .partial: timeline 1's WAL up to the switch
    assert f"{'00000002'}{segment[8:]}" in written["wal"]
    assert {name[:8] for name in written["wal"] if not name.endswith(".history")} == {"00000001", "00000002"}
    assert _pg_verifybackup(switched, folder, None).returncode == 0
    _every_check_passes(switched, folder, None)


def test_restored_to_the_end_of_the_archive_it_has_the_rows_written_on_timeline_2(switched, tmp_root):
    folder, _ = _stored(switched, tmp_root / "stored")
    whole = verify_backup(
        folder,
        switched.archive,
        recovery_target_immediate=False,
        invariant_sql=invariant_sql(("ledger",), switched.rows_on_timeline_2),
    )
    assert whole.ok, whole.summary()
    assert whole.details["timeline"] == 3  # promoted at the end of timeline 2


# ------------------------------------------------------------------------- the stop's timeline, no server
HISTORY_3 = "1\t0/3000000\tno recovery target specified\n\n2\t0/5000000\tno recovery target specified\n"


@pytest.mark.parametrize(
    ("stop", "timeline", "history"),
    [
        ("0/2000000", 1, None),  # before the first switch: timeline 1 has no history file
        ("0/3000000", 1, None),  # at the switch: the WAL before it is timeline 1's
        ("0/3000001", 2, "1\t0/3000000\tno recovery target specified\n"),
        ("0/5000000", 2, "1\t0/3000000\tno recovery target specified\n"),
        ("0/5000001", 3, HISTORY_3),
    ],
)
def test_the_stop_timeline_is_the_one_holding_the_wal_before_the_stop(stop, timeline, history):
    assert timeline_at(stop, 3, HISTORY_3) == (timeline, history)


def test_the_stop_timeline_of_timeline_1_needs_no_history_but_of_another_one_does():
    assert timeline_at("0/5000000", 1, None) == (1, None)
    with pytest.raises(ValueError, match="needs its history file"):
        timeline_at("0/5000000", 2, None)


def test_the_ranges_of_a_backup_that_stopped_on_the_next_timeline_end_where_each_timeline_ends():
    label = "START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\nSTART TIMELINE: 1\n"
    stop_timeline, history = timeline_at("0/6000100", 3, HISTORY_3)
    ranges = backup_wal_ranges(label, "0/6000100", 15, stop_timeline, history)
    assert [(r.timeline, r.start_lsn, r.end_lsn) for r in ranges] == [
        (3, "0/5000000", "0/6000100"),
        (2, "0/3000000", "0/5000000"),
        (1, "0/2000028", "0/3000000"),
    ]
    with pytest.raises(ManifestError, match="timeline history file of 3"):
        backup_wal_ranges(label, "0/6000100", 15, 3, None)


def test_the_standby_s_timeline_history_is_read_by_a_role_granted_pg_read_file(switched, tmp_root):
    """The holder reads the new timeline's history file on the standby only when it changed timeline:
    a role without the right gets the GRANT that fixes it."""
    s1, s2 = switched.pair.standby, switched.s2
    s1.sql(f"CREATE ROLE timeline_op LOGIN PASSWORD '{PASSWORD}'")
    _replayed(s2, s1)
    env = pytest.MonkeyPatch()
    env.setenv("AIRFLOW_CONN_PG_S2_OP", s2.airflow_conn_uri(user="timeline_op", password=PASSWORD))
    hook = PostgresBackupHook("pg_s2_op")

    async def replay_timeline() -> tuple[int | None, str | None]:
        async with hook.connect(backup_server=True) as conn:
            try:
                return await hook.replay_timeline(conn, 1)
            except psycopg.errors.InsufficientPrivilege as err:
                return None, hook.explain(err, conn)

    try:
        timeline, refused = asyncio.run(replay_timeline())
        assert timeline is None
        assert 'GRANT EXECUTE ON FUNCTION pg_catalog.pg_read_file(text) TO "timeline_op"' in refused, refused
        s1.sql("GRANT EXECUTE ON FUNCTION pg_catalog.pg_read_file(text) TO timeline_op")
        _replayed(s2, s1)
        history = (switched.archive / "00000002.history").read_text()
        assert asyncio.run(replay_timeline()) == (2, history)
        assert asyncio.run(_known(hook)) == (2, None)  # the history of the timeline known is not read
    finally:
        env.undo()


async def _known(hook: PostgresBackupHook) -> tuple[int | None, str | None]:
    async with hook.connect(backup_server=True) as conn:
        return await hook.replay_timeline(conn, 2)
