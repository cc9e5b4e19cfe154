"""Times from the command line (``--target-time``, ``--latest-before``) are read as
PostgreSQL reads a timestamptz, on every Python from 3.10: ISO 8601 with 'T' or a space, fractional
seconds, and a zone written Z, +00, +0530, +05:30, -08, UTC or GMT; no zone is UTC. Anything else is one
line naming the flag and the accepted forms. The value restore writes as recovery_target_time is one
PostgreSQL takes, meaning the same instant.
"""

from __future__ import annotations

import argparse
from datetime import datetime, timezone

import pytest

from pg_safe_backup.catalog import parse_when
from pg_safe_backup.cli import add_restore_arguments
from pg_safe_backup.restore import RecoveryTarget

UTC = timezone.utc
#: text -> the instant it names (no zone: UTC).
ACCEPTED: dict[str, datetime] = {
    "2026-11-26 09:30:00+00": datetime(2026, 11, 26, 9, 30, tzinfo=UTC),  # the README's form
    "2026-11-26 09:30:00 UTC": datetime(2026, 11, 26, 9, 30, tzinfo=UTC),
    "2026-11-26 09:30:00 GMT": datetime(2026, 11, 26, 9, 30, tzinfo=UTC),
    "2026-11-26T09:30:00Z": datetime(2026, 11, 26, 9, 30, tzinfo=UTC),
    "2026-11-26t09:30:00z": datetime(2026, 11, 26, 9, 30, tzinfo=UTC),
    "2026-11-26T09:30Z": datetime(2026, 11, 26, 9, 30, tzinfo=UTC),
    "2026-11-26 09:30:00": datetime(2026, 11, 26, 9, 30, tzinfo=UTC),
    "2026-11-26T09:30": datetime(2026, 11, 26, 9, 30, tzinfo=UTC),
    "2026-11-26": datetime(2026, 11, 26, tzinfo=UTC),
    "2026-11-26 09:30:00.5+00": datetime(2026, 11, 26, 9, 30, 0, 500000, tzinfo=UTC),
    "2026-11-26 09:30:00.123456Z": datetime(2026, 11, 26, 9, 30, 0, 123456, tzinfo=UTC),
    "2026-11-26 09:30:00.1234+00:00": datetime(2026, 11, 26, 9, 30, 0, 123400, tzinfo=UTC),
    "2026-11-26 15:00:00+0530": datetime(2026, 11, 26, 9, 30, tzinfo=UTC),
    "2026-11-26 15:00:00+05:30": datetime(2026, 11, 26, 9, 30, tzinfo=UTC),
    "2026-11-26T15:00:00+05": datetime(2026, 11, 26, 10, 0, tzinfo=UTC),
    "2026-11-26 01:30:00-08": datetime(2026, 11, 26, 9, 30, tzinfo=UTC),
    "2026-11-26 01:30:00 -08:00": datetime(2026, 11, 26, 9, 30, tzinfo=UTC),
}
REFUSED = [
    "",
    "yesterday",
    "now",
    "26/11/2026 09:30",
    "2026-11-26 9:30",
    "2026-13-01 00:00",
    "2026-11-26 24:00:00",
    "2026-11-26 09:30:00 CET",
    "2026-11-26 09:30:00+25",
    "2026-11-26 09:30:00.1234567",
    "1764149400",
]


@pytest.mark.parametrize("text", list(ACCEPTED))
def test_a_time_postgresql_reads_is_read_as_the_same_instant(text):
    when = parse_when(text)
    assert when == ACCEPTED[text]
    assert when.tzinfo is not None


@pytest.mark.parametrize("text", REFUSED)
def test_anything_else_is_one_line_showing_the_accepted_forms(text):
    with pytest.raises(ValueError) as raised:
        parse_when(text)
    message = str(raised.value)
    assert message.startswith(f"{text!r} is not a time: use ISO 8601, e.g. 2026-11-26T09:30:00Z")
    assert "2026-11-26 09:30:00 UTC (no zone: UTC)" in message
    assert "\n" not in message


def test_the_restore_flags_take_the_readme_form_and_name_themselves_when_refusing(capsys):
    parser = argparse.ArgumentParser(prog="pg-safe-backup restore")
    add_restore_arguments(parser)
    base = ["/backups/main", "/srv/pg-restored", "--wal-archive", "/backups/wal"]
    args = parser.parse_args(
        [*base, "--target-time", "2026-11-26 09:30:00+00", "--latest-before", "2026-11-26 09:30 UTC"]
    )
    assert args.target_time == datetime(2026, 11, 26, 9, 30, tzinfo=UTC)
    assert args.latest_before == datetime(2026, 11, 26, 9, 30, tzinfo=UTC)
    with pytest.raises(SystemExit):
        parser.parse_args([*base, "--target-time", "tomorrow"])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("pg-safe-backup restore: error: argument --target-time: 'tomorrow' is not a time")


def test_postgresql_reads_each_form_as_the_same_instant_and_takes_the_recovery_target_written(cluster):
    """The server's own parser is the reference: each accepted text, cast to timestamptz in a UTC session,
    is our instant; and the recovery_target_time line restore writes passes the server's check of it
    (ALTER SYSTEM runs the setting's check hook, the one recovery applies to postgresql.auto.conf, and
    refuses a value it does not read)."""
    cluster.sql("ALTER DATABASE postgres SET timezone = 'UTC'")
    for text, when in ACCEPTED.items():
        ours = parse_when(text)
        (theirs,) = cluster.sql("SELECT %s::timestamptz", [text])[0]
        assert theirs == when, text
        written = RecoveryTarget(time=ours).settings("cp %f %p")["recovery_target_time"]
        cluster.sql(f"ALTER SYSTEM SET recovery_target_time = {written}")
        (stored,) = cluster.sql("SELECT setting FROM pg_file_settings WHERE name = 'recovery_target_time'")[0]
        (reread,) = cluster.sql("SELECT %s::timestamptz", [stored])[0]
        assert reread == ours, written
    cluster.sql("ALTER SYSTEM RESET recovery_target_time")
