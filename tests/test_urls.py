"""URLs that existing code can use (issue 13): the test project ``projects/urlapp`` (settings that parse host and
port out of DATABASE_URL, Alembic through ini interpolation, a worker process of the session, every client
library with every form) on the default local server, under pytest-xdist, and, failing, on a socket-only one."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # every test here starts a server or a process

pytest.importorskip("alembic")
pytest.importorskip("asyncpg")
pytest.importorskip("psycopg2")

PROJECT = Path(__file__).parent / "projects" / "urlapp"
PROJECT_TESTS = 13


def urlapp(pytester: pytest.Pytester) -> None:
    shutil.copytree(PROJECT, pytester.path, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))


def test_the_url_app_passes_on_the_default_local_server(pytester: pytest.Pytester) -> None:
    urlapp(pytester)
    result = pytester.runpytest("-p", "no:randomly")
    result.assert_outcomes(passed=PROJECT_TESTS)


def test_the_url_app_passes_under_xdist(pytester: pytest.Pytester) -> None:
    urlapp(pytester)
    # a worker's clients get the controller's TCP address, and its own admin connections the socket
    (pytester.path / "tests" / "test_worker_addresses.py").write_text(
        "def test_addresses(pg, pg_server):\n"
        "    assert pg_server.kind == 'external' and pg.params['host'] == pg_server.params['host'] == '127.0.0.1'\n"
        "    assert pg_server.admin.info.host.startswith('/')\n"
    )
    result = pytester.runpytest("-n", "2", "-p", "no:randomly")
    result.assert_outcomes(passed=PROJECT_TESTS + 1)


def test_the_url_app_fails_on_a_socket_only_server(pytester: pytest.Pytester) -> None:
    """What the old default gave: a socket directory in ``?host=%2F...``, which configparser refuses."""
    urlapp(pytester)
    result = pytester.runpytest("--pg-listen=none", "--pg-rebuild", "-p", "no:randomly")
    assert result.ret != 0
    result.stdout.fnmatch_lines(
        ["*python:urlapp.migrate:upgrade failed*InterpolationSyntaxError: '%' must be followed by '%' or '('*%2F*"]
    )


FRAMEWORK = """
import psycopg
import pytest
from psycopg import sql


@pytest.fixture(scope="session")
def framework_database(pg_login):
    # what a framework's test runner does with the DSN it is given: create its own test database, drop it after
    name = pg_login.dbname + "_fw"
    with pg_login.connect(autocommit=True) as conn:
        create = sql.SQL("CREATE DATABASE {} TEMPLATE {}")
        conn.execute(create.format(sql.Identifier(name), sql.Identifier(pg_login.dbname)))
    yield psycopg.conninfo.make_conninfo(pg_login.dsn, dbname=name)
    with pg_login.connect(autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


def test_the_framework_database_is_migrated_and_the_tests_role_owns_it(framework_database, pg, pg_server):
    with psycopg.connect(framework_database) as conn:
        assert conn.execute("select count(*) from users").fetchone() == (2,)
        owner = conn.execute("select pg_get_userbyid(datdba) from pg_database where datname = current_database()")
        assert owner.fetchone() == (pg.params["user"],)
    assert pg.params["user"] != pg_server.params["user"]
"""


def test_a_framework_makes_its_own_test_database_from_pg_login(project: pytest.Pytester, shared_dsn: str) -> None:
    project.makepyfile(test_framework=FRAMEWORK)
    result = project.runpytest(
        f"--pg-dsn={shared_dsn}", "--pg-role=createdb", "-W", "error::pgsandbox.errors.PgSandboxWarning"
    )
    result.assert_outcomes(passed=1)
