"""pg-safe-backup: safe online file-system backups of PostgreSQL, orchestrated by Airflow."""

from __future__ import annotations

__version__ = "0.1.0"


def get_provider_info() -> dict:
    """Provider metadata read by Airflow's ProvidersManager (entry point ``apache_airflow_provider``)."""
    return {
        "package-name": "airflow-provider-pg-safe-backup",
        "name": "PostgreSQL safe online backup",
        "description": "Non-exclusive online file-system backups of PostgreSQL: a deferrable holder keeps the"
        " backup session open while your tasks copy the data directory.",
        "versions": [__version__],
        "hook-class-names": [],
        "connection-types": [],
        "integrations": [
            {
                "integration-name": "PostgreSQL safe online backup",
                "external-doc-url": "https://www.postgresql.org/docs/current/continuous-archiving.html",
                "tags": ["software"],
            }
        ],
        "operators": [
            {"integration-name": "PostgreSQL safe online backup", "python-modules": ["pg_safe_backup.operators.backup"]}
        ],
        "sensors": [
            {"integration-name": "PostgreSQL safe online backup", "python-modules": ["pg_safe_backup.sensors.backup"]}
        ],
        "hooks": [
            {"integration-name": "PostgreSQL safe online backup", "python-modules": ["pg_safe_backup.hooks.backup"]}
        ],
        "triggers": [
            {"integration-name": "PostgreSQL safe online backup", "python-modules": ["pg_safe_backup.triggers.backup"]}
        ],
    }
