"""Parameter checks shared by the operators: each error names the parameter and what it accepts.

A templated parameter is checked twice: when the DAG is parsed, unless Airflow renders it at run time
(:func:`renders_later`), and in ``execute()`` on the value as rendered. Airflow renders a template to
text unless the DAG sets ``render_template_as_native_obj``, so the run-time checks also take the text
of a number (``"3600"``) and of a bool (``"true"``, ``"False"``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, TypeVar

from pg_safe_backup.hooks.backup import validate_identifier

__all__ = [
    "check_flag",
    "check_label",
    "check_number",
    "check_seconds",
    "check_text",
    "optional_unless_rendered_later",
    "renders_later",
    "unless_rendered_later",
    "validate_identifier",
]

T = TypeVar("T")

#: pg_backup_start refuses labels longer than MAXPGPATH - 1 bytes.
MAX_LABEL_BYTES = 1023
#: What Jinja treats as the start of an expression, a statement or a comment.
JINJA_MARKERS = ("{{", "{%", "{#")
#: The text of a plain decimal number (no "nan", "inf" or "1_000", which float() would take).
_NUMBER_TEXT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def renders_later(value: Any) -> bool:
    """Airflow renders ``value`` at run time: a text with Jinja in it, or an XComArg or a mapped task
    group's argument (both resolve themselves)."""
    if isinstance(value, str):
        return any(marker in value for marker in JINJA_MARKERS)
    return callable(getattr(value, "resolve", None))


def unless_rendered_later(check: Callable[[Any, str], T], value: Any, param: str) -> T | Any:
    """``check(value, param)`` now (parse time), or ``value`` as it is when it renders later: then
    ``execute()`` checks what it rendered to."""
    return value if renders_later(value) else check(value, param)


def optional_unless_rendered_later(check: Callable[[Any, str], T], value: Any, param: str) -> T | Any | None:
    """None for a parameter not given (None), else :func:`unless_rendered_later` of it."""
    return None if value is None else unless_rendered_later(check, value, param)


def check_number(value: Any, param: str, minimum: float = 0, allow_min: bool = True) -> float:
    """A real number >= minimum (> minimum unless ``allow_min``); bools and strings are refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{param} must be a number of seconds, got {value!r} ({type(value).__name__})")
    if value < minimum or (value == minimum and not allow_min):
        bound = f">= {minimum:g}" if allow_min else f"> {minimum:g}"
        raise ValueError(f"{param} must be {bound}, got {value!r}")
    return value


def check_seconds(value: Any, param: str) -> float:
    """A templated number of seconds >= 0: a number, or the text of one (what a template renders to)."""
    if isinstance(value, str) and _NUMBER_TEXT.fullmatch(value.strip()):
        value = float(value)
    return check_number(value, param)


def check_flag(value: Any, param: str) -> bool:
    """A templated bool: True or False, or the text a template renders one to (``true``/``false``, in
    any case, as Jinja prints a Python bool and JSON params print theirs). Nothing else, not even
    "yes" or 1: a typo must not turn into either."""
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    if not isinstance(value, bool):
        raise ValueError(
            f"{param} must be True or False (or a template rendering to true or false), got {value!r}"
        )
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
