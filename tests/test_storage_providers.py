"""An object-store URL that names an Airflow connection (``s3://conn_id@bucket/prefix``) is used with that
connection only through the filesystem an installed provider registers for its scheme: without
apache-airflow-providers-amazon Airflow 3.3 reads ``s3://`` with s3fs's default credentials and ignores the
connection (3.1 fails at the first access). ``utils.mixins.check_storage_url`` refuses such a URL before a
task does anything, naming the parameter and the extra to install (``[s3]``, ``[gcs]``, ``[azure]``).

How "installed" is made here, honestly and the same on every machine, through Airflow's own provider
discovery (entry point ``apache_airflow_provider`` -> provider info ``filesystems`` -> the module's
``schemes``), in a fresh interpreter each (Airflow caches its registry for the life of a process):

* missing: the real providers' filesystem modules are set to None in ``sys.modules``, so importing them
  fails and Airflow's discovery leaves them out, exactly as when the provider is not installed (it is not in
  constraints/, so here that only makes the test independent of the venv). The stand-in below shows the
  blocking works: blocked, its ``s3://`` is refused too.
* present: a stand-in provider distribution (``pgsb-stand-in-store``, a dist-info folder on PYTHONPATH)
  whose provider info lists a filesystem module with ``schemes = ["s3"]``, as amazon's ``aws.fs.s3``
  does. No registry package is installed for it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import ROOT

#: The filesystem modules of the providers that register s3://, gs:// and abfs:// with Airflow.
REAL_FILESYSTEMS = (
    "airflow.providers.amazon.aws.fs.s3",
    "airflow.providers.google.cloud.fs.gcs",
    "airflow.providers.microsoft.azure.fs.adls",
)
STAND_IN = "pgsb_stand_in_store"
#: Where a URL's connection would be ignored: after the bucket, a path that must never reach the error.
URL = "s3://my_conn@bucket/nightly/secret-prefix"

#: Run in a fresh interpreter: block modules, maybe attach a filesystem, then each call; prints the outcomes.
_SCRIPT = """
import json, sys
request = json.loads(sys.argv[1])
for module in request["block"]:
    sys.modules[module] = None  # an import of it fails: Airflow's discovery leaves its filesystem out
if request["attach"]:
    from airflow.sdk.io import attach
    from fsspec.implementations.local import LocalFileSystem
    attach(request["attach"][0], conn_id=request["attach"][1], fs=LocalFileSystem())
from importlib import import_module
from pg_safe_backup.utils.mixins import check_storage_url

def outcome(call):
    try:
        if call[0] == "check":
            return "ok: " + check_storage_url(call[1], call[2])
        module, name = call[1].rsplit(".", 1)
        getattr(import_module(module), name)(task_id="t", **call[2]).execute({})
        return "ok"
    except Exception as err:
        return f"{type(err).__name__}: {err}"

print(json.dumps([outcome(call) for call in request["calls"]]))
"""

_PROVIDER = """
def get_provider_info():
    return {
        "package-name": "pgsb-stand-in-store",
        "name": "pg-safe-backup's stand-in store",
        "description": "Registers an s3:// filesystem with Airflow, as apache-airflow-providers-amazon does.",
        "filesystems": ["pgsb_stand_in_store.fs"],
    }
"""

_FILESYSTEM = """
schemes = ["s3"]


def get_fs(conn_id, storage_options=None):
    from fsspec.implementations.memory import MemoryFileSystem

    return MemoryFileSystem()
"""


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding the stand-in provider: its package and its dist-info (entry point included)."""
    folder = tmp_path_factory.mktemp("stand-in-provider")
    (folder / STAND_IN).mkdir()
    (folder / STAND_IN / "__init__.py").write_text(_PROVIDER)
    (folder / STAND_IN / "fs.py").write_text(_FILESYSTEM)
    info = folder / f"{STAND_IN}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: pgsb-stand-in-store\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        f"[apache_airflow_provider]\nprovider_info = {STAND_IN}:get_provider_info\n"
    )
    return folder


def airflow_says(
    *calls: list[Any],
    provider: Path | None = None,
    block: tuple[str, ...] = REAL_FILESYSTEMS,
    attach: tuple[str, str] | None = None,
) -> list[str]:
    """Each call's outcome in a fresh interpreter: ``ok: <value>``/``ok``, or ``<Exception>: <message>``.

    :param calls: ``["check", url, param]`` (:func:`check_storage_url`) or ``["execute", classpath,
        kwargs]`` (the operator's ``execute``, its URL parameter as rendered).
    :param provider: a folder of provider distributions to put on PYTHONPATH.
    :param block: modules whose import fails.
    :param attach: ``(scheme, conn_id)`` to attach a filesystem under first.
    """
    path = [str(ROOT / "provider"), *([str(provider)] if provider else []), os.environ.get("PYTHONPATH")]
    request = {"calls": list(calls), "block": list(block), "attach": attach}
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT, json.dumps(request)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p)},
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_a_connection_in_an_s3_url_without_the_amazon_provider_is_refused_naming_parameter_and_extra():
    (said,) = airflow_says(["check", URL, "destination"])
    assert said.startswith("ValueError: destination s3://my_conn@...: the connection needs"), said
    assert "apache-airflow-providers-amazon" in said
    assert "pip install 'airflow-provider-pg-safe-backup[s3]'" in said
    assert "without it Airflow ignores the connection" in said
    assert "bucket" not in said
    assert "secret-prefix" not in said


def test_gs_and_abfs_name_their_own_provider_and_extra_and_an_unregistered_scheme_says_so():
    gs, abfs, az = airflow_says(
        ["check", "gs://gcp_conn@bucket/x", "root"],
        ["check", "abfs://wasb_conn@container/x", "wal_archive"],
        ["check", "az://wasb_conn@container/x", "root"],
    )
    assert gs.startswith(
        "ValueError: root gs://gcp_conn@...: the connection needs apache-airflow-providers-google"
    )
    assert "[gcs]" in gs
    assert abfs.startswith("ValueError: wal_archive abfs://wasb_conn@...: the connection needs")
    assert "apache-airflow-providers-microsoft-azure" in abfs
    assert "[azure]" in abfs
    # adlfs reads az://, but the Azure provider registers abfs://, abfss:// and adl:// only
    assert az.startswith("ValueError: root az://wasb_conn@...: no installed Airflow provider registers")


def test_a_key_in_the_user_part_of_a_url_never_reaches_the_error():
    (said,) = airflow_says(["check", "s3://AKIAEXAMPLE:SeCr3t@bucket/x", "destination"])
    assert said.startswith("ValueError: destination s3://AKIAEXAMPLE@...:"), said
    assert "SeCr3t" not in said


def test_without_a_provider_an_s3_url_is_refused_with_or_without_a_connection_and_a_path_passes():
    """Without a provider Airflow has no filesystem for s3:// at all, a connection in the URL or not
    (``ObjectStoragePath("s3://bucket/x").fs`` raises "No filesystem registered for scheme s3" on 3.1.1 and
    3.3.2): refused before the task does anything, naming the extra; a local path needs nothing."""
    said = airflow_says(
        ["check", "s3://bucket/prefix", "destination"],
        ["check", "/backups/nightly", "destination"],
        ["check", "file:///backups/nightly", "root"],
    )
    assert said[0].startswith(
        "ValueError: destination s3://...: Airflow reads it through apache-airflow-providers-amazon"
    ), said
    assert "[s3]" in said[0] and "bucket" not in said[0], said
    assert said[1:] == ["ok: /backups/nightly", "ok: file:///backups/nightly"]


def test_a_provider_that_registers_s3_lets_a_connection_through(stand_in):
    (said,) = airflow_says(["check", URL, "destination"], provider=stand_in)
    assert said == f"ok: {URL}"


def test_the_same_provider_with_its_filesystem_blocked_is_refused_as_missing(stand_in):
    """The blocking that stands for a missing provider acts on Airflow's discovery, not on our code."""
    (said,) = airflow_says(
        ["check", URL, "destination"], provider=stand_in, block=(*REAL_FILESYSTEMS, f"{STAND_IN}.fs")
    )
    assert said.startswith("ValueError: destination s3://my_conn@...: the connection needs"), said


def test_a_filesystem_attached_under_the_connection_lets_it_through_without_a_provider():
    """``attach("s3", conn_id=..., fs=...)``: Airflow hands that filesystem to the connection's paths."""
    (said,) = airflow_says(["check", URL, "destination"], attach=("s3", "my_conn"))
    assert said == f"ok: {URL}"


#: Each operator parameter that takes an ObjectStoragePath URL: (operator, its arguments, the parameter).
URL_PARAMETERS = [
    ("copy.PostgresCopyDataDirectoryOperator", {"source": "/nowhere", "destination": URL}, "destination"),
    ("backup.PostgresStoreBackupLabelOperator", {"backup": "finish", "destination": URL}, "destination"),
    ("lifecycle.PostgresBackupRetentionOperator", {"root": URL, "keep_last": 1}, "root"),
    (
        "lifecycle.PostgresBackupRetentionOperator",
        {"root": "/b", "wal_archive": URL, "keep_last": 1},
        "wal_archive",
    ),
]


def test_each_operator_with_an_object_store_url_fails_first_naming_its_parameter():
    """The task fails before it reads, copies or deletes anything, without a retry (the same render would
    fail again). One interpreter for all of them."""
    calls = [["execute", f"pg_safe_backup.operators.{op}", kwargs] for op, kwargs, _ in URL_PARAMETERS]
    for said, (operator, _, param) in zip(airflow_says(*calls), URL_PARAMETERS, strict=True):
        wanted = f"AirflowFailException: invalid rendered parameter: {param} s3://my_conn@...: the connection"
        assert said.startswith(wanted), (operator, said)
