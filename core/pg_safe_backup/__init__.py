"""pg-safe-backup: safe online file-system backups of PostgreSQL, orchestrated by Airflow.

Two distributions share this package. ``pg-safe-backup`` (core/) holds everything that runs without Airflow:
the CLI, the catalog, restore, retention, the WAL archive, the on-disk formats and the SQL of
:mod:`pg_safe_backup.hooks.server`. ``airflow-provider-pg-safe-backup`` (provider/) adds the Airflow faces
(operators, sensors, triggers, the task group, the plugin) and depends on the core of the same version.
Installed, both land in one folder; from a checkout, :func:`halves` joins the two source folders (the way
Airflow's own distributions share ``airflow``).
"""

from __future__ import annotations

import os
import sys


def halves(path: list[str], name: str) -> list[str]:
    """``path`` with the package ``name``'s folder in every other ``sys.path`` entry (pkgutil.extend_path
    without its imports: ``wal-push`` runs once per WAL segment and imports this package)."""
    folders = (os.path.join(entry, *name.split(".")) for entry in sys.path if isinstance(entry, str))
    return [*path, *(f for f in folders if f not in path and os.path.isdir(f))]


__path__ = halves(__path__, __name__)

#: The package's one version: both pyproject.toml files carry it (tests/test_provider.py checks they
#: agree), and so does Airflow's provider metadata (:mod:`pg_safe_backup.get_provider_info`).
__version__ = "0.1.0"
