"""The connection fence (issue 18): while pgsandbox's session runs, tests and migrations reach only the sandbox's
server. A second real server ("prod") must not be reached; the shared server is the sandbox (``--pg-dsn``)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from pgsandbox import LocalServer, Settings

pytestmark = pytest.mark.slow  # every test here starts a server or a process

PROJECTS = Path(__file__).parent / "projects"
FAKE_PASSWORD = "s3cret-prod-pw"


@pytest.fixture(scope="module")
def prod() -> Iterator[LocalServer]:
    """The server tests must not reach: a second real server on another port (one for the module's tests)."""
    server = LocalServer.start(Settings(cache=Path(os.environ["PGSANDBOX_CACHE"]), listen="127.0.0.1", sql_log="off"))
    yield server
    server.stop()


def prod_url(prod: LocalServer, dbname: str = "proddb") -> str:
    assert prod.tcp is not None
    return f"postgresql://app:{FAKE_PASSWORD}@127.0.0.1:{prod.tcp[1]}/{dbname}"


FENCED_TESTS = """
import asyncio
import os

import psycopg
import psycopg2
import pytest

from pgsandbox import ConnectionFenced, PgSandboxWarning

PROD_URL = os.environ["PROD_URL"]
PROD_DSN = os.environ["PROD_DSN"]  # the admin's, naming its passfile: a connection that is let through works
PROD_TCP = os.environ["PROD_TCP"]


def test_refused_with_the_message():
    psycopg.connect(PROD_URL)


def test_every_library_refused_with_its_own_error():
    import asyncpg
    import sqlalchemy

    with pytest.raises(psycopg.OperationalError) as sync:
        psycopg.connect(PROD_URL)
    with pytest.raises(psycopg.OperationalError) as aio:
        asyncio.run(psycopg.AsyncConnection.connect(PROD_URL))
    with pytest.raises(psycopg2.OperationalError) as old:
        psycopg2.connect(PROD_URL)
    with pytest.raises(ConnectionRefusedError) as apg:
        asyncio.run(asyncpg.connect(PROD_URL))
    with pytest.raises(sqlalchemy.exc.OperationalError) as alchemy:
        sqlalchemy.create_engine(PROD_URL.replace("postgresql:", "postgresql+psycopg:")).connect()
    for error in (sync.value, aio.value, old.value, apg.value, alchemy.value.orig):
        assert isinstance(error, ConnectionFenced), error
        assert error.test.endswith("test_every_library_refused_with_its_own_error")


def test_libpq_environment_is_resolved_too(monkeypatch):
    host, _, port = PROD_TCP.rpartition(":")
    monkeypatch.setenv("PGHOST", host)
    monkeypatch.setenv("PGPORT", port)
    with pytest.raises(ConnectionFenced, match=f"on {PROD_TCP} as "):
        psycopg.connect("dbname=proddb")


@pytest.mark.pg(fence_allow=[PROD_TCP])
def test_allowed_by_the_marker():
    with psycopg.connect(PROD_DSN) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


@pytest.mark.pg(fence="warn")
def test_warn_mode_lets_it_through():
    with pytest.warns(PgSandboxWarning, match="connection fence refused a connection"):
        with psycopg.connect(PROD_DSN) as conn:
            conn.execute("select 1")


def test_allowed_by_the_option_through_the_socket():
    with psycopg.connect(os.environ["PROD_SOCKET_DSN"]) as conn:  # pg_fence_allow = <socket directory>:<port>
        assert conn.execute("select 1").fetchone() == (1,)


def test_the_sandbox_and_its_environment(pg):
    with psycopg.connect(pg.dsn) as conn:
        assert conn.execute("select current_database()").fetchone() == (pg.name,)
    assert os.environ["PGDATABASE"] == pg.name
    assert os.environ["DATABASE_URL"] == pg.database_url  # pg_env_url = DATABASE_URL
    with psycopg.connect("") as conn:  # the libpq environment alone: the test's database
        assert conn.execute("select current_database()").fetchone() == (pg.name,)


def test_no_database_outside_a_test_that_has_one():
    assert "PGDATABASE" not in os.environ and "DATABASE_URL" not in os.environ
    assert os.environ["PGPORT"] != PROD_TCP.rpartition(":")[2]
"""


def test_fence_under_xdist(
    pytester: pytest.Pytester, shared_dsn: str, prod: LocalServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Refused through each library with its own error (the message checked), allowed by the marker and the option,
    warned, and the sandbox with its libpq environment, in xdist workers."""
    assert prod.tcp is not None
    socket_dir = prod.admin_dsn.split("host=")[1].split()[0]
    pytester.makefile(
        ".ini",
        pytest=f"[pytest]\npg_fence_allow = {socket_dir}:{prod.tcp[1]}\npg_env_url = DATABASE_URL\n",
    )
    pytester.makepyfile(test_fenced=FENCED_TESTS)
    monkeypatch.setenv("PROD_URL", prod_url(prod))
    monkeypatch.setenv("PROD_DSN", prod.dsn)
    monkeypatch.setenv("PROD_TCP", f"127.0.0.1:{prod.tcp[1]}")
    monkeypatch.setenv("PROD_SOCKET_DSN", prod.admin_dsn)
    monkeypatch.setenv("DATABASE_URL", prod_url(prod, "from-the-shell"))
    result = pytester.runpytest("-n", "2", f"--pg-dsn={shared_dsn}")
    result.assert_outcomes(passed=7, failed=1)
    port = prod.tcp[1]
    result.stdout.fnmatch_lines(
        [
            "*ConnectionFenced: pgsandbox's connection fence refused a connection through psycopg to database "
            f"'proddb' on 127.0.0.1:{port} as app, made by the test test_fenced.py::test_refused_with_the_message. "
            "While pgsandbox's session runs, tests and migrations may reach only the sandbox's server (*",
            f"*What to do: *pg_fence_allow = 127.0.0.1:{port} *@pytest.mark.pg(fence_allow=?'127.0.0.1:{port}'?)*"
            "pg_fence = off turns the fence off.",
        ]
    )
    assert FAKE_PASSWORD not in result.stdout.str()


def test_an_app_whose_settings_point_at_prod(
    pytester: pytest.Pytester, shared_dsn: str, prod: LocalServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """tests/projects/fence_app: its settings read DATABASE_URL, which the shell points at production. Its engine
    made at import is refused (at import: a collection error; in a fixture: the test's error), a test that reads the
    setting when it runs gets its own database (pg_env_url), and a migration that connects by the setting is
    refused too, and production is never reached."""
    assert prod.tcp is not None
    shutil.copytree(PROJECTS / "fence_app", pytester.path, dirs_exist_ok=True)
    monkeypatch.setenv("DATABASE_URL", prod_url(prod, "shop"))
    result = pytester.runpytest(f"--pg-dsn={shared_dsn}", "--continue-on-collection-errors")
    result.assert_outcomes(passed=1, errors=2)
    port = prod.tcp[1]
    result.stdout.fnmatch_lines_random(
        [
            "ERROR tests/test_warmup.py - sqlalchemy.exc.OperationalError: (pgsandbox*",
            "ERROR tests/test_orders.py::test_counts_orders_through_the_settings_engine - *",
            "E * sqlalchemy.exc.OperationalError: (pgsandbox.isolation.fence.ConnectionFenced) pgsandbox's *",
            f"*refused a connection through psycopg to database 'shop' on 127.0.0.1:{port} as app, made by code "
            "running outside any test (an import while pytest collected, a session fixture, a migration).*",
            f"*refused a connection through psycopg to database 'shop' on 127.0.0.1:{port} as app, made by the test "
            "tests/test_orders.py::test_counts_orders_through_the_settings_engine.*",
        ]
    )
    assert FAKE_PASSWORD not in result.stdout.str()

    result = pytester.runpytest(
        f"--pg-dsn={shared_dsn}", "--pg-migrations=python:app.migrate:migrate", "tests/test_orders.py"
    )
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines(
        [
            f"*python:app.migrate:migrate tried to connect to database 'shop' on 127.0.0.1:{port} as app through "
            "psycopg while pgsandbox was building the template *"
        ]
    )
    assert FAKE_PASSWORD not in result.stdout.str()
    with prod.connect() as conn:  # production saw none of it: no connection ever authenticated as app
        assert conn.execute("select count(*) from pg_roles where rolname = 'app'").fetchone() == (0,)
