"""Airflow plugins of the provider: the Backups page (:mod:`pg_safe_backup.plugins.backups`)."""
