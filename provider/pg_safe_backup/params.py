"""Parameter checks shared by the operators: each error names the parameter and what it accepts."""

from __future__ import annotations

from typing import Any

from pg_safe_backup.hooks.backup import validate_identifier

__all__ = ["check_number", "check_label", "check_text", "validate_identifier"]

#: pg_backup_start refuses labels longer than MAXPGPATH - 1 bytes.
MAX_LABEL_BYTES = 1023


def check_number(value: Any, param: str, minimum: float = 0, allow_min: bool = True) -> float:
    """A real number >= minimum (> minimum unless ``allow_min``); bools and strings are refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{param} must be a number of seconds, got {value!r} ({type(value).__name__})")
    if value < minimum or (value == minimum and not allow_min):
        bound = f">= {minimum:g}" if allow_min else f"> {minimum:g}"
        raise ValueError(f"{param} must be {bound}, got {value!r}")
    return value


def check_text(value: Any, param: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{param} must be a non-empty string, got {value!r}")
    return value


def check_label(value: Any, param: str = "label") -> str:
    """A backup label: non-empty, one line (it becomes backup_label's LABEL line), <= 1023 bytes."""
    check_text(value, param)
    if any(ch in value for ch in "\r\n\0"):
        raise ValueError(f"{param} must be a single line without NUL characters, got {value!r}")
    if len(value.encode()) > MAX_LABEL_BYTES:
        raise ValueError(f"{param} is longer than {MAX_LABEL_BYTES} bytes, which pg_backup_start refuses")
    return value
