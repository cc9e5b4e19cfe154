"""The store task's extra link: the backup it stored, on the Backups page (:mod:`pg_safe_backup.plugins`).

Airflow computes an operator's links on the worker when a try ends and keeps them in XCom; this one reads the
store's own XCom (where it wrote the catalog entry) and points at ``/pg-safe-backup/backups?backup=FOLDER``
below ``[api] base_url``: the API server finds the root of ``[pg_safe_backup] catalog_roots`` that holds the
folder and opens it at the backup's row. A try that stored nothing gets no link.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from airflow.providers.common.compat.sdk import XCom
from airflow.sdk import BaseOperatorLink

from pg_safe_backup.catalog import ENTRY_SUFFIX

if TYPE_CHECKING:
    from airflow.sdk import BaseOperator
    from airflow.sdk.types import TaskInstanceKey

#: Where Airflow mounts the page's app (below ``[api] base_url``), and its routes.
URL_PREFIX = "/pg-safe-backup"
PAGE = "/backups"
API = "/api/backups"


def base_url() -> str:
    """``[api] base_url`` without its trailing slash (empty: the server's root)."""
    from airflow.configuration import conf

    return (conf.get("api", "base_url", fallback="/") or "/").rstrip("/")


def page_url(folder: str) -> str:
    """The Backups page at the backup in ``folder`` (the store task's destination), below ``[api] base_url``:
    the API server finds the root of ``[pg_safe_backup] catalog_roots`` that holds it.

    :param folder: the backup's folder or URL.
    """
    return f"{base_url()}{URL_PREFIX}{PAGE}?{urlencode({'backup': folder})}"


def stored_folder(result: Any) -> str | None:
    """The folder of the backup a store task stored, from its XCom (what
    :func:`~pg_safe_backup.store.store_backup` returns: where the catalog entry ``<folder>.backup_info.json``
    was written); None when it stored none.

    :param result: the store task's return value.
    """
    entry = result.get("backup_info") if isinstance(result, dict) else None
    return (
        entry.removesuffix(ENTRY_SUFFIX) if isinstance(entry, str) and entry.endswith(ENTRY_SUFFIX) else None
    )


class BackupsPageLink(BaseOperatorLink):
    """The stored backup on the Backups page."""

    name = "Backup on the Backups page"

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        folder = stored_folder(XCom.get_value(ti_key=ti_key, key="return_value"))
        return page_url(folder) if folder else ""
