"""The hook's sessions take their connection arguments from PostgresHook: the connection's extras reach
libpq, and its IAM token paths (AWS, Azure) are PostgresHook's own."""

from __future__ import annotations

import asyncio
import json
from urllib.parse import quote

import pytest

from pg_safe_backup.hooks.backup import BackupError, PostgresBackupHook
from pg_safe_backup.local_cluster import SERVER_USER, LocalCluster

from conftest import PASSWORD

EXTRAS = {
    "sslmode": "disable",
    "connect_timeout": "7",
    "application_name": "nightly backups",
    "options": "-c work_mem=1234kB",
    "cursor": "dictcursor",  # PostgresHook's row format: our sessions keep reading tuples
}


def register(
    monkeypatch: pytest.MonkeyPatch, cluster: LocalCluster, conn_id: str, extra: dict[str, str]
) -> None:
    """Register ``conn_id`` (type postgres, the test password) with ``extra`` as its extra field."""
    monkeypatch.setenv(
        f"AIRFLOW_CONN_{conn_id.upper()}",
        json.dumps(
            {
                "conn_type": "postgres",
                "host": "127.0.0.1",
                "port": cluster.port,
                "login": SERVER_USER,
                "password": PASSWORD,
                "schema": "postgres",
                "extra": extra,
            }
        ),
    )


async def session_facts(hook: PostgresBackupHook) -> dict[str, object]:
    """What libpq and the server say about a session the hook opens (no purpose: its own name stays)."""
    async with hook.connect() as conn:
        params = conn.info.get_parameters()
        cur = await conn.execute(
            "SELECT current_setting('work_mem'), current_setting('search_path'),"
            " (SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid())"
        )
        row = await cur.fetchone()
        return {
            "sslmode": params.get("sslmode"),
            "connect_timeout": params.get("connect_timeout"),
            "application_name": conn.info.parameter_status("application_name"),
            "row": row,
        }


def test_a_connection_s_extras_reach_libpq(cluster, monkeypatch):
    register(monkeypatch, cluster, "pg_extras", EXTRAS)
    facts = asyncio.run(session_facts(PostgresBackupHook("pg_extras")))
    assert facts["sslmode"] == "disable"
    assert facts["connect_timeout"] == "7"
    assert facts["application_name"] == "nightly backups"
    assert facts["row"] == ("1234kB", "pg_catalog,pg_temp", False)


@pytest.mark.parametrize(
    "extra, names",
    [
        # PostgresHook.get_aws_iam_token: the amazon provider is not installed here
        ({"iam": "true"}, "apache-airflow-providers-amazon"),
        # PostgresHook.get_azure_iam_token looks up the Azure connection
        ({"iam": "true", "azure_conn_id": "pg_no_azure"}, "pg_no_azure"),
    ],
)
def test_iam_tokens_come_from_postgres_hook(cluster, monkeypatch, extra, names):
    register(monkeypatch, cluster, "pg_iam", extra)
    with pytest.raises(BackupError) as err:
        asyncio.run(session_facts(PostgresBackupHook("pg_iam")))
    assert "postgres_conn_id 'pg_iam'" in str(err.value)
    assert names in str(err.value)
    assert PASSWORD not in str(err.value)
    assert quote(PASSWORD, safe="") not in str(err.value)


def test_a_missing_connection_is_named(monkeypatch):
    monkeypatch.delenv("AIRFLOW_CONN_PG_NOWHERE", raising=False)
    with pytest.raises(BackupError) as err:
        asyncio.run(session_facts(PostgresBackupHook("pg_nowhere")))
    assert str(err.value) == (
        "postgres_conn_id 'pg_nowhere': no such Airflow connection; create it (type postgres)"
    )
