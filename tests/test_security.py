"""A less-privileged role that can create objects in ``public`` must not get code run with the rights of
the backup (a superuser here): not through operators or functions planted on the search_path, not
through the table's trigger functions, and not through a function it created under their name."""

from __future__ import annotations

import asyncio

import psycopg
import pytest

from pg_safe_backup.session import COMPLETE, FAILED, hold_backup

from backup_helpers import backup_row, backup_starts, finish, req, started

ROLE = "mallory"

# Every payload leaves a trace (the planted code ran), then tries to make its owner superuser: it
# succeeds exactly when it runs with a superuser's rights.
PAYLOAD = f"""
CREATE FUNCTION public.payload(what text) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO public.trace VALUES (what, current_user);
  BEGIN
    EXECUTE 'ALTER ROLE {ROLE} SUPERUSER';
  EXCEPTION WHEN insufficient_privilege THEN NULL;
  END;
END $$
"""

# Operators and functions that match our statements' argument types better than pg_catalog's do.
PLANTED = [
    # TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME is name || unknown: name || name is an exact match.
    """CREATE FUNCTION public.evil_cat(name, name) RETURNS text LANGUAGE plpgsql AS $$
       BEGIN PERFORM public.payload('||'); RETURN $1::text || $2::text; END $$""",
    "CREATE OPERATOR public.|| (LEFTARG = name, RIGHTARG = name, FUNCTION = public.evil_cat)",
    # IS DISTINCT FROM on the state column looks up = (backup_state, backup_state).
    """CREATE FUNCTION public.evil_eq(public.backup_state, public.backup_state) RETURNS boolean
       LANGUAGE plpgsql AS $$ BEGIN PERFORM public.payload('='); RETURN $1::text = $2::text; END $$""",
    "CREATE OPERATOR public.= (LEFTARG = public.backup_state, RIGHTARG = public.backup_state,"
    " FUNCTION = public.evil_eq)",
    # pg_advisory_xact_lock(hashtext(...)): hashtext returns integer; pg_catalog has only (bigint).
    """CREATE FUNCTION public.pg_advisory_xact_lock(integer) RETURNS void LANGUAGE plpgsql AS $$
       BEGIN PERFORM public.payload('advisory lock'); END $$""",
]


@pytest.fixture
def mallory(cluster):
    """A login role with CREATE on public (every role has it on PostgreSQL 12-14) and a trace table."""
    for stmt in (
        f"CREATE ROLE {ROLE} LOGIN",
        f"GRANT CREATE, USAGE ON SCHEMA public TO {ROLE}",
        "CREATE TABLE public.trace (what text, run_as text)",
        "GRANT INSERT ON public.trace TO PUBLIC",
    ):
        cluster.sql(stmt)

    def plant(*statements: str) -> None:
        with psycopg.connect(**{**cluster.conninfo(), "user": ROLE}, autocommit=True) as conn:
            for stmt in statements:
                conn.execute(stmt)

    plant(PAYLOAD)
    return plant


def traces(cluster) -> list[tuple]:
    return cluster.sql("SELECT what, run_as FROM public.trace")


def is_superuser(cluster) -> bool:
    return cluster.sql("SELECT rolsuper FROM pg_roles WHERE rolname = %s", [ROLE])[0][0]


def test_planted_operators_and_functions_never_run(hook, cluster, mallory):
    async def create_table():
        async with hook.connect() as conn:
            await hook.ensure_table(conn)

    asyncio.run(create_table())  # the enum type must exist for the planted = operator
    mallory(*PLANTED)

    async def go():
        holder, opened = await started(hook, req())
        # The old post-script, in a plain session with the default search_path ("$user", public), fires
        # the table's trigger functions: they must not find the planted operators either.
        await asyncio.to_thread(cluster.sql, "UPDATE backup SET state = 'done'")
        done = await finish(hook)
        return opened, done, await holder

    opened, done, held = asyncio.run(go())

    assert traces(cluster) == [], f"planted code ran: {sorted(set(traces(cluster)))}"
    assert not is_superuser(cluster)
    assert held["status"] == COMPLETE and done["status"] == COMPLETE, (held, done)
    r = backup_row(cluster)
    # The label is the one pg_backup_stop returned for this backup's start.
    assert r["state"] == "complete" and r["backup_label"] == done["backup"]["backup_label"]
    assert f"START WAL LOCATION: {opened['backup']['start_lsn']} " in r["backup_label"]
    assert backup_starts(cluster) == 1


@pytest.mark.parametrize("function", ["pg_safe_backup_notify", "pg_safe_backup_guard"])
def test_trigger_function_created_by_another_role_is_refused(hook, cluster, mallory, function):
    """A function the role created first under our name would keep its owner after CREATE OR REPLACE,
    who could then replace its body at any time: refused before backup mode, naming both."""
    mallory(
        f"CREATE FUNCTION public.{function}() RETURNS trigger LANGUAGE plpgsql AS $$"
        " BEGIN PERFORM public.payload('trigger function'); RETURN NEW; END $$"
    )
    # (On a main that accepts the function, the backup is held until its backup_timeout.)
    result = asyncio.run(asyncio.wait_for(hold_backup(hook, req(backup_timeout=10)), 60))
    assert result["status"] == FAILED, result
    message = result["message"]
    assert f'"public"."{function}"()' in message and f"owned by role {ROLE}" in message, message
    assert "postgres" in message, message  # the table's owner, who should own it
    assert backup_starts(cluster) == 0
    owner = cluster.sql("SELECT proowner::regrole::text FROM pg_proc WHERE proname = %s", [function])
    assert owner == [(ROLE,)]  # left as it was, for a DBA to look at
    assert traces(cluster) == [] and not is_superuser(cluster)


def test_trigger_functions_pin_search_path_and_are_not_executable_by_public(hook, cluster):
    async def create_table():
        async with hook.connect() as conn:
            await hook.ensure_table(conn)

    asyncio.run(create_table())
    found = cluster.sql(
        "SELECT proname, proconfig, has_function_privilege('public', oid, 'EXECUTE') FROM pg_proc"
        " WHERE proname LIKE 'pg_safe_backup_%' ORDER BY proname"
    )
    assert found == [
        ("pg_safe_backup_guard", ["search_path=pg_catalog, pg_temp"], False),
        ("pg_safe_backup_notify", ["search_path=pg_catalog, pg_temp"], False),
    ], found


def test_every_session_pins_search_path_and_outlives_the_role_s_timeouts(hook, cluster):
    """Gate and finish sessions too: a role's idle_session_timeout or statement_timeout must not end a finish
    waiting for a long archive wait, or a gate waiting for a spread checkpoint."""
    timeouts = ["statement_timeout", "idle_in_transaction_session_timeout"]
    if cluster.server_version() >= 140000:
        timeouts.append("idle_session_timeout")
    for name in timeouts:
        cluster.sql(f"ALTER ROLE postgres SET {name} = '500ms'")

    async def go(purpose: str) -> tuple[str, list[str]]:
        async with hook.connect(purpose) as conn:
            path = (await (await conn.execute("SHOW search_path")).fetchone())[0]
            settings = [(await (await conn.execute(f"SHOW {name}")).fetchone())[0] for name in timeouts]
            await asyncio.sleep(1.5)  # idle longer than the role allows
            await conn.execute("SELECT pg_sleep(0.8)")  # a statement longer than the role allows
            return path, settings

    for purpose in ("holder", "gate", "finish", "failure report"):
        path, settings = asyncio.run(go(purpose))
        assert path.replace(" ", "") == "pg_catalog,pg_temp", (purpose, path)
        assert settings == ["0"] * len(timeouts), (purpose, settings)
