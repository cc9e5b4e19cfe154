"""The pure core of state.py as tables: the claim rule, the WAL plan and when a server archives nothing.

Plain unit tests: no cluster, no Airflow. (LSNs and WAL file names: tests/test_xlog.py.)
"""

from __future__ import annotations

import dataclasses

import pytest

from pg_safe_backup.state import (
    ArchiveSettings,
    BackupRow,
    BackupState,
    Claim,
    WalArchiver,
    WalPlan,
    decide_claim,
    plan_wal,
)

OWNER, ATTEMPT = "nightly/run1/backup", "ti-uuid-1"

# -- decide_claim ---------------------------------------------------------------------------------------

#: Whose row the holder of (OWNER, ATTEMPT) finds: (row's owner, row's attempt).
WHOSE = {
    "ours": (OWNER, ATTEMPT),
    # the attempt alone says whose a backup is (an owner's run id can be re-used)
    "our attempt, another owner": ("other/run/backup", ATTEMPT),
    "an earlier attempt of our owner": (OWNER, "ti-uuid-0"),
    "another owner's": ("other/run/backup", "ti-uuid-9"),
}
RUNNING, DONE, COMPLETE, FAILED = BackupState  # in their order
START, STALE, TERMINATE = Claim.START, Claim.REPLACE_STALE, Claim.TERMINATE_AND_START
#: (whose, row state) -> the claim for (holder alive, terminate_live) =
#: (alive, no), (alive, yes), (gone, no), (gone, yes).
CLAIMS: dict[tuple[str, BackupState], tuple[Claim, Claim, Claim, Claim]] = {
    ("ours", RUNNING): (Claim.WATCH, Claim.WATCH, Claim.LOST, Claim.LOST),
    ("ours", DONE): (Claim.WATCH, Claim.WATCH, Claim.LOST, Claim.LOST),
    ("ours", COMPLETE): (Claim.FINISHED,) * 4,
    ("ours", FAILED): (Claim.FINISHED,) * 4,
    ("our attempt, another owner", RUNNING): (Claim.WATCH, Claim.WATCH, Claim.LOST, Claim.LOST),
    ("our attempt, another owner", DONE): (Claim.WATCH, Claim.WATCH, Claim.LOST, Claim.LOST),
    ("our attempt, another owner", COMPLETE): (Claim.FINISHED,) * 4,
    ("our attempt, another owner", FAILED): (Claim.FINISHED,) * 4,
    ("an earlier attempt of our owner", RUNNING): (Claim.WAIT, TERMINATE, STALE, STALE),
    ("an earlier attempt of our owner", DONE): (Claim.WAIT, TERMINATE, STALE, STALE),
    ("an earlier attempt of our owner", COMPLETE): (START,) * 4,
    ("an earlier attempt of our owner", FAILED): (START,) * 4,
    ("another owner's", RUNNING): (Claim.REFUSE, TERMINATE, STALE, STALE),
    ("another owner's", DONE): (Claim.REFUSE, TERMINATE, STALE, STALE),
    ("another owner's", COMPLETE): (START,) * 4,
    ("another owner's", FAILED): (START,) * 4,
}
HOLDER_AND_TERMINATE = ((True, False), (True, True), (False, False), (False, True))


def backup_row(state: BackupState, owner: str, attempt: str, holder_alive: bool) -> BackupRow:
    """A row as the hook reads it; what decide_claim does not look at is left empty."""
    fields = {f.name: None for f in dataclasses.fields(BackupRow)}
    fields.update(state=state, owner=owner, attempt=attempt, holder_alive=holder_alive)
    return BackupRow(**fields)


def test_the_claim_table_covers_every_row_state_and_whose_row():
    assert set(CLAIMS) == {(whose, state) for whose in WHOSE for state in BackupState}


@pytest.mark.parametrize(
    "whose, state, holder_alive, terminate_live, claim",
    [
        (whose, state, alive, terminate, claims[i])
        for (whose, state), claims in CLAIMS.items()
        for i, (alive, terminate) in enumerate(HOLDER_AND_TERMINATE)
    ],
)
def test_decide_claim(whose, state, holder_alive, terminate_live, claim):
    owner, attempt = WHOSE[whose]
    found = backup_row(state, owner, attempt, holder_alive)
    assert decide_claim(found, OWNER, ATTEMPT, terminate_live) is claim


@pytest.mark.parametrize("terminate_live", [False, True])
def test_decide_claim_without_a_row_starts(terminate_live):
    assert decide_claim(None, OWNER, ATTEMPT, terminate_live) is Claim.START


# -- ArchiveSettings.not_archiving ----------------------------------------------------------------------

SYSTEM_ID = 7300000000000000001


def settings(
    archive_mode: str = "on",
    archive_command: str = "cp %p /archive/%f",
    archive_library: str | None = None,
    in_recovery: bool = False,
    server_version: int = 150000,
    system_identifier: int = SYSTEM_ID,
    can_switch_wal: bool = True,
    param: str = "postgres_conn_id",
) -> ArchiveSettings:
    """A server's archiving as the hook reads it: by default a PostgreSQL 15 primary that archives."""
    return ArchiveSettings(
        conn_id=param.removesuffix("_conn_id"),
        param=param,
        role="backup",
        in_recovery=in_recovery,
        archive_mode=archive_mode,
        archive_command=archive_command,
        archive_library=archive_library,
        server_version=server_version,
        system_identifier=system_identifier,
        can_switch_wal=can_switch_wal,
    )


@pytest.mark.parametrize(
    "server, why",
    [
        (settings(), None),
        (settings(archive_mode="always"), None),
        (settings(archive_mode="off", archive_command="(disabled)"), "has archive_mode=off"),
        (settings(archive_mode="on", in_recovery=True), "a standby archives only with archive_mode=always"),
        (settings(archive_mode="always", in_recovery=True), None),
        (settings(archive_command=""), "an empty archive_command"),
        (settings(archive_command="", archive_library="basic_archive"), None),
        (settings(archive_library="basic_archive", server_version=160000), "both archive_command and"),
        (settings(archive_library="basic_archive", server_version=150000), None),  # 15: the library wins
        (settings(archive_command="", server_version=120000), "an empty archive_command"),
    ],
)
def test_not_archiving(server, why):
    found = server.not_archiving()
    if why is None:
        assert found is None
    else:
        assert why in found
        assert found.startswith("postgres_conn_id 'postgres'")  # names the connection


# -- plan_wal -------------------------------------------------------------------------------------------

PRIMARY = settings(param="state_conn_id")
STANDBY = settings(in_recovery=True)  # archive_mode=on: archives nothing itself
ARCHIVING_STANDBY = settings(in_recovery=True, archive_mode="always")
QUIET_PRIMARY = settings(param="state_conn_id", archive_command="")


@pytest.mark.parametrize(
    "server, state, wait_for_archive, plan",
    [
        # a primary: its own pg_backup_stop waits for its archiver, when asked to
        # the primary: the holder follows its archiver after pg_backup_stop (which would look once a second)
        (settings(), None, True, WalPlan(stop_wait=False, follow=WalArchiver.SERVER)),
        (settings(), None, False, WalPlan(stop_wait=False)),
        # a state table elsewhere changes nothing
        (settings(), PRIMARY, True, WalPlan(stop_wait=False, follow=WalArchiver.SERVER)),
        # nothing archives, no wait asked: stop asked to wait where it would return at once (its NOTICE)
        (settings(archive_mode="off"), None, False, WalPlan(stop_wait=True)),
        (settings(archive_command=""), None, False, WalPlan(stop_wait=False)),
        # a standby: stop_wait off, the holder switches WAL on the primary and follows the archiver
        (ARCHIVING_STANDBY, PRIMARY, True, WalPlan(stop_wait=False, follow=WalArchiver.STANDBY)),
        (ARCHIVING_STANDBY, PRIMARY, False, WalPlan(stop_wait=False)),
        (STANDBY, PRIMARY, True, WalPlan(stop_wait=False, follow=WalArchiver.PRIMARY)),
        (STANDBY, PRIMARY, False, WalPlan(stop_wait=False)),
        (STANDBY, None, False, WalPlan(stop_wait=True)),  # nobody archives; its NOTICE goes in the row
        (STANDBY, QUIET_PRIMARY, False, WalPlan(stop_wait=True)),
    ],
)
def test_plan_wal(server, state, wait_for_archive, plan):
    assert plan_wal(server, state, wait_for_archive) == plan


@pytest.mark.parametrize(
    "server, state, why",
    [
        (settings(archive_mode="off"), None, "postgres_conn_id 'postgres' has archive_mode=off"),
        (settings(archive_command=""), None, "an empty archive_command"),
        (STANDBY, None, "is a standby, and no state_conn_id is not its primary"),
        (STANDBY, settings(param="state_conn_id", in_recovery=True), "is not its primary"),
        (STANDBY, settings(param="state_conn_id", system_identifier=SYSTEM_ID + 1), "is not its primary"),
        (STANDBY, settings(param="state_conn_id", can_switch_wal=False), "may not run pg_switch_wal()"),
        (ARCHIVING_STANDBY, settings(param="state_conn_id", can_switch_wal=False), "pg_switch_wal()"),
        (STANDBY, QUIET_PRIMARY, "and its primary state_conn_id 'state' has archive_mode=on but an empty"),
    ],
)
def test_plan_wal_refuses_to_wait_for_an_archive_nobody_feeds(server, state, why):
    with pytest.raises(ValueError, match="^not started: wait_for_archive=True") as refused:
        plan_wal(server, state, wait_for_archive=True)
    assert why in str(refused.value)
    assert "\n" not in str(refused.value)  # one line
