"""A triggerer's supervisor stands still at times (it builds its in-process execution API on its first Task
SDK call, or serves another trigger's): its heartbeat stops with it, and past the health-check threshold
another triggerer takes its triggers over. A holder that took that long to get its backup ready pauses before
it claims it (pg_safe_backup.triggers.backup.settled), so that the cancellation of a trigger handed over lands
while nothing is claimed. Fake clocks for the pause's rule; a real cluster for what a cancellation during it
leaves; the end-to-end production test (two triggerers, a short threshold) runs the real thing."""

from __future__ import annotations

import asyncio

import pytest

from pg_safe_backup.session import COMPLETE, STARTED, hold_backup
from pg_safe_backup.triggers import backup as triggers

from backup_helpers import backup_row, backup_starts, finish, gate, holder_sessions, req


class Clock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def settle_after(stood: float, threshold: float = 6.0) -> tuple[list[float], list[str]]:
    """The pauses and warnings of a holder that reaches its claim ``stood`` seconds after it began, on a
    triggerer whose triggers are handed over after ``threshold`` seconds without a heartbeat."""
    clock, paused, said = Clock(), [], []

    async def pause(seconds: float) -> None:
        paused.append(seconds)
        clock.now += seconds

    settle = triggers.settled(0.0, threshold, clock, pause, log=lambda msg, *a: said.append(msg % a))
    clock.now = stood
    asyncio.run(settle())
    return paused, said


@pytest.mark.parametrize(
    "stood, threshold, pause",
    [
        (
            13.0,
            6.0,
            13.0,
        ),  # as long again as it stood still (under the same load, the cancellation is as slow)
        (4.0, 6.0, 6.0),  # a hand-over needs threshold seconds without a heartbeat: at least that long
        (3.5, 6.0, 6.0),
        (16.0, 30.0, 30.0),  # Airflow's default threshold
    ],
)
def test_a_holder_that_stood_still_long_enough_for_a_hand_over_pauses_before_its_claim_and_says_why(
    stood, threshold, pause
):
    paused, said = settle_after(stood, threshold)
    assert paused == [pause]
    assert said == [
        f"this triggerer took {stood:.1f}s to get the backup ready (it stood still; another triggerer takes"
        f" its triggers over after {threshold:.0f}s): pausing {pause:.0f}s before claiming it, so that a"
        " hand-over of this trigger lands first"
    ]


@pytest.mark.parametrize("stood, threshold", [(2.9, 6.0), (0.05, 6.0), (14.0, 30.0), (0.5, 1.5)])
def test_a_holder_ready_well_within_the_threshold_claims_at_once(stood, threshold):
    """Its triggerer's heartbeat cannot have been missing for the threshold: nothing to wait for. (Airflow's
    defaults: a 6 to 13 s stall of a first Task SDK call is no reason to wait.)"""
    assert settle_after(stood, threshold) == ([], [])


def test_a_holder_cancelled_while_it_settles_leaves_no_claim_and_the_next_one_takes_the_backup(hook, cluster):
    """The triggerer cancels the trigger it lost during the pause: no row claimed, no backup mode; the trigger
    re-run by the triggerer it went to takes the backup (same attempt) and it completes."""

    async def go() -> dict:
        settling = asyncio.Event()

        async def settle() -> None:
            settling.set()
            await asyncio.Event().wait()  # the pause, cancelled before it ends

        lost = asyncio.create_task(hold_backup(hook, req(), settle=settle))
        await asyncio.wait_for(settling.wait(), 30)
        lost.cancel()
        await asyncio.gather(lost, return_exceptions=True)
        assert backup_starts(cluster) == 0 and holder_sessions(cluster) == 0
        rows = cluster.sql("SELECT count(*) FROM backup WHERE state NOT IN ('complete', 'failed')")
        assert rows == [(0,)], "the lost holder left a claim"
        holder = asyncio.create_task(hold_backup(hook, req()))
        assert (await gate(hook))["status"] == STARTED
        assert (await finish(hook))["status"] == COMPLETE
        return await asyncio.wait_for(holder, 30)

    assert asyncio.run(go())["status"] == COMPLETE
    assert backup_starts(cluster) == 1 and backup_row(cluster)["state"] == "complete"
