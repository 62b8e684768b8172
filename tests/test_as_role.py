"""Tests run as the app's own roles, and row-level security (issue 18): ``pg.as_role`` and the marker's
``role=``, on every driver, in both isolation modes; the example project ``projects/rls``."""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("asyncpg")
pytest.importorskip("psycopg2")
pytest.importorskip("sqlalchemy")

PROJECT = Path(__file__).parent / "projects" / "rls"
EXAMPLE_TESTS = 6

# Each driver's connections, in both modes (one run: the isolation is the marker's, per parameter): opened
# before the block, during it (the app's own in database isolation), and after it
DRIVERS = """
    import asyncpg
    import psycopg
    import pytest
    from sqlalchemy import text

    from pgsandbox.errors import PgSandboxError

    TENANT_A = {"app.tenant_id": "a", "request.jwt.claims": {"sub": "u1", "role": "authenticated"}}
    SEEN = "SELECT current_user, (SELECT string_agg(name, ',' ORDER BY name) FROM items)"
    CLAIM = "SELECT current_setting('request.jwt.claims')::json->>'sub'"


    def in_each_mode():
        modes = ("transaction", "database")
        return pytest.mark.parametrize("mode", [pytest.param(m, marks=pytest.mark.pg(isolation=m)) for m in modes])


    @in_each_mode()
    def test_sync_drivers(pg, pg_psycopg2, pg_session, mode):
        login = pg.info.user
        cursor = pg_psycopg2.cursor()
        assert tuple(pg_session.execute(text(SEEN)).one()) == (login, "apple,banana")
        with pg.as_role("app_rw", settings=TENANT_A):
            cursor.execute(SEEN)
            assert cursor.fetchone() == ("app_rw", "apple")
            pg_psycopg2.rollback()  # the app's rollback: the role stays
            cursor.execute(CLAIM)
            assert cursor.fetchone() == ("u1",)
            assert tuple(pg_session.execute(text(SEEN)).one()) == ("app_rw", "apple")
            assert pg.fetchone(SEEN) == {"current_user": "app_rw", "string_agg": "apple"}
            if mode == "database":  # the app's own connection, opened during the block
                with psycopg.connect(pg.dsn) as own:
                    assert own.execute(SEEN).fetchone() == ("app_rw", "apple")
            with pg.as_role(None, settings={"app.tenant_id": "b"}):  # nested: the tests' own role
                cursor.execute(SEEN)
                assert cursor.fetchone() == (login, "apple,banana")
                if mode == "database":
                    with psycopg.connect(pg.dsn) as own:
                        assert own.execute(SEEN).fetchone() == (login, "apple,banana")
            cursor.execute(SEEN + ", current_setting('app.tenant_id')")
            assert cursor.fetchone() == ("app_rw", "apple", "a")  # the outer block's role and settings again
        cursor.execute(SEEN)
        assert cursor.fetchone() == (login, "apple,banana")
        assert pg.fetchval("SELECT current_setting('app.tenant_id', true)") in ("", None)
        assert tuple(pg_session.execute(text(SEEN)).one()) == (login, "apple,banana")
        if mode == "database":  # the defaults are gone too
            with psycopg.connect(pg.dsn) as own:
                assert own.execute(SEEN).fetchone() == (login, "apple,banana")


    @in_each_mode()
    async def test_async_drivers(pg, pg_asyncpg, pg_aconn, mode):
        with pytest.raises(PgSandboxError, match="async with"):
            with pg.as_role("app_rw"):
                pass
        async with pg.as_role("app_rw", settings=TENANT_A):
            assert tuple(await pg_asyncpg.fetchrow(SEEN)) == ("app_rw", "apple")
            assert await pg_asyncpg.fetchval(CLAIM) == "u1"
            assert await (await pg_aconn.execute(SEEN)).fetchone() == ("app_rw", "apple")
            if mode == "database":
                own = await asyncpg.connect(pg.database_url)
                assert tuple(await own.fetchrow(SEEN)) == ("app_rw", "apple")
                await own.close()
        assert (await pg_asyncpg.fetchrow(SEEN))[0] == pg.info.user
        with pytest.raises(asyncpg.exceptions.InsufficientPrivilegeError) as refused:
            async with pg.as_role("app_rw", settings=TENANT_A):
                await pg_asyncpg.execute("INSERT INTO audit (note) VALUES ('x')")
        assert "GRANT SELECT, INSERT, UPDATE, DELETE ON audit TO app_rw" in "\\n".join(refused.value.__notes__)


    @pytest.mark.parametrize(
        "mode",
        [
            pytest.param(m, marks=pytest.mark.pg(isolation=m, async_driver=driver), id=f"{m}-{driver}")
            for m in ("transaction", "database")
            for driver in ("asyncpg", "psycopg")
        ],
    )
    async def test_async_sqlalchemy(pg, pg_async_session, mode):
        login = pg.info.user
        assert tuple((await pg_async_session.execute(text(SEEN))).one()) == (login, "apple,banana")
        async with pg.as_role("app_rw", settings=TENANT_A):
            assert tuple((await pg_async_session.execute(text(SEEN))).one()) == ("app_rw", "apple")
        assert tuple((await pg_async_session.execute(text(SEEN))).one()) == (login, "apple,banana")


    def test_a_connection_that_joins_during_the_block(pg, request):
        with pg.as_role("app_rw", settings=TENANT_A):
            joined = request.getfixturevalue("pg_psycopg2")
            cursor = joined.cursor()
            cursor.execute(SEEN)
            assert cursor.fetchone() == ("app_rw", "apple")
            pg.connection.rollback()  # psycopg's rollback: the role stays
            assert pg.fetchval(CLAIM) == "u1"
"""

# What a user gets wrong: each fails with what happened and what to do
MISTAKES = """
    import pytest

    from pgsandbox.errors import PgSandboxError, PgSandboxWarning


    @pytest.mark.pg(role="app_rw", role_settings={"app.tenant_id": "a"})
    def test_writes_the_audit_as_app_rw(pg_psycopg2):
        with pg_psycopg2.cursor() as cursor:
            cursor.execute("INSERT INTO audit (note) VALUES ('x')")


    @pytest.mark.pg(role="no_such_role")
    def test_an_unknown_role(pg):
        pass


    def test_a_superuser_is_refused(pg):
        with pytest.raises(PgSandboxError) as refused:
            with pg.as_role("postgres"):
                pass
        assert "is, or belongs to, a superuser" in str(refused.value)
        assert pg.fetchval("SELECT current_user") == pg.info.user


    def test_a_rollback_to_a_savepoint_from_before_the_block_is_said(pg):
        pg.execute("SAVEPOINT before_the_block")
        with pytest.warns(PgSandboxWarning, match="no longer ran as app_rw: a rollback to a savepoint made before"):
            with pg.as_role("app_rw"):
                pg.execute("ROLLBACK TO SAVEPOINT before_the_block")
"""


# Rows a module's fixture writes once as the app's role (scoped data)
SCOPED = """
    import pytest


    @pytest.fixture(scope="module", autouse=True)
    def apricot(pg_module):
        with pg_module.as_role("app_rw", settings={"app.tenant_id": "a"}):
            assert pg_module.fetchval("SELECT current_user") == "app_rw"
            pg_module.execute("INSERT INTO items (tenant_id, name) VALUES ('a', 'apricot')")


    def test_the_modules_row_was_written_as_tenant_a(pg):
        assert pg.fetchval("SELECT current_user") == pg.info.user
        assert pg.fetchval("SELECT string_agg(name, ',' ORDER BY name) FROM items") == "apple,apricot,banana"
"""


def rls_project(pytester: pytest.Pytester) -> None:
    shutil.copytree(PROJECT, pytester.path, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))


@pytest.mark.slow
def test_the_rls_example_and_every_driver_run_as_the_apps_role(pytester: pytest.Pytester, shared_dsn: str) -> None:
    rls_project(pytester)
    (pytester.path / "test_rls_drivers.py").write_text(textwrap.dedent(DRIVERS))
    (pytester.path / "test_rls_mistakes.py").write_text(textwrap.dedent(MISTAKES))
    (pytester.path / "test_rls_scoped.py").write_text(textwrap.dedent(SCOPED))
    result = pytester.runpytest(
        f"--pg-dsn={shared_dsn}", "-p", "no:randomly", "-W", "error::pgsandbox.errors.PgSandboxWarning"
    )
    result.assert_outcomes(passed=EXAMPLE_TESTS + 9 + 2 + 1, failed=1, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*- pgsandbox: permission denied -*",
            "pgsandbox: as role app_rw (settings: app.tenant_id = 'a'): permission denied for table audit.",
            "  app_rw has no privilege on audit; it lacks SELECT, INSERT, UPDATE, DELETE.",
            "  The grant the migrations may lack (only what the app needs): GRANT SELECT, INSERT, UPDATE, DELETE ON "
            "audit TO app_rw.",
        ]
    )
    result.stdout.fnmatch_lines(["*role 'no_such_role' does not exist on the server. Roles that exist: *app_rw*"])


@pytest.mark.slow
def test_the_rls_example_fails_when_the_policy_is_dropped(pytester: pytest.Pytester, shared_dsn: str) -> None:
    rls_project(pytester)
    (pytester.path / "migrations" / "2_drop_policy.sql").write_text("DROP POLICY tenant_isolation ON items;\n")
    result = pytester.runpytest(f"--pg-dsn={shared_dsn}", "-p", "no:randomly", "test_rls_tenants.py")
    result.assert_outcomes(failed=EXAMPLE_TESTS)
    result.stdout.fnmatch_lines(["*No row-level security policy of items applies to app_rw*"])


# -- the fast tier: the statements, the values, the errors ------------------------------------------------------
def test_the_statements_that_set_and_leave_a_role() -> None:
    from pgsandbox.isolation.roles import RoleBlock, role_sql

    block = RoleBlock('app"rw', (("app.tenant_id", "o'brien"),))
    assert role_sql(block, local=True) == (
        "/* pgsandbox */ SELECT set_config('role', 'app\"rw', true), set_config('app.tenant_id', 'o''brien', true)"
    )
    assert role_sql(None, local=False, clear=["app.tenant_id"], check=True) == (
        "/* pgsandbox */ SELECT current_user, set_config('role', 'none', false), set_config('app.tenant_id', '', false)"
    )


def test_settings_are_text_or_json() -> None:
    from pgsandbox.errors import ConfigError
    from pgsandbox.isolation.roles import block_of

    block = block_of("authenticated", {"request.jwt.claims": {"sub": "u1"}, "app.n": 3, "app.s": "a", "app.x": None})
    assert dict(block.settings) == {"request.jwt.claims": '{"sub": "u1"}', "app.n": "3", "app.s": "a", "app.x": ""}
    assert block.describe() == (
        "role authenticated (settings: request.jwt.claims = '{\"sub\": \"u1\"}', app.n = '3', app.s = 'a', app.x = '')"
    )
    cases: list[tuple[str, Any, str]] = [
        ("", None, "the role must be a role's name"),
        ("app_rw", ["app.tenant_id"], "settings must be a dict"),
        ("app_rw", {"app.when": object()}, "cannot be written as JSON"),
    ]
    for role, settings, said in cases:
        with pytest.raises(ConfigError, match=said) as refused:
            block_of(role, settings)
        assert "What to do: " in str(refused.value)


def test_a_permission_denied_is_found_in_every_drivers_error() -> None:
    import asyncpg
    import psycopg
    import sqlalchemy.exc

    from pgsandbox.sandbox.app_roles import denial_of

    message = "permission denied for table audit"
    psycopg_error = psycopg.errors.InsufficientPrivilege(message)
    for error in [
        psycopg_error,  # psycopg2's has its pgcode only from a server: the pytester run above has one
        asyncpg.exceptions.InsufficientPrivilegeError(message),
        sqlalchemy.exc.ProgrammingError("INSERT INTO audit ...", {}, psycopg_error),
    ]:
        assert denial_of(error) == message, type(error)
    assert denial_of(psycopg.errors.UniqueViolation("duplicate key")) is None
    assert denial_of(None) is None


def test_the_markers_role_is_checked() -> None:
    from pgsandbox.pytest.markers import role_value

    assert role_value("role", "app_rw") == "app_rw"
    assert role_value("role_settings", {"app.tenant_id": "a"}) == {"app.tenant_id": "a"}
    with pytest.raises(pytest.fail.Exception, match=r"(?s)role=3\): expected the name of a role.*What to do"):
        role_value("role", 3)
    with pytest.raises(pytest.fail.Exception, match=r"(?s)expected a dict of setting names.*What to do"):
        role_value("role_settings", "app.tenant_id=a")
