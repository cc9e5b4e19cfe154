"""The provider's metrics, through Airflow's ``Stats`` (StatsD, Datadog or OpenTelemetry, as ``[metrics]``
configures them): fixed names under ``pg_safe_backup.``, low-cardinality tags only, and never a task's
failure.

``Stats`` comes from common-compat (``airflow.stats`` on 3.1, the Task SDK's on 3.3), as Airflow's own
providers import it. A metric that cannot be sent is logged at debug level and dropped: a backup never
fails for its metrics (openlineage's adapter does the same). Emitted by the Airflow faces (operators,
triggers) from what the domain hands back; the README's "Metrics" table lists them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import TypeVar

from airflow.providers.common.compat.sdk import Stats

T = TypeVar("T")

log = logging.getLogger(__name__)

PREFIX = "pg_safe_backup."
#: Every metric: name (after :data:`PREFIX`) -> kind, tags. README "Metrics" lists the same.
METRICS = {
    "backup.started": ("counter", ("mode",)),
    "backup.completed": ("counter", ("mode", "format")),
    "backup.failed": ("counter", ("mode", "stage")),
    "backup.duration": ("timing", ("mode", "format")),
    "backup.bytes": ("counter", ("mode", "format")),
    "copy.duration": ("timing", ("format",)),
    "copy.bytes": ("counter", ("format",)),
    "wal_archive.wait": ("timing", ("mode",)),
    "holder_check.duration": ("timing", ()),
    "holder_check.errors": ("counter", ()),
}
#: The tags' values: a few words each, never a cluster, DAG, run, path or error text (each value of a tag
#: is a series of its own in the metrics backend).
TAG_VALUES = {
    "mode": frozenset({"full", "incremental", "snapshot"}),
    "format": frozenset({"plain", "tar"}),
    "stage": frozenset({"hold", "store", "incremental"}),
}


def _tags(name: str, tags: dict[str, str | None]) -> dict[str, str]:
    """``tags`` that ``name`` takes and whose value is one of :data:`TAG_VALUES` (a None value: left out).

    :raises ValueError: an unknown metric, tag or value (a bug; the caller logs and drops the metric).
    """
    if name not in METRICS:
        raise ValueError(f"no metric {PREFIX}{name}")
    allowed = METRICS[name][1]
    kept = {}
    for key, value in tags.items():
        if value is None:
            continue
        if key not in allowed or value not in TAG_VALUES[key]:
            raise ValueError(f"{PREFIX}{name} takes no tag {key}={value!r}")
        kept[key] = value
    return kept


def incr(name: str, count: int = 1, **tags: str | None) -> None:
    """Add ``count`` to the counter ``pg_safe_backup.<name>``; never raises.

    :param name: a counter of :data:`METRICS`.
    :param count: how much (bytes for ``*.bytes``).
    :param tags: its tags (:data:`TAG_VALUES`).
    """
    try:
        Stats.incr(PREFIX + name, count, tags=_tags(name, tags))
    except Exception as err:  # noqa: BLE001 - a metric never fails a backup
        log.debug("metric %s%s not sent: %s", PREFIX, name, err)


def timing(name: str, seconds: float, **tags: str | None) -> None:
    """Send ``seconds`` as the timing ``pg_safe_backup.<name>`` (milliseconds in StatsD); never raises.

    :param name: a timing of :data:`METRICS`.
    :param seconds: how long it took.
    :param tags: its tags (:data:`TAG_VALUES`).
    """
    try:
        Stats.timing(PREFIX + name, timedelta(seconds=seconds), tags=_tags(name, tags))
    except Exception as err:  # noqa: BLE001 - a metric never fails a backup
        log.debug("metric %s%s not sent: %s", PREFIX, name, err)


def completed(mode: str, format: str | None, size: int | None, seconds: float | None) -> None:
    """A stored backup: one more ``backup.completed``, its ``backup.bytes`` and ``backup.duration`` when
    known; never raises.

    :param mode: ``full``, ``snapshot`` or ``incremental``.
    :param format: ``plain`` or ``tar`` (None: unknown, no tag).
    :param size: the bytes stored (None: unknown).
    :param seconds: from pg_backup_start until stored (None: unknown).
    """
    tags = {"mode": mode, "format": format}
    incr("backup.completed", **tags)
    if size is not None:
        incr("backup.bytes", size, **tags)
    if seconds is not None:
        timing("backup.duration", seconds, **tags)


def timed(fetch: Callable[[], Awaitable[T]], name: str, errors: str) -> Callable[[], Awaitable[T]]:
    """``fetch``, its duration sent as the timing ``name`` when it returns, and one more ``errors`` when it
    raises (the exception goes on).

    :param fetch: an async call (the holders' look at Airflow).
    :param name: a timing of :data:`METRICS`.
    :param errors: a counter of :data:`METRICS`.
    """

    async def call() -> T:
        began = time.monotonic()
        try:
            found = await fetch()
        except Exception:
            incr(errors)
            raise
        timing(name, time.monotonic() - began)
        return found

    return call
