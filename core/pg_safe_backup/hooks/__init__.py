"""All SQL against the backed-up cluster: :mod:`.server` (core, no Airflow) and :mod:`.backup` (provider)."""

from pg_safe_backup import halves

__path__ = halves(__path__, __name__)
