"""Provider metadata read by Airflow's ProvidersManager (entry point ``apache_airflow_provider``)."""

from __future__ import annotations

from pg_safe_backup import __version__

_INTEGRATION = "PostgreSQL safe online backup"


def _modules(kind: str, *names: str) -> list[dict]:
    """The provider metadata's entry for one kind of module (operators, sensors, hooks, triggers)."""
    modules = [f"pg_safe_backup.{kind}.{name}" for name in ("backup", *names)]
    return [{"integration-name": _INTEGRATION, "python-modules": modules}]


def get_provider_info() -> dict:
    """The provider's metadata: its modules, and the ``[pg_safe_backup]`` options of airflow.cfg."""
    return {
        "package-name": "airflow-provider-pg-safe-backup",
        "name": _INTEGRATION,
        "description": "Non-exclusive online file-system backups of PostgreSQL: a deferrable holder keeps the"
        " backup session open while your tasks copy the data directory.",
        "versions": [__version__],
        "hook-class-names": [],
        "connection-types": [],
        "integrations": [
            {
                "integration-name": _INTEGRATION,
                "external-doc-url": "https://www.postgresql.org/docs/current/continuous-archiving.html",
                "tags": ["software"],
            }
        ],
        "operators": _modules("operators", "copy", "lifecycle", "check", "snapshot", "incremental"),
        "sensors": _modules("sensors"),
        "hooks": _modules("hooks"),
        "triggers": _modules("triggers"),
        "plugins": [
            {"name": "pg_safe_backup", "plugin-class": "pg_safe_backup.plugins.backups.BackupsPagePlugin"}
        ],
        "extra-links": ["pg_safe_backup.links.BackupsPageLink"],
        "config": {
            "pg_safe_backup": {
                "description": "Options of pg-safe-backup's triggers and of its Backups page.",
                "options": {
                    "holder_check_period": {
                        "description": "Seconds within which a held backup sees that its DAG run or its"
                        " group's finish task ended without ending it (then nobody would: it fails the"
                        " backup and ends backup mode). A safety net: the finish ends a backup at once"
                        " through NOTIFY. The holders of one DAG run in one triggerer share one look at"
                        " Airflow per half period (two Task SDK calls), whatever their number.",
                        "version_added": "0.1.0",
                        "type": "float",
                        "example": "30",
                        "default": "30",
                    },
                    "catalog_roots": {
                        "description": "The roots the Backups page shows (Browse > Backups): comma-separated"
                        " local folders or object-store URLs the store tasks store backups under, as"
                        " pg-safe-backup list takes them. Empty: the page says how to set it.",
                        "version_added": "0.1.0",
                        "type": "string",
                        "example": "/backups/main,s3://aws@backups/db1",
                        "default": "",
                    },
                },
            }
        },
    }
