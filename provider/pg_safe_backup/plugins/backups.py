"""The Backups page in Airflow's UI: a FastAPI app under ``/pg-safe-backup``, shown through an external view.

``GET /pg-safe-backup/backups?root=ROOT`` is the page of one catalog root (``[pg_safe_backup]
catalog_roots``): a chart of each cluster's backup size, duration and drill restore time over time, and a
table of its backups; ``?backup=FOLDER`` (the store task's extra link) opens the root that holds a backup, at
its row. ``GET /pg-safe-backup/api/backups?root=ROOT`` is the same as JSON. The rows, charts and the cache
are :mod:`pg_safe_backup.backups_page`'s (Airflow-free); this module adds Airflow's authentication and keeps
to what the user may read.

A plugin's FastAPI app gets no authentication of its own: each route depends on Airflow's
``requires_access_dag("GET")`` (an anonymous request gets 401, a user who may read no DAG 403), and a user
sees only the backups of the DAGs the auth manager lets them read (``get_authorized_dag_ids``, as Airflow's
own DAG list filters). A backup without a DAG (the CLI's) or of a DAG Airflow no longer knows is shown only
to a user who may read every DAG Airflow knows. The page is a display: nothing is deleted or restored here.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

from fastapi import Depends, FastAPI, Query
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from airflow.api_fastapi.core_api.security import GetUserDep, requires_access_dag
from airflow.plugins_manager import AirflowPlugin

from pg_safe_backup.backups_page import (
    BackupsCache,
    Row,
    backup_id,
    render_message,
    render_page,
    root_of,
    visible,
)
from pg_safe_backup.errors import PgSafeBackupError
from pg_safe_backup.links import API, PAGE, URL_PREFIX, base_url

#: The option that names the roots the page shows.
ROOTS_OPTION = ("pg_safe_backup", "catalog_roots")

#: One per API server process: 10,000 backups' rows stay between requests (see BackupsCache).
CACHE = BackupsCache()

app = FastAPI(
    title="pg-safe-backup: the Backups page",
    description="The backups under each root of [pg_safe_backup] catalog_roots, as a page and as JSON.",
)


def catalog_roots() -> list[str]:
    """``[pg_safe_backup] catalog_roots``: comma-separated local folders or object-store URLs."""
    from airflow.configuration import conf

    text = conf.get(*ROOTS_OPTION, fallback="") or ""
    return [root.strip() for root in text.split(",") if root.strip()]


def base_path() -> str:
    """The path of ``[api] base_url`` (empty at the server's root): the UI's menu entry starts with it."""
    return urlsplit(base_url()).path.rstrip("/")


def _readable(user: Any) -> tuple[set[str], bool]:
    """The DAG ids ``user`` may read, and whether that is every DAG Airflow knows."""
    from sqlalchemy import select

    from airflow.api_fastapi.app import get_auth_manager
    from airflow.models.dag import DagModel
    from airflow.utils.session import create_session

    readable = set(get_auth_manager().get_authorized_dag_ids(user=user, method="GET"))
    with create_session() as session:
        known = set(session.scalars(select(DagModel.dag_id)))
    return readable, known <= readable


def _rows(root: str) -> list[Row]:
    """The rows of a configured root (listed or cached).

    :raises PgSafeBackupError, OSError, ValueError: it cannot be read (the message names it).
    """
    from pg_safe_backup.utils.mixins import check_storage_url, storage_path

    return CACHE.rows(root, storage_path(check_storage_url(root, "catalog_roots")))


class _Nothing(Exception):
    """Nothing to show, and why: the answer's status, a title and one line naming the parameter."""

    def __init__(self, status: int, title: str, text: str) -> None:
        super().__init__(text)
        self.status, self.title, self.text = status, title, text

    def page(self) -> Response:
        return HTMLResponse(render_message(self.title, self.text), status_code=self.status)

    def json(self) -> Response:
        return JSONResponse({"detail": self.text}, status_code=self.status)


def _shown(root: str | None, user: Any) -> tuple[str, list[str], list[Row], int]:
    """The root asked for, every root, the rows ``user`` may see and how many they may not.

    :raises _Nothing: no root is configured, ``root`` is not one, or it cannot be read.
    """
    roots = catalog_roots()
    if not roots:
        raise _Nothing(
            404,
            "No catalog root",
            "set [pg_safe_backup] catalog_roots in airflow.cfg: the comma-separated folders or URLs the"
            " backups are stored under",
        )
    root = root or roots[0]
    if root not in roots:
        raise _Nothing(404, "Unknown root", f"root {root!r} is not one of [pg_safe_backup] catalog_roots")
    try:
        rows = _rows(root)
    except (PgSafeBackupError, OSError, ValueError) as err:
        raise _Nothing(503, "Cannot read the root", f"root {root!r}: {' '.join(str(err).split())}") from err
    readable, every_dag = _readable(user)
    shown = visible(rows, readable, every_dag)
    return root, roots, shown, len(rows) - len(shown)


#: The root a page or answer is of (the same query parameter on both).
RootQuery = Query(None, description="a root of [pg_safe_backup] catalog_roots (default: the first)")


@app.get(PAGE, response_class=HTMLResponse, dependencies=[Depends(requires_access_dag("GET"))])
def backups_page(
    user: GetUserDep,
    root: str | None = RootQuery,
    backup: str | None = Query(None, description="a backup's folder: opens its root at its row"),
) -> Response:
    """The Backups page of one root; with ``backup``, a redirect to its root's page at its row."""
    if backup is not None:
        holder = root_of(backup, catalog_roots())
        if holder is None:
            text = f"backup {backup!r} is under no root of [pg_safe_backup] catalog_roots"
            return _Nothing(404, "Unknown backup", text).page()
        return RedirectResponse(f"?{urlencode({'root': holder})}#{quote(backup_id(backup, holder))}", 303)
    try:
        root, roots, rows, hidden = _shown(root, user)
    except _Nothing as nothing:
        return nothing.page()
    return HTMLResponse(
        render_page(
            root=root,
            roots=roots,
            rows=rows,
            now=datetime.now(timezone.utc),
            link=lambda r: f"?{urlencode({'root': r})}",
            hidden=hidden,
        )
    )


@app.get(API, dependencies=[Depends(requires_access_dag("GET"))])
def backups_api(user: GetUserDep, root: str | None = RootQuery) -> Response:
    """The backups of one root the user may see, oldest first, as JSON."""
    try:
        root, _, rows, hidden = _shown(root, user)
    except _Nothing as nothing:
        return nothing.json()
    now = datetime.now(timezone.utc)
    return JSONResponse({"root": root, "backups": [r.as_dict(now) for r in rows], "hidden": hidden})


class BackupsPagePlugin(AirflowPlugin):
    """The Backups page: the app, and its entry in the UI's Browse menu."""

    name = "pg_safe_backup"
    fastapi_apps = [{"app": app, "url_prefix": URL_PREFIX, "name": "pg-safe-backup: Backups"}]
    external_views = [
        {
            "name": "Backups",
            "href": base_path() + URL_PREFIX + PAGE,
            "destination": "nav",
            "category": "browse",
            "url_route": "pg-safe-backup",
        }
    ]


def _entry_point_plugin() -> type[AirflowPlugin] | None:
    """What the ``airflow.plugins`` entry point names: the plugin, or None (Airflow skips it silently) when
    ``[core] lazy_discover_providers`` is off, as Airflow then loads provider info's ``plugins`` too and 3.3
    records a second registration as a plugin import error in the UI. Registered once, either way."""
    from airflow.configuration import conf

    return BackupsPagePlugin if conf.getboolean("core", "lazy_discover_providers", fallback=True) else None


#: The ``airflow.plugins`` entry point's target (pyproject.toml).
ENTRY_POINT = _entry_point_plugin()
