"""Schema isolation (pg_isolation = schema) on a server where the tests' role may not create databases: a role
with only CONNECT and CREATE on one database (no CREATEDB, not a superuser, no CREATEROLE) on the shared server."""

from __future__ import annotations

import json
import secrets
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from conftest import USERS, USERS_SEED
from pgsandbox import Sandbox, Settings
from pgsandbox.common.urls import libpq_env, sqlalchemy_url
from pgsandbox.server import reaper
from pgsandbox.template import load_migrators
from pgsandbox.template.base import MigrationError, Migrator


@dataclass
class Restricted:
    dsn: str
    dbname: str
    admin: psycopg.Connection[Any]  # the superuser, on that database

    def schemas(self) -> list[str]:
        rows = self.admin.execute("select nspname from pg_namespace where nspname like 'pgsandbox\\_%'").fetchall()
        return [str(name) for (name,) in rows]


@pytest.fixture(scope="module")
def restricted(shared_dsn: str) -> Iterator[Restricted]:
    """A database and a role that may only connect to it and create schemas in it (and, as on PostgreSQL 14
    and before, create in public: so that a migration's public.x is made and then refused)."""
    suffix = secrets.token_hex(4)
    role, dbname, password = f"ci_{suffix}", f"ci_{suffix}", secrets.token_hex(12)
    with psycopg.connect(shared_dsn, autocommit=True) as server:
        server.execute(
            sql.SQL("CREATE ROLE {} LOGIN NOCREATEDB NOCREATEROLE NOSUPERUSER PASSWORD {}").format(
                sql.Identifier(role), sql.Literal(password)
            )
        )
        server.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
        server.execute(
            sql.SQL("GRANT CONNECT, CREATE ON DATABASE {} TO {}").format(*map(sql.Identifier, (dbname, role)))
        )
        base = shared_dsn.rsplit("/", 1)[0]
        with psycopg.connect(f"{base}/{dbname}", autocommit=True) as admin:
            admin.execute(sql.SQL("GRANT CREATE ON SCHEMA public TO {}").format(sql.Identifier(role)))
            user_dsn = f"postgresql://{role}:{password}@{base.rsplit('@', 1)[1]}/{dbname}"
            yield Restricted(user_dsn, dbname, admin)
        server.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(dbname)))
        server.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_the_search_path_travels_in_every_form_of_the_url() -> None:
    params = {"host": "db", "port": 5432, "user": "ci", "dbname": "ci", "options": "-csearch_path=s,public"}
    assert sqlalchemy_url(params, "psycopg").endswith("/ci?options=-csearch_path%3Ds%2Cpublic")
    assert sqlalchemy_url(params, "postgresql").endswith("/ci?options=-csearch_path%3Ds%2Cpublic")
    assert "options" not in sqlalchemy_url(params, "asyncpg")  # SQLAlchemy would pass it to asyncpg.connect()
    assert libpq_env(params)["PGOPTIONS"] == "-csearch_path=s,public"


PROJECT_TESTS = """
import psycopg
import pytest


def test_a_write(pg):
    pg.execute("insert into users (name) values ('cy')")
    assert pg.fetchval("select count(*) from users") == 3
    assert pg.fetchval("select current_schema()").startswith("pgsandbox_")


def test_b_does_not_see_the_write_of_a(pg):
    assert pg.fetchval("select count(*) from users") == 2
    assert pg.isolation == "transaction"  # per test, it is one


def test_c_every_connection_is_in_the_schema(pg, pg_psycopg2):
    with psycopg.connect(pg.dsn) as conn:
        assert conn.execute("select count(*) from users").fetchone()[0] == 2
    with psycopg.connect(pg.database_url) as conn:
        assert conn.execute("select current_schema()").fetchone()[0] == pg.fetchval("select current_schema()")
    assert "search_path=pgsandbox_" in pg.env["PGOPTIONS"]
    with pg_psycopg2.cursor() as cursor:
        cursor.execute("insert into users (name) values ('dee') returning id")
    assert pg.fetchval("select count(*) from users") == 2  # its own transaction, rolled back after the test


def test_d_the_role_may_not_create_databases(pg):
    with psycopg.connect(pg.dsn, autocommit=True) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("create database nope")


@pytest.mark.pg(isolation="database")
def test_e_database_isolation_is_refused(pg):
    pass


def test_f_a_raw_commit_is_caught_and_the_schema_migrated_again(pg):
    pg.execute("insert into users (name) values ('escaped')")
    pg.execute("commit")


class TestScopedData:
    @pytest.fixture(scope="class")
    @classmethod
    def class_row(cls, pg_class):
        pg_class.execute("insert into users (name) values ('class')")

    def test_h_scoped_data_is_there_and_rolled_back_with_each_test(self, class_row, pg):
        assert pg.fetchval("select count(*) from users") == 3
        pg.execute("delete from users")

    def test_i_scoped_data_survives_the_previous_test(self, class_row, pg):
        assert pg.fetchval("select count(*) from users") == 3


def test_k_pg_login_has_a_schema_of_its_own(pg_login, pg):
    with psycopg.connect(pg_login.dsn) as conn:
        assert conn.execute("select current_schema()").fetchone()[0].endswith("_login")
        conn.execute("insert into users (name) values ('session-wide')")
    assert pg.fetchval("select count(*) from users") == 2


@pytest.mark.pg(keep_failed=True)
def test_j_fails_and_is_not_kept(pg):
    assert False


def test_g_starts_clean_after_the_escape(pg):
    assert pg.fetchval("select count(*) from users") == 2
    assert pg.fetchval("show statement_timeout") == "5min"  # the tests' timeouts survive the schema's rebuild
    assert pg.insert("users")["id"] > 2  # the data factories read the session schema's catalog
"""


@pytest.mark.slow
def test_schema_isolation_on_a_role_with_only_create_on_one_database(
    pytester: pytest.Pytester, restricted: Restricted
) -> None:
    (pytester.path / "migrations").mkdir()
    (pytester.path / "migrations/1.sql").write_text(USERS + USERS_SEED)
    pytester.makefile(
        ".toml",
        pyproject='[tool.pytest.ini_options]\npg_migrations = ["sql:migrations"]\npg_isolation = "schema"\n',
    )
    pytester.makepyfile(test_app=PROJECT_TESTS)
    result = pytester.runpytest("-p", "no:cacheprovider", "-p", "no:randomly", "--pg-dsn", restricted.dsn)
    output = result.stdout.str()
    result.assert_outcomes(passed=9, failed=1, errors=2)  # test_f passes, its teardown reports the escape
    assert "test_e_database_isolation_is_refused" in output
    assert "database isolation clones a database per test, and this session runs in schema isolation" in output
    assert "test_f_a_raw_commit_is_caught" in output
    assert "pgsandbox migrated the session's schema again: the next test starts clean" in output
    assert "users (+1 row, 1 row written)" in output
    assert "for code that opens its own connections, give them the test's connection" in output
    assert "schema isolation: migrated the session's schema pgsandbox_" in output
    assert "test_j_fails_and_is_not_kept failed, but its data was not kept (keep_failed): in schema isolation" in output
    assert "kept as" not in output
    assert restricted.schemas() == []  # dropped at the end of the run


REFUSED = """
create table users (id serial primary key);
create table public.leak (id int);
create extension citext;
"""


@pytest.mark.slow
def test_a_migration_that_reaches_outside_the_schema_is_refused(restricted: Restricted, tmp_path: Path) -> None:
    (tmp_path / "migrations").mkdir()
    (tmp_path / "migrations/1.sql").write_text(REFUSED)
    settings = Settings(dsn=restricted.dsn, isolation="schema", migrations=("sql:migrations",))
    with pytest.raises(MigrationError) as error:
        Sandbox.start(settings, root=tmp_path)
    message = str(error.value)
    assert (
        "schema isolation cannot copy what the migrations (sql:migrations) made outside the session's schema" in message
    )
    assert "extension citext; table public.leak." in message
    assert "what they made outside it stays (pgsandbox drops only what it named): drop it" in message
    assert "What to do: leave the schema out of the migrations' names (create table x, not public.x)" in message
    assert restricted.schemas() == []
    left = restricted.admin.execute("select to_regclass('public.leak') is not null").fetchone()
    assert left == (True,)
    restricted.admin.execute("drop table public.leak")


@pytest.mark.slow
def test_an_xdist_worker_migrates_a_schema_of_its_own(restricted: Restricted, tmp_path: Path) -> None:
    (tmp_path / "migrations").mkdir()
    (tmp_path / "migrations/1.sql").write_text(USERS + USERS_SEED)
    settings = Settings(dsn=restricted.dsn, isolation="schema", migrations=("sql:migrations",))
    with Sandbox.start(settings, root=tmp_path) as controller:
        migrators: tuple[list[Migrator], list[Migrator]] = (load_migrators(settings.migrations, (), tmp_path), [])
        with Sandbox.attach(controller.handoff(), settings, migrators=migrators) as worker:
            assert controller.schema is not None and worker.schema is not None
            assert worker.schema.name != controller.schema.name
            with worker.database(test_id="on the worker") as db:
                assert db.fetchval("select current_schema()") == worker.schema.name
                assert db.fetchval("select count(*) from users") == 2
            assert len(restricted.schemas()) == 2
        assert restricted.schemas() == [controller.schema.name]
    assert restricted.schemas() == []


@pytest.mark.slow
def test_the_schema_of_a_run_that_died_is_reaped(restricted: Restricted) -> None:
    label = json.dumps({"pgsandbox_run": "deadbeef", "started": 1})
    restricted.admin.execute("create schema pgsandbox_deadbeef_schema")
    restricted.admin.execute(sql.SQL("comment on schema pgsandbox_deadbeef_schema is {}").format(sql.Literal(label)))
    restricted.admin.execute("create table pgsandbox_deadbeef_schema.users (id int)")
    dead = [run for run in reaper.stale_runs(restricted.admin, 60) if run.run_id == "deadbeef"]
    assert [run.schemas for run in dead] == [["pgsandbox_deadbeef_schema"]]
    assert reaper.drop_dead_runs(restricted.admin, dead) == ["pgsandbox_deadbeef_schema"]
    assert restricted.schemas() == []


@pytest.mark.slow
def test_an_alembic_app_on_asyncpg_migrates_into_the_schema(pytester: pytest.Pytester, restricted: Restricted) -> None:
    """A real project's shape: Alembic with an async env.py that swaps pgsandbox's URL to asyncpg (so SQLAlchemy's
    asyncpg dialect gets the URL's options) on a role that may not read pg_statistic (the build's check that the
    migration changed something reads the catalogs it may)."""
    from test_alembic_app import ASYNCPG_ENV, MATCH_TEST, alembic_init, write, write_app  # skips without Alembic

    app = "shop_in_a_schema"
    write_app(pytester, app, "alembic:alembic.ini")
    alembic_init(pytester, app, "async").write_text(textwrap.dedent(ASYNCPG_ENV).format(app=app))
    write(pytester.path, {"test_match.py": MATCH_TEST.format(app=app)})
    pyproject = pytester.path / "pyproject.toml"
    pyproject.write_text(pyproject.read_text() + 'pg_isolation = "schema"\n')
    result = pytester.runpytest("-p", "no:cacheprovider", f"--pg-dsn={restricted.dsn}")
    result.assert_outcomes(passed=2)  # the tables are in the session's schema, and match the models
    assert restricted.schemas() == []
