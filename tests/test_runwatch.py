"""The holders' look at Airflow, shared (pg_safe_backup.runwatch): one fetch per DAG run per period in a
process, however many holders; each holder reads its own map index. A fake clock (the fetch stands for the
Task SDK's two calls: the end-to-end tests run the real ones)."""

from __future__ import annotations

import asyncio
import gc
import random

import pytest

from pg_safe_backup import runwatch
from pg_safe_backup.runwatch import (
    CHECK_PERIOD_S,
    RunStates,
    RunWatch,
    jittered,
    states_by_map_index,
    watch_for,
)

HOLDERS = 1000
FINISH = "backup.finish_backup"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Airflow:
    """What the fetch reads: the run's state and its finish's state per map index; counts the fetches."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.finish: dict[int, str | None] = dict.fromkeys(range(HOLDERS), "scheduled")
        self.fetched_at: list[float] = []

    async def fetch(self) -> RunStates:
        self.fetched_at.append(self.clock.now)
        await asyncio.sleep(0.001)  # the hop to the triggerer's parent: other holders ask meanwhile
        return RunStates("running", dict(self.finish))


def run_holders(
    airflow: Airflow, clock: Clock, seconds: float, ended_at: dict[int, float]
) -> dict[int, float]:
    """``HOLDERS`` holders of one run, each looking every ``jittered(CHECK_PERIOD_S / 2)`` seconds as the
    holder does (their first looks spread over that interval), through one watch, for ``seconds`` of the
    fake clock; ``ended_at``: map index -> when its finish ends. Returns when each holder saw a problem."""
    watch = RunWatch(airflow.fetch, max_age=CHECK_PERIOD_S / 2, clock=clock)
    due = {i: random.uniform(0, CHECK_PERIOD_S / 2) for i in range(HOLDERS)}
    seen: dict[int, float] = {}

    async def look(i: int) -> None:
        if (problem := (await watch.states()).problem("run1", FINISH, i)) is not None:
            assert problem == f"this run's {FINISH} already ended (success)"
            seen[i] = clock.now
        due[i] = clock.now + jittered(CHECK_PERIOD_S / 2)

    async def go() -> None:
        while clock.now < seconds:
            clock.now += 0.5
            for i, when in ended_at.items():
                if clock.now >= when:
                    airflow.finish[i] = "success"
            await asyncio.gather(*(look(i) for i in range(HOLDERS) if i not in seen and due[i] <= clock.now))

    asyncio.run(go())
    return seen


def test_a_thousand_holders_of_one_run_cost_at_most_two_fetches_a_period():
    clock = Clock()
    airflow = Airflow(clock)
    periods = 8
    seen = run_holders(airflow, clock, periods * CHECK_PERIOD_S, {})
    assert seen == {}
    # max_age is half a period: at most two fetches a period, plus the first (counted, not timed).
    assert 2 * periods - 2 <= len(airflow.fetched_at) <= 2 * periods + 1, airflow.fetched_at
    gaps = [b - a for a, b in zip(airflow.fetched_at, airflow.fetched_at[1:], strict=False)]
    assert min(gaps) >= CHECK_PERIOD_S / 2, gaps


def test_a_finish_that_ended_at_map_index_17_ends_backup_17_only_within_one_period():
    clock = Clock()
    airflow = Airflow(clock)
    seen = run_holders(airflow, clock, 4 * CHECK_PERIOD_S, {17: 37.0})
    assert list(seen) == [17]
    assert 37.0 <= seen[17] <= 37.0 + CHECK_PERIOD_S, seen


def test_holders_asking_while_a_fetch_runs_share_it_and_a_failure_is_not_kept():
    clock = Clock()
    calls = {"n": 0}

    async def fetch() -> RunStates:
        calls["n"] += 1
        await asyncio.sleep(0.01)
        if calls["n"] == 1:
            raise ConnectionError("api-server unavailable")
        return RunStates("running", {})

    watch = RunWatch(fetch, max_age=15, clock=clock)

    async def go() -> tuple[list, list]:
        first = await asyncio.gather(*(watch.states() for _ in range(HOLDERS)), return_exceptions=True)
        second = await asyncio.gather(*(watch.states() for _ in range(HOLDERS)))
        return first, second

    first, second = asyncio.run(go())
    assert all(isinstance(answer, ConnectionError) for answer in first)  # each holder: no answer this time
    assert all(answer.run_state == "running" for answer in second)
    assert calls["n"] == 2  # one failed fetch for a thousand holders, then one that answered


def test_the_run_ending_is_every_holders_problem():
    states = RunStates("failed", {})
    assert states.problem("run1", FINISH, 3) == "the DAG run run1 is failed"
    assert RunStates("running", {-1: "running"}).problem("run1", FINISH, -1) is None
    assert RunStates("running", {-1: "failed"}).problem("run1", None, -1) is None  # no finish to look at


@pytest.mark.parametrize(
    "found, expected",
    [
        ({FINISH: "failed"}, {-1: "failed"}),
        ({f"{FINISH}_0": "success", f"{FINISH}_12": None}, {0: "success", 12: None}),
        ({f"{FINISH}_x": "success", "other_1": "failed"}, {}),
    ],
)
def test_the_states_by_map_index_by_map_index_from_one_call(found, expected):
    assert states_by_map_index(found, FINISH) == expected


def test_one_watch_per_run_in_a_process_while_a_holder_keeps_it():
    async def fetch() -> RunStates:
        return RunStates("running")

    key = ("dag", "run1", FINISH)
    first = watch_for(key, fetch)
    assert watch_for(key, fetch) is first
    assert watch_for(("dag", "run2", FINISH), fetch) is not first
    del first
    gc.collect()
    assert key not in runwatch._WATCHES  # gone with its last holder: no watch outlives its run's holders


def test_a_holder_looks_no_later_than_its_interval():
    looks = [jittered(CHECK_PERIOD_S / 2) for _ in range(1000)]
    assert max(looks) <= CHECK_PERIOD_S / 2 and min(looks) >= 0.8 * CHECK_PERIOD_S / 2
