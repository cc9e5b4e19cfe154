"""``python -m pg_safe_backup``: the ``pg-safe-backup`` command (:mod:`pg_safe_backup.cli`)."""

from __future__ import annotations

import sys

from pg_safe_backup.cli import main

if __name__ == "__main__":
    sys.exit(main())
