"""A backup belongs to one attempt (one try of one hold task, of one group, of one DAG run): the state
machine's cases of clearing, re-running and sharing, driven through the holder, gate and finish functions
on real PostgreSQL (no Airflow; what Airflow knows comes in as the same callbacks the triggers pass)."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time

import psycopg
import pytest

from pg_safe_backup import session
from pg_safe_backup.session import COMPLETE, FAILED, STARTED, HoldView, hold_backup, wait_for_start

from backup_helpers import (
    ATTEMPT,
    OWNER,
    attempt_of,
    backup_row,
    backup_starts,
    finish,
    gate,
    hand_over_row,
    req,
    session_alive,
    session_ended,
    started,
    wait_until,
)

RETRY = attempt_of(OWNER, 2)  # the next try of the same hold task: same owner, another attempt


def test_a_finish_whose_copy_failed_never_reports_complete_even_when_the_row_says_complete(hook, cluster):
    """The old post-script's `UPDATE backup SET state = 'done'` while the copy still runs completes the
    backup; then the copy fails. The finish must not hand out the label: it fails, and withdraws it."""

    async def go():
        holder, opened = await started(hook, req())
        await asyncio.to_thread(cluster.sql, "UPDATE backup SET state = 'done'")
        held = await asyncio.wait_for(holder, 30)
        assert held["status"] == COMPLETE and backup_row(cluster)["state"] == "complete"
        return await finish(
            hook, start_lsn=opened["backup"]["start_lsn"], copy_problem="backup.copy is failed"
        )

    result = asyncio.run(go())
    assert result["status"] == FAILED
    assert result["message"] == "backup failed: backup.copy is failed"
    r = backup_row(cluster)
    assert r["state"] == "failed"
    assert r["error"] == "backup.copy is failed"


def test_a_second_finish_of_a_failed_copy_fails_too(hook, cluster):
    async def go():
        holder, _ = await started(hook, req())
        first = await finish(hook, copy_problem="backup.copy is failed")
        await asyncio.wait_for(holder, 30)
        return first, await finish(hook, copy_problem="backup.copy is upstream_failed")

    first, second = asyncio.run(go())
    assert first["status"] == FAILED
    assert second["status"] == FAILED
    assert backup_row(cluster)["backup_label"] is None


def test_a_reused_run_id_takes_a_new_backup(hook, cluster):
    """A run deleted and re-created (or the same scheduled run of another Airflow installation) has the
    same owner, but its hold is another attempt: it never reports the OLD backup as its own."""
    other_installation = attempt_of(OWNER, 1) + "@staging"

    async def go():
        first, _ = await started(hook, req(attempt=other_installation))
        assert (await finish(hook, attempt=other_installation))["status"] == COMPLETE
        await asyncio.wait_for(first, 30)
        old_label = backup_row(cluster)["backup_label"]
        again, opened = await started(hook, req())  # try 1 again, same owner
        assert opened["backup"]["attempt"] == ATTEMPT
        done = await finish(hook)
        return old_label, done, await asyncio.wait_for(again, 30)

    old_label, done, held = asyncio.run(go())
    assert held["status"] == COMPLETE
    assert done["status"] == COMPLETE
    assert done["backup"]["backup_label"] != old_label
    assert backup_row(cluster)["attempt"] == ATTEMPT
    assert backup_starts(cluster) == 2


async def live_row(
    cluster, other: psycopg.AsyncConnection, attempt: str, state: str, start_lsn: str | None
) -> None:
    """Make the row ``attempt``'s, held by the live session ``other``: a holder caught at one moment of its
    life (its checkpoint running, or pg_backup_stop waiting for the archive)."""
    pid = other.info.backend_pid
    await asyncio.to_thread(
        hand_over_row,
        cluster,
        "state = %s, owner = %s, attempt = %s, pid = %s, start_lsn = %s, error = NULL,"
        " holder_started_at = (SELECT backend_start FROM pg_stat_activity WHERE pid = %s)",
        [state, OWNER, attempt, pid, start_lsn, pid],
    )


def test_the_gate_never_opens_on_a_done_row(hook, cluster):
    """A gate that runs (again) while pg_backup_stop waits for the archive must not let a copy begin."""

    async def go():
        holder, opened = await started(hook, req())
        await finish(hook)
        await asyncio.wait_for(holder, 30)
        async with await psycopg.AsyncConnection.connect(**cluster.conninfo(), autocommit=True) as other:
            await asyncio.to_thread(cluster.sql, "UPDATE backup SET state = 'running'")  # complete -> running
            await asyncio.to_thread(cluster.sql, "UPDATE backup SET state = 'done'")
            await live_row(cluster, other, ATTEMPT, "done", opened["backup"]["start_lsn"])
            return await gate(hook, timeout=15)

    again = asyncio.run(go())
    assert again["status"] == FAILED
    assert (
        again["message"] == "this run's backup already done before its copy could start "
        "(copying now would not match its label)"
    )


def test_a_row_of_an_earlier_attempt_neither_opens_nor_fails_the_gate(hook, cluster):
    """A cleared run: the gate starts together with the new hold and finds the previous attempt's failed row.
    It waits for the hold's current attempt, which then starts, and opens on it."""

    async def go():
        first, _ = await started(hook, req())
        assert (await finish(hook, copy_problem="backup.copy is failed"))["status"] == FAILED
        await asyncio.wait_for(first, 30)
        views = {
            "now": HoldView(ATTEMPT, current=False)
        }  # the new try runs, the old try's XCom still readable

        async def hold_view() -> HoldView:
            return views["now"]

        waiting = asyncio.create_task(wait_for_start(hook, hold_view=hold_view, poll_interval=0.3))
        await asyncio.sleep(2)
        assert not waiting.done(), waiting.result()  # the old failed row did not fail it
        views["now"] = HoldView(RETRY, current=True)  # the new try published its attempt and deferred
        holder = asyncio.create_task(hold_backup(hook, req(attempt=RETRY)))
        opened = await asyncio.wait_for(waiting, 60)
        done = await finish(hook, attempt=RETRY, start_lsn=opened["backup"]["start_lsn"])
        return opened, done, await asyncio.wait_for(holder, 30)

    opened, done, held = asyncio.run(go())
    assert opened["status"] == STARTED
    assert opened["backup"]["attempt"] == RETRY
    assert done["status"] == held["status"] == COMPLETE
    assert backup_starts(cluster) == 2


def test_the_current_attempt_that_already_ended_fails_the_gate(hook, cluster):
    """Re-running the gate of a completed run (the copy cleared): its hold ended, its backup too."""

    async def go():
        holder, _ = await started(hook, req())
        await finish(hook)
        await asyncio.wait_for(holder, 30)

        async def hold_view() -> HoldView:
            return HoldView(ATTEMPT, current=True, ended="success")

        return await asyncio.wait_for(wait_for_start(hook, hold_view=hold_view, poll_interval=0.3), 10)

    result = asyncio.run(go())
    assert result["status"] == FAILED
    assert "this run's backup already complete before its copy could start" in result["message"]


def test_a_finish_whose_attempt_was_replaced_while_it_waits_fails_at_once(hook, cluster):
    """Only the hold was cleared mid-backup: the copy ran under attempt 1, the new attempt 2 has claimed the
    row and its checkpoint is still running (no start LSN yet). The finish must fail now, not wait for attempt
    2, and must not touch attempt 2's backup; its start LSN arriving later changes nothing."""

    async def go():
        holder, opened = await started(hook, req())
        old_lsn = opened["backup"]["start_lsn"]
        holder.cancel()  # Airflow cancels the cleared hold's trigger
        with pytest.raises(asyncio.CancelledError):
            await holder
        assert backup_row(cluster)["state"] == "failed"
        # attempt 2 claims; its checkpoint "still runs": a live session, start_lsn not recorded yet
        async with await psycopg.AsyncConnection.connect(**cluster.conninfo(), autocommit=True) as other:
            await asyncio.to_thread(cluster.sql, "UPDATE backup SET state = 'running'")  # failed -> running
            await live_row(cluster, other, RETRY, "running", None)
            t0 = time.monotonic()
            result = await finish(hook, attempt=ATTEMPT, start_lsn=old_lsn, timeout=15)
            took = time.monotonic() - t0
            after = backup_row(cluster)
        return result, took, after

    result, took, after = asyncio.run(go())
    assert result["status"] == FAILED
    assert "is no longer in the table" in result["message"]
    assert took < 5
    assert after["attempt"] == RETRY
    assert after["state"] == "running"  # attempt 2 untouched: its own holder (or its check) ends it


def test_gate_timeout_fails_the_gate(hook, cluster):
    """No holder ever starts (no triggerer running the hold): the gate gives up after gate_timeout."""
    t0 = time.monotonic()
    result = asyncio.run(gate(hook, timeout=30, gate_timeout=2))
    took = time.monotonic() - t0
    assert result["status"] == FAILED
    assert "gate_timeout=2s passed" in result["message"]
    assert took < 10


def test_a_second_group_sharing_the_state_table_is_refused_naming_the_table_option(hook, cluster):
    """Two groups (say standbys of one primary) whose state is in one table: the second never follows the
    first; it is refused, and told to give each group its own table."""
    sibling = "nightly/scheduled__2026-11-24/standby_b.backup"

    async def go():
        first, _ = await started(hook, req(owner="nightly/scheduled__2026-11-24/standby_a.backup"))
        refused = await asyncio.wait_for(hold_backup(hook, req(owner=sibling)), 30)
        assert session_alive(cluster, backup_row(cluster)["pid"])
        await finish(hook, attempt=attempt_of("nightly/scheduled__2026-11-24/standby_a.backup"))
        return refused, await asyncio.wait_for(first, 30)

    refused, held = asyncio.run(go())
    assert refused["status"] == FAILED
    assert "refused to start" in refused["message"]
    assert "give each group its own table= option" in refused["message"]
    assert 'the state table "public"."backup" of connection \'pg_test\'' in refused["message"]
    assert held["status"] == COMPLETE
    assert backup_starts(cluster) == 1


def test_a_holder_whose_finish_already_ended_never_starts_a_backup(hook, cluster):
    """Only the hold of a completed run was cleared: nothing would ever end a new backup."""

    async def finish_ended():
        return "this run's backup.finish_backup already ended (success)"

    result = asyncio.run(asyncio.wait_for(hold_backup(hook, req(), check=finish_ended), 30))
    assert result["status"] == FAILED
    assert result["message"] == "not started: this run's backup.finish_backup already ended (success)"
    assert backup_starts(cluster) == 0


@pytest.mark.parametrize("age, asked_first", [(1.0, False), (-1.0, False), (20.0, True), (None, True)])
def test_the_hold_task_s_own_fresh_look_at_airflow_stands_for_the_holder_s_first(
    hook, cluster, age, asked_first
):
    """A look the hold task took on its worker just before deferring (``checked_at``) stands for the
    holder's first within half the check period (30 s here), a clock a little behind included; an older
    one, or none, and the holder asks before the start."""
    asked: list[str] = []

    async def check():
        asked.append(f"{backup_starts(cluster)} backups started")
        return None

    checked_at = None if age is None else time.time() - age

    async def go():
        holder = asyncio.create_task(
            hold_backup(hook, req(checked_at=checked_at), check=check, check_period=30)
        )
        assert (await gate(hook))["status"] == STARTED
        assert (await finish(hook))["status"] == COMPLETE
        return await asyncio.wait_for(holder, 30)

    assert asyncio.run(go())["status"] == COMPLETE
    # Asked before the start, or not at all (the next look is 12 s or more after the start).
    assert asked == (["0 backups started"] if asked_first else []), asked
    assert backup_starts(cluster) == 1


def test_a_holder_ends_its_backup_once_its_finish_ended(hook, cluster, monkeypatch):
    """The finish ended without ending this attempt's backup (it failed on another attempt, or was marked by
    hand): the holder notices on its own and ends backup mode."""
    monkeypatch.setattr(session, "HOLDER_AIRFLOW_CHECK_S", 1.0)
    ended = {"finish": None}

    async def check():
        return ended["finish"]

    async def go():
        holder = asyncio.create_task(hold_backup(hook, req(), check=check))
        assert (await gate(hook))["status"] == STARTED
        pid = backup_row(cluster)["pid"]
        ended["finish"] = "this run's backup.finish_backup already ended (failed)"
        t0 = time.monotonic()
        result = await asyncio.wait_for(holder, 30)
        return result, time.monotonic() - t0, pid

    result, took, pid = asyncio.run(go())
    assert result["status"] == FAILED
    assert "already ended (failed): nothing would end this backup; backup mode ended" in result["message"]
    assert took < 5
    assert backup_row(cluster)["state"] == "failed"
    assert session_ended(cluster, pid)


def test_a_new_attempt_waits_for_the_earlier_attempt_airflow_is_cancelling(hook, cluster, caplog):
    """Only the hold was cleared mid-backup: the new try's trigger may run before the old one is cancelled.
    It waits for the old attempt to end (it never acts on it), then starts its own backup."""
    caplog.set_level(logging.INFO, logger="pg_safe_backup.session")

    async def go():
        old, _ = await started(hook, req())
        new = asyncio.create_task(hold_backup(hook, req(attempt=RETRY)))
        await wait_until(lambda: "still holds its backup; waiting" in caplog.text, what="the new try waiting")
        assert backup_row(cluster)["attempt"] == ATTEMPT and backup_row(cluster)["state"] == "running"
        old.cancel()
        with pytest.raises(asyncio.CancelledError):
            await old
        opened = await gate(hook, RETRY)
        done = await finish(hook, attempt=RETRY)
        return opened, done, await asyncio.wait_for(new, 30)

    opened, done, held = asyncio.run(go())
    assert opened["status"] == STARTED
    assert done["status"] == held["status"] == COMPLETE
    assert backup_row(cluster)["attempt"] == RETRY
    assert backup_starts(cluster) == 2


def test_an_earlier_attempt_that_stays_held_refuses_the_new_one(hook, cluster, monkeypatch):
    """...but one that does not end (the same run id in another Airflow installation) is left untouched."""
    monkeypatch.setattr(session, "EARLIER_ATTEMPT_WAIT_S", 2.0)

    async def go():
        old, _ = await started(hook, req())
        refused = await asyncio.wait_for(hold_backup(hook, req(attempt=RETRY)), 30)
        assert backup_row(cluster)["attempt"] == ATTEMPT and backup_row(cluster)["state"] == "running"
        await finish(hook)
        return refused, await asyncio.wait_for(old, 30)

    refused, held = asyncio.run(go())
    assert refused["status"] == FAILED
    assert f"refused to start: an earlier attempt ({ATTEMPT}) of this same backup" in refused["message"]
    assert held["status"] == COMPLETE


def test_airflow_not_answering_never_ends_a_held_backup(hook, cluster, monkeypatch):
    """The api-server restarting while a backup is held: the holder's look at Airflow fails, and the backup
    goes on (the next look asks again); the gate waits the same way."""
    monkeypatch.setattr(session, "HOLDER_AIRFLOW_CHECK_S", 0.5)
    calls = {"check": 0, "view": 0}

    async def check():
        calls["check"] += 1
        raise ConnectionError("api-server unavailable")

    async def hold_view():
        calls["view"] += 1
        if calls["view"] < 3:
            raise ConnectionError("api-server unavailable")
        return HoldView(ATTEMPT)

    async def go():
        holder = asyncio.create_task(hold_backup(hook, req(), check=check))
        opened = await asyncio.wait_for(wait_for_start(hook, hold_view=hold_view, poll_interval=0.3), 30)
        # Several failed looks at Airflow while held (counted, not timed: a loaded machine is slower).
        deadline = time.monotonic() + 60
        while calls["check"] < 3 and time.monotonic() < deadline and not holder.done():
            await asyncio.sleep(0.2)
        done = await finish(hook, start_lsn=opened["backup"]["start_lsn"])
        return opened, done, await asyncio.wait_for(holder, 30)

    opened, done, held = asyncio.run(go())
    assert opened["status"] == STARTED
    assert done["status"] == held["status"] == COMPLETE
    assert calls["check"] >= 3
    assert calls["view"] >= 3


def test_the_gate_never_opens_on_an_attempt_that_is_not_surely_the_current_one(hook, cluster):
    """A whole run cleared: the old try's trigger still holds its backup for a second or two, and while the
    new try starts on a worker its XCom still names the old attempt. The gate must not open on that backup."""

    async def go():
        async with hook.connect() as conn:
            await hook.ensure_table(conn)
        await asyncio.to_thread(cluster.sql, "INSERT INTO backup (id, state) VALUES (1, 'failed')")
        other = await psycopg.AsyncConnection.connect(**cluster.conninfo(), autocommit=True)
        await asyncio.to_thread(cluster.sql, "UPDATE backup SET state = 'running'")
        await live_row(cluster, other, ATTEMPT, "running", "0/2000028")  # the old attempt, still held
        views = {"now": HoldView(ATTEMPT, current=False)}

        async def hold_view() -> HoldView:
            return views["now"]

        waiting = asyncio.create_task(wait_for_start(hook, hold_view=hold_view, poll_interval=0.3))
        await asyncio.sleep(2)
        assert not waiting.done(), waiting.result()
        views["now"] = HoldView(RETRY, current=True)  # the new try deferred; Airflow cancels the old trigger
        await other.close()
        holder = asyncio.create_task(hold_backup(hook, req(attempt=RETRY)))
        opened = await asyncio.wait_for(waiting, 60)
        await finish(hook, attempt=RETRY, start_lsn=opened["backup"]["start_lsn"])
        await asyncio.wait_for(holder, 30)
        return opened

    opened = asyncio.run(go())
    assert opened["status"] == STARTED
    assert opened["backup"]["attempt"] == RETRY


@pytest.mark.parametrize("fast", [True, False])
def test_the_gate_advises_a_fast_checkpoint_only_for_a_backup_started_without_one(
    hook, cluster, caplog, fast
):
    """The start checkpoint still runs after 5 s. A spread one: the gate's log says fast_checkpoint=True would
    not wait for it; an immediate one was asked for already: that advice would mislead."""
    ticks = itertools.count()  # one second a look: the 5 s pass without waiting for them

    async def hold_view() -> HoldView:
        return HoldView(ATTEMPT, fast_checkpoint=fast)  # what the hold published beside its attempt

    async def go():
        async with hook.connect() as conn:
            await hook.ensure_table(conn)
        await asyncio.to_thread(cluster.sql, "INSERT INTO backup (id, state) VALUES (1, 'failed')")
        await asyncio.to_thread(cluster.sql, "UPDATE backup SET state = 'running'")
        async with await psycopg.AsyncConnection.connect(**cluster.conninfo(), autocommit=True) as other:
            await live_row(cluster, other, ATTEMPT, "running", None)  # its checkpoint still running
            return await wait_for_start(
                hook, hold_view=hold_view, poll_interval=0.2, clock=lambda: float(next(ticks)), patience=30
            )

    with caplog.at_level(logging.INFO, logger=session.__name__):
        waited = asyncio.run(go())
    assert waited["status"] == session.PENDING
    said = [r.getMessage() for r in caplog.records if "waiting for its start checkpoint" in r.getMessage()]
    assert len(said) == 1, said
    assert ("Pass fast_checkpoint=True" in said[0]) is not fast, said[0]
