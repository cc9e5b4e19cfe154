"""The Backups page's data and drawing: a row per catalogued backup, the series of its charts, the page as
HTML with inline SVG (no JavaScript), and a cache that keeps a root's rows between requests.

The rows come from :func:`pg_safe_backup.catalog.list_backups` (every backup found on disk, proven from its
own files, its catalog entry read), never from a catalog entry parsed here. Listing proves each backup
(its label, its manifest's checksum): about 2 ms a backup, 20 s for 10,000. So :class:`BackupsCache` keeps
each root's rows and lists the root again only when a cheap stamp changes: the modification times of the
root's folders that are not backups (every store, check record and deletion renames or removes a name in
one of them), or, for an object store, which has none, once a minute. A new listing proves again only the
backups whose folder changed.

Airflow-free, like the catalog it reads: the provider's plugin (``pg_safe_backup.plugins.backups``) adds
Airflow's authentication and keeps to the DAGs a user may read; the bench renders the page without a web
server. Nothing here writes, deletes or restores: the page is a display.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from html import escape
from typing import Any

from pg_safe_backup.catalog import (
    CLUSTER_DIGITS,
    DRILL_BY,
    MAX_DEPTH,
    CatalogEntry,
    CatalogError,
    Folder,
    aware_time,
    entry_path,
    human_bytes,
    list_backups,
    span,
    to_the_minute,
    verdict,
)
from pg_safe_backup.files.copier import is_local_path
from pg_safe_backup.files.crypt import EncryptionKey
from pg_safe_backup.proof import Proof, prove_backup

#: An object store's root is listed again at most this often (it has no folder times to compare).
STORE_REFRESH_S = 60.0
#: The charts' colours, one per cluster (then again).
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2")


@dataclass(frozen=True)
class Row:
    """One backup as the page shows it: its listing's entry, and what the page reads of its check records
    once (ages are counted when shown, never kept)."""

    id: str  #: its folder below the root (the table row's anchor)
    entry: CatalogEntry
    verified: str  #: ``yes``, ``FAILED``, ``never`` or ``not of this manifest``
    verified_at: str | None
    drill_at: datetime | None  #: the newest drill of this backup
    drill_s: float | None  #: and its restore time (the checks and the restore, as the drill records it)

    @property
    def folder(self) -> str:
        return self.entry.name

    @property
    def cluster(self) -> str | None:
        """The system identifier: proven, else the catalog entry's."""
        info = self.entry.info
        return self.entry.proof.system_identifier or (info.system_identifier if info else None)

    @property
    def label(self) -> str:
        info = self.entry.info
        return self.entry.proof.label or (info.label if info else "") or ""

    @property
    def dag_id(self) -> str | None:
        return self.entry.info.dag_id if self.entry.info else None

    @property
    def stopped(self) -> datetime | None:
        return self.entry.stopped

    @property
    def bytes(self) -> int | None:
        return self.entry.info.bytes if self.entry.info else None

    @property
    def format(self) -> str:
        info, proof = self.entry.info, self.entry.proof
        kind = "incremental" if proof.incremental else (info.format if info else proof.format)
        return kind + (f"+{info.compression}" if info and info.compression else "")

    def as_dict(self, now: datetime) -> dict[str, Any]:
        """JSON for the API, with the age at ``now``."""
        info, proof = self.entry.info, self.entry.proof
        return {
            "id": self.id,
            "folder": self.folder,
            "cluster": self.cluster,
            "label": self.label,
            "dag_id": self.dag_id,
            "run_id": info.run_id if info else None,
            "started": proof.start_time.isoformat() if proof.start_time else None,
            "stopped": self.stopped.isoformat() if self.stopped else None,
            "age_s": _rounded(self.entry.age(now)),
            "bytes": self.bytes,
            "duration_s": _rounded(self.entry.duration),
            "format": self.format,
            "status": proof.status,
            "verified": self.verified,
            "verified_at": self.verified_at,
            "drill_at": self.drill_at.isoformat() if self.drill_at else None,
            "drill_restore_s": self.drill_s,
        }


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 1)


def _parsed(text: Any) -> datetime | None:
    """An ISO 8601 time with a zone from a check record, else None (a record is shown, never trusted)."""
    try:
        return aware_time(text, "at")
    except CatalogError:
        return None


def row_of(entry: CatalogEntry, root: str) -> Row:
    """The page's row of a backup :func:`~pg_safe_backup.catalog.list_backups` found under ``root``.

    :param entry: the backup.
    :param root: the root it was listed under (its id is its folder below it).
    """
    records = entry.info.verifications if entry.info else []
    drills = [r for r in records if str(r.get("by", "")).startswith(DRILL_BY)]
    seconds = drills[-1].get("seconds") if drills else None
    verified, verified_at = verdict(entry)
    return Row(
        id=backup_id(entry.name, root),
        entry=entry,
        verified=verified,
        verified_at=verified_at,
        drill_at=_parsed(drills[-1].get("at")) if drills else None,
        drill_s=float(seconds)
        if isinstance(seconds, (int, float)) and not isinstance(seconds, bool)
        else None,
    )


def visible(rows: Iterable[Row], readable_dags: set[str], every_dag: bool) -> list[Row]:
    """The rows a user may see: those of the DAGs they may read; with ``every_dag`` (they may read every DAG
    Airflow knows) also those without a DAG (the CLI's) or of a DAG Airflow no longer knows.

    :param rows: a root's rows.
    :param readable_dags: the DAG ids the user may read.
    :param every_dag: the user may read every DAG.
    """
    return [r for r in rows if every_dag or (r.dag_id is not None and r.dag_id in readable_dags)]


# ------------------------------------------------------------------------------------------ the cache
@dataclass
class _Listed:
    rows: list[Row]
    stamp: Any
    at: float
    proofs: dict[tuple[str, int | None], Proof] = field(default_factory=dict)


def folder_stamp(root: Folder, backups: set[str], max_depth: int = MAX_DEPTH) -> frozenset | None:
    """What changes when a backup under a local ``root`` is stored, checked or deleted: the modification
    time of every folder below it (to ``max_depth``, as :func:`~pg_safe_backup.catalog.list_backups`
    searches) that is not one of ``backups`` (a store's entry is renamed into its parent, a check record
    too, a deletion removes a name there). None for an object store.

    :param root: the root.
    :param backups: the folders of its backups, as listed (not searched).
    :param max_depth: how deep the listing searches.
    """
    if not is_local_path(root):
        return None
    top, seen = str(root), []
    if top in backups:  # the root is one backup: its folder and its entry beside it
        return frozenset((p, _mtime(p)) for p in (top, str(entry_path(root))))

    def scan(path: str, depth: int) -> None:
        seen.append((path, _mtime(path)))
        if depth + 1 >= max_depth:  # its folders are searched only as backups
            return
        try:
            with os.scandir(path) as children:
                below = [
                    c.path for c in children if c.is_dir(follow_symlinks=False) and c.path not in backups
                ]
        except OSError:
            return
        for child in below:
            scan(child, depth + 1)

    scan(top, 0)
    return frozenset(seen)


def _mtime(path: str) -> int | None:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None


class BackupsCache:
    """Each root's rows, listed again only when its stamp changed (:func:`folder_stamp`) or, for an object
    store, after :data:`STORE_REFRESH_S`; one listing at a time per root, the others wait for it.

    :param clock: seconds, monotonic (a test may fake it).
    :param refresh_s: an object store's root is listed again after this long.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic, refresh_s: float = STORE_REFRESH_S):
        self._clock = clock
        self._refresh_s = refresh_s
        self._listed: dict[str, _Listed] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def rows(self, name: str, root: Folder, key: EncryptionKey | None = None) -> list[Row]:
        """The rows of ``root``, oldest first, as of now.

        :param name: the root as configured (the cache's key and the rows' ids' base).
        :param root: where it is: a local Path or an object-store path.
        :param key: the key of encrypted backups (without it they are listed unproven).
        """
        with self._guard:
            lock = self._locks.setdefault(name, threading.Lock())
        with lock:
            last = self._listed.get(name)
            if last is not None and self._fresh(last, root):
                return last.rows
            proofs: dict[tuple[str, int | None], Proof] = {}
            local = is_local_path(root)

            def prove(folder: Folder, key: EncryptionKey | None) -> Proof:
                # A folder whose time did not change holds the files it was proven from.
                memo = (str(folder), _mtime(str(folder)) if local else None)
                known = last.proofs.get(memo) if last else None
                proofs[memo] = known if known is not None else prove_backup(folder, key)
                return proofs[memo]

            entries = list_backups(root, key=key, prove=prove)
            rows = sorted(
                (row_of(e, str(root)) for e in entries),
                key=lambda r: (r.stopped or datetime.min.replace(tzinfo=timezone.utc), r.id),
            )
            stamp = folder_stamp(root, {e.name for e in entries})
            self._listed[name] = _Listed(rows, stamp, self._clock(), proofs)
            return rows

    def _fresh(self, last: _Listed, root: Folder) -> bool:
        if last.stamp is None:
            return self._clock() - last.at < self._refresh_s
        return folder_stamp(root, {r.folder for r in last.rows}) == last.stamp


# ------------------------------------------------------------------------------------------ drawing
def _stamp_text(at: datetime | None) -> str:
    return at.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M") if at else "?"


@dataclass(frozen=True)
class Series:
    """One cluster's points of one chart: (time, value), oldest first."""

    cluster: str
    points: list[tuple[datetime, float]]


def series(
    rows: Sequence[Row], value: Callable[[Row], float | None], when: Callable[[Row], Any]
) -> list[Series]:
    """A chart's lines: per cluster, (``when(row)``, ``value(row)``) of each row that has both.

    :param rows: the rows shown.
    :param value: what the chart plots (bytes, seconds).
    :param when: its time (the backup's stop, the drill's).
    """
    by: dict[str, list[tuple[datetime, float]]] = {}
    for r in rows:
        at, v = when(r), value(r)
        if at is not None and v is not None:
            by.setdefault(r.cluster or "?", []).append((at, float(v)))
    return [Series(c, sorted(points)) for c, points in sorted(by.items())]


#: A chart marks each point of a line with a dot up to this many points (beyond, the line alone).
DOTS_UP_TO = 60


def chart_svg(
    title: str, lines: Sequence[Series], unit: Callable[[float], str], colours: dict[str, str]
) -> str:
    """A line chart as inline SVG: a path per cluster, the time along x, 0 to the largest value along y.

    :param title: what it shows.
    :param lines: :func:`series`.
    :param unit: how to write a value (:func:`human_bytes`, :func:`~pg_safe_backup.catalog.span`).
    :param colours: a colour per cluster.
    """
    width, height, left, right, top, bottom = 900, 200, 70, 10, 24, 24
    head = f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}">'
    caption = f'<text x="{left}" y="15" class="title">{escape(title)}</text>'
    points = [p for line in lines for p in line.points]
    if not points:
        empty = f'<text x="{left}" y="{height // 2}" class="axis">no data yet</text>'
        return f"{head}{caption}{empty}</svg>"
    t0 = min(p[0] for p in points).timestamp()
    t1 = max(p[0] for p in points).timestamp()
    top_value = max(p[1] for p in points) or 1.0
    duration = (t1 - t0) or 1.0
    plot_w, plot_h = width - left - right, height - top - bottom

    def x(at: datetime) -> str:
        return f"{left + (at.timestamp() - t0) / duration * plot_w:.1f}"

    def y(v: float) -> str:
        return f"{top + plot_h - v / top_value * plot_h:.1f}"

    parts = [head, caption]
    parts.append(
        f'<line x1="{left}" y1="{top + plot_h}" x2="{width - right}" y2="{top + plot_h}" class="grid"/>'
        f'<line x1="{left}" y1="{top}" x2="{width - right}" y2="{top}" class="grid"/>'
        f'<text x="{left - 4}" y="{top + 4}" class="axis" text-anchor="end">{escape(unit(top_value))}</text>'
        f'<text x="{left - 4}" y="{top + plot_h}" class="axis" text-anchor="end">0</text>'
        f'<text x="{left}" y="{height - 6}" class="axis">{_stamp_text(min(p[0] for p in points))}</text>'
        f'<text x="{width - right}" y="{height - 6}" class="axis" text-anchor="end">'
        f"{_stamp_text(max(p[0] for p in points))}</text>"
    )
    for line in lines:
        # The points joined show the trend; a dot on each while they are few enough to tell apart.
        colour = colours.get(line.cluster, PALETTE[0])
        d = "M" + " L".join(f"{x(at)} {y(v)}" for at, v in line.points)
        name = f"<title>cluster {escape(line.cluster)}</title>"
        parts.append(f'<path d="{d}" stroke="{colour}" class="series">{name}</path>')
        if len(line.points) <= DOTS_UP_TO:
            parts.extend(
                f'<circle cx="{x(at)}" cy="{y(v)}" r="3.5" fill="{colour}">'
                f"<title>{escape(unit(v))}</title></circle>"
                for at, v in line.points
            )
    parts.append("</svg>")
    return "".join(parts)


_STYLE = """
body{font-family:system-ui,sans-serif;margin:16px;color:#222;background:#fff}
h1{font-size:20px;margin:0 0 8px}nav a{margin-right:12px}.note{color:#555;font-size:13px}
.chart{width:100%;max-width:900px;display:block;margin:8px 0}
.chart .title{font-size:13px;font-weight:600}.chart .axis{font-size:11px;fill:#555}
.chart .grid{stroke:#ccc}.chart .series{fill:none;stroke-width:2;stroke-linecap:round;stroke-linejoin:round}
table{border-collapse:collapse;font-size:13px;margin-top:12px}
th,td{padding:3px 8px;border-bottom:1px solid #eee;text-align:left;white-space:nowrap}
th{background:#f5f5f5;position:sticky;top:0}td.n{text-align:right}
tr:target{background:#fff3b0}.bad{color:#b00020;font-weight:600}.ok{color:#1b7f3b}
.key span{display:inline-block;width:10px;height:10px;margin:0 4px 0 12px}
"""

_HEADS = (
    "cluster",
    "label",
    "stopped (UTC)",
    "age",
    "size",
    "duration",
    "format",
    "status",
    "verified",
    "last drill's restore",
    "DAG",
    "folder",
)
_VERIFIED_CLASS = {"yes": "ok", "FAILED": "bad"}


def render_page(
    *,
    root: str,
    roots: Sequence[str],
    rows: Sequence[Row],
    now: datetime,
    link: Callable[[str], str],
    hidden: int = 0,
) -> str:
    """The Backups page of one root: its clusters' charts (size, duration, drill restore time over time) and
    a table of its backups, newest first; every value escaped.

    :param root: the root shown.
    :param roots: every configured root (the page links to each).
    :param rows: the root's rows the user may see, oldest first.
    :param now: for the ages.
    :param link: the page's URL of a root.
    :param hidden: how many backups the user may not see (said, never shown).
    """
    clusters = sorted({r.cluster or "?" for r in rows})
    colours = {c: PALETTE[i % len(PALETTE)] for i, c in enumerate(clusters)}
    nav = "".join(
        f'<a href="{escape(link(r))}">{"<b>" + escape(r) + "</b>" if r == root else escape(r)}</a>'
        for r in roots
    )
    key = "".join(
        f'<span style="background:{colours[c]}"></span>'
        f'<b title="{escape(c)}">cluster {escape(c[-CLUSTER_DIGITS:])}</b>'
        for c in clusters
    )
    stopped = [r for r in rows if r.stopped is not None]
    newest = max(stopped, key=lambda r: r.stopped).stopped if stopped else None  # type: ignore[arg-type, return-value]
    summary = (
        f"{len(rows)} backup{'s' if len(rows) != 1 else ''} of {len(clusters)} cluster"
        f"{'s' if len(clusters) != 1 else ''}"
        + (f"; the newest stopped {span((now - newest).total_seconds())} ago" if newest else "")
        + (f"; {hidden} of DAGs you may not read not shown" if hidden else "")
    )
    charts = "".join(
        (
            chart_svg("Size", series(rows, lambda r: r.bytes, lambda r: r.stopped), human_bytes, colours),
            chart_svg(
                "Duration (label's start to the store)",
                series(rows, lambda r: r.entry.duration, lambda r: r.stopped),
                span,
                colours,
            ),
            chart_svg(
                "Restore time of the drills",
                series(rows, lambda r: r.drill_s, lambda r: r.drill_at),
                span,
                colours,
            ),
        )
    )
    head = "<tr>" + "".join(f"<th>{escape(h)}</th>" for h in _HEADS) + "</tr>"
    body = []
    for r in reversed(rows):
        verified = escape(r.verified) + (f" {escape(to_the_minute(r.verified_at))}" if r.verified_at else "")
        body.append(
            f'<tr id="{escape(r.id)}"><td title="{escape(r.cluster or "")}">'
            f"{escape((r.cluster or '?')[-CLUSTER_DIGITS:])}</td>"
            f"<td>{escape(r.label)}</td><td>{_stamp_text(r.stopped)}</td>"
            f'<td class="n">{span(r.entry.age(now))}</td><td class="n">{human_bytes(r.bytes)}</td>'
            f'<td class="n">{span(r.entry.duration)}</td><td>{escape(r.format)}</td>'
            f'<td class="{"ok" if r.entry.proof.ok else "bad"}">{escape(r.entry.proof.status)}</td>'
            f'<td class="{_VERIFIED_CLASS.get(r.verified, "")}">{verified}</td>'
            f'<td class="n">{span(r.drill_s) if r.drill_s is not None else ""}</td>'
            f"<td>{escape(r.dag_id or '')}</td><td>{escape(r.id)}</td></tr>"
        )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>Backups</title>'
        f"<style>{_STYLE}</style></head><body><h1>Backups: {escape(root)}</h1><nav>{nav}</nav>"
        f'<p class="note">{escape(summary)}. A display: nothing is deleted or restored from here.</p>'
        f'<div class="key">{key}</div>{charts}'
        f"<table><thead>{head}</thead><tbody>{''.join(body)}</tbody></table>"
        "</body></html>"
    )


def render_message(title: str, text: str) -> str:
    """A page that only says something (no root configured, an unknown root)."""
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>Backups</title>'
        f"<style>{_STYLE}</style></head><body><h1>{escape(title)}</h1><p>{escape(text)}</p></body></html>"
    )


def root_of(folder: str, roots: Iterable[str]) -> str | None:
    """The configured root a backup's folder is under (the longest), or None.

    :param folder: the backup's folder (a path or a URL, as the store task was given it).
    :param roots: the configured roots.
    """
    want = _normal(folder)
    under = [r for r in roots if want == _normal(r) or want.startswith(_normal(r).rstrip("/") + "/")]
    return max(under, key=len) if under else None


def _normal(place: str) -> str:
    return os.path.normpath(place) if "://" not in place else place.rstrip("/")


def backup_id(folder: str, root: str) -> str:
    """A backup's id on the page of ``root`` (its folder below it; the table row's anchor)."""
    return _normal(folder).removeprefix(_normal(root).rstrip("/")).lstrip("/") or "."


__all__ = [
    "BackupsCache",
    "Row",
    "Series",
    "backup_id",
    "chart_svg",
    "folder_stamp",
    "render_message",
    "render_page",
    "root_of",
    "row_of",
    "series",
    "visible",
]
