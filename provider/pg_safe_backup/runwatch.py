"""The holders' safety net, shared: one look at Airflow per DAG run per process, however many holders of
that run the process holds.

A holder ends its backup when its run ends or its group's finish task ended without ending it (nothing
else would). The normal end comes through NOTIFY; this look is the safety net. Asked by each holder on its
own, it would cost two Task SDK calls per holder per period: from a trigger each call is a hop to the
triggerer's single-threaded parent, which runs the execution API in-process against the metadata DB
(about 7 to 9 ms of CPU a call; Airflow 3.1 also serializes every SDK call of a triggerer), so 1,000
holders in one triggerer would need more than the parent has. Here the holders of one run share a
:class:`RunWatch`: its states are fetched at most once per ``max_age`` (single-flight: callers that come
while a fetch runs wait for that one), the finish task's state at every map index in one call, and each
holder reads its own map index from it: a finish that ended at map index 17 ends backup 17 only.

Airflow-free: the fetch is given (:mod:`pg_safe_backup.triggers.backup` reads the Task SDK).
"""

from __future__ import annotations

import asyncio
import random
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")

#: Task states in which a task has ended (it will not run again unless cleared).
ENDED_STATES = frozenset({"failed", "upstream_failed", "skipped", "removed", "success"})
#: DAG run states in which the run still goes on.
RUN_GOING_STATES = frozenset({"queued", "running"})
#: Seconds within which a holder sees that nobody would end its backup: a safety net (NOTIFY brings the
#: normal end at once), so long. A holder looks every half of it, less up to :data:`JITTER` of that (the
#: holders of many runs do not ask at once), at answers no older than the other half.
CHECK_PERIOD_S = 30.0
JITTER = 0.2


@dataclass(frozen=True)
class RunStates:
    """What Airflow said of one DAG run at one moment: the run's state, and its finish task's state at
    each map index (-1: not mapped)."""

    run_state: str | None
    finish: dict[int, str | None] = field(default_factory=dict)

    def problem(self, run_id: str, finish_task_id: str | None, map_index: int) -> str | None:
        """Why nobody would end the backup of ``map_index``: the run ended, or its finish did."""
        if self.run_state not in RUN_GOING_STATES:
            return f"the DAG run {run_id} is {self.run_state}"
        state = self.finish.get(map_index) if finish_task_id else None
        if state in ENDED_STATES:
            return f"this run's {finish_task_id} already ended ({state})"
        return None


def still_fresh(checked_at: float | None, period: float, now: float) -> bool:
    """Whether a look at Airflow taken at ``checked_at`` (epoch seconds; the hold task's, on its worker,
    just before it deferred) may stand for the holder's first: within half the check ``period``, as old as
    the shared answers of :class:`RunWatch` may be (either way round, for clocks a little apart)."""
    return checked_at is not None and abs(now - checked_at) < period / 2


def states_by_map_index(found: dict[str, str | None], task_id: str) -> dict[int, str | None]:
    """The states of ``task_id`` by map index, from the Task SDK's ``get_task_states`` of one run (keys
    ``task_id`` for an unmapped task, ``task_id_<map_index>`` for each mapped one)."""
    states: dict[int, str | None] = {}
    for key, state in found.items():
        index = key[len(task_id) + 1 :]
        if key == task_id:
            states[-1] = state
        elif key.startswith(f"{task_id}_") and index.isdigit():
            states[int(index)] = state
    return states


class RunWatch(Generic[T]):
    """What Airflow says of one DAG run (its state and its finish's, for the holders; its hold's, for the
    gates), shared by the triggers of that run in this process.

    :param fetch: reads it from Airflow (a call or two, whatever the number of triggers).
    :param max_age: seconds a fetched answer serves.
    :param clock: monotonic seconds (a test's fake clock).
    """

    def __init__(
        self,
        fetch: Callable[[], Awaitable[T]],
        max_age: float = CHECK_PERIOD_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fetch, self.max_age, self.clock = fetch, max_age, clock
        self._last: tuple[float, T] | None = None
        self._running: asyncio.Future[T] | None = None
        self.fetches = 0  # how many times Airflow was asked

    async def states(self) -> T:
        """The run's states, no older than ``max_age``: the last answer, the fetch under way, or a new one.

        :raises Exception: what the fetch raised (each waiting holder counts it as no answer).
        """
        if self._last is not None and self.clock() - self._last[0] < self.max_age:
            return self._last[1]
        if self._running is None:
            self._running = asyncio.ensure_future(self._refresh())
        # shield: a holder cancelled while it waits does not cancel the others' fetch.
        return await asyncio.shield(self._running)

    async def _refresh(self) -> T:
        try:
            self.fetches += 1
            asked = self.clock()
            states = await self._fetch()
            self._last = (asked, states)
            return states
        finally:
            self._running = None


#: The watches of this process, by (dag_id, run_id, the task watched): alive while a trigger keeps one.
_WATCHES: weakref.WeakValueDictionary[tuple[str, str, str | None], RunWatch] = weakref.WeakValueDictionary()


def watch_for(
    key: tuple[str, str, str | None],
    fetch: Callable[[], Awaitable[T]],
    max_age: float = CHECK_PERIOD_S,
) -> RunWatch[T]:
    """This process's watch of ``key`` (dag_id, run_id, the task watched), made on first use; the caller
    keeps it (a watch no trigger keeps goes away). One key, one kind of answer: the holders' key names
    their finish task, the gates' their hold task."""
    watch = _WATCHES.get(key)
    if watch is None:
        watch = _WATCHES[key] = RunWatch(fetch, max_age)
    return watch


def jittered(interval: float) -> float:
    """``interval`` less up to :data:`JITTER` of it, at random: when one holder looks next (never later
    than ``interval``: the guarantee rests on it)."""
    return interval * (1 - random.uniform(0, JITTER))  # noqa: S311 - spreading load, not a secret


__all__ = [
    "CHECK_PERIOD_S",
    "ENDED_STATES",
    "RUN_GOING_STATES",
    "RunStates",
    "RunWatch",
    "jittered",
    "states_by_map_index",
    "watch_for",
]
