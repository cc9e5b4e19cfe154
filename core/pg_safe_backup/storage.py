"""Where a day-two command reads backups: a local path, or an object-store URL (s3://, gs://, abfs://...)
opened with fsspec (universal_pathlib) and each store's own credential chain (environment, profiles), plus
``--storage-option KEY=VALUE``. Airflow-free: the CLI runs on a restore host; the operators keep their
Airflow connections (``ObjectStoragePath``).

What a command does with the folder (list, prove, verify, restore) is the same for both: the modules that
read backups take any path object with ``/``, ``iterdir``, ``is_dir``, ``read_bytes`` and ``open``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pg_safe_backup.errors import PermanentError


class StorageError(PermanentError, ValueError):
    """A location that cannot be opened as given (the message names the flag or argument)."""


def is_url(text: str) -> bool:
    """Whether ``text`` names an object store (``scheme://...``) rather than a local path."""
    scheme, sep, _ = str(text).partition("://")
    return bool(sep) and scheme.isalnum() and scheme != "file"


def in_store(place: Any) -> bool:
    """Whether ``place`` is in an object store: a URL (``s3://...``), or a path object of fsspec's
    (``UPath``, Airflow's ``ObjectStoragePath``) that is not a local file.

    :param place: a path, a URL or a path object.
    """
    protocol = getattr(place, "protocol", None)  # first: an older UPath is a pathlib.Path too
    if protocol is not None:
        return protocol not in ("", "file", "local")
    return isinstance(place, str) and is_url(place)


def place_of(where: Any) -> Any:
    """``where`` as the path object a command reads: a local ``Path`` for a path (``str`` or ``Path``), a
    ``UPath`` for a URL (:func:`location`, no options: the store's own credentials), any other path object
    (``UPath``, ``ObjectStoragePath``) as it is."""
    if in_store(where) and not isinstance(where, str):
        return where
    return location(str(where))


def storage_options(pairs: Iterable[str], flag: str = "--storage-option") -> dict[str, Any]:
    """``KEY=VALUE`` pairs as fsspec options (``true``/``false`` as booleans, integers as integers).

    :raises StorageError: a pair without ``=`` (named with ``flag``; its value never printed).
    """
    options: dict[str, Any] = {}
    for pair in pairs:
        key, equals, value = pair.partition("=")
        if not equals or not key:
            raise StorageError(f"{flag} {key or pair[:20]!r}...: give KEY=VALUE")
        lowered = value.lower()
        if lowered in ("true", "false"):
            options[key] = lowered == "true"
        elif value.isdigit():
            options[key] = int(value)
        else:
            options[key] = value
    return options


def location(text: str | Path, options: dict[str, Any] | None = None, what: str = "ROOT") -> Path | Any:
    """The local ``Path``, or for a URL a ``UPath`` with ``options`` (``s3://bucket/prefix``).

    :param text: the argument as given.
    :param options: fsspec options for a URL (``--storage-option``).
    :param what: the argument's name, for errors.
    :raises StorageError: an Airflow connection in the URL (``s3://conn_id@bucket``: the CLI does not read
        Airflow's connections), or a scheme fsspec has no driver for (named with the package to install).
    """
    text = str(text)
    if not is_url(text):
        return Path(text.removeprefix("file://"))
    scheme, _, rest = text.partition("://")
    if "@" in rest.split("/", 1)[0]:
        raise StorageError(
            f"{what} {scheme}://{rest.split('@', 1)[0]}@...: an Airflow connection in a URL is the operators'"
            " (ObjectStoragePath); the CLI reads the store's own credentials (environment, profile) and"
            " --storage-option KEY=VALUE"
        )
    try:
        from upath import UPath

        return UPath(text, **(options or {}))
    except (ImportError, ValueError) as err:
        raise StorageError(f"{what} {text}: {' '.join(str(err).split())}") from None
