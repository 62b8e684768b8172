"""A migration that misses the template must not look like success; hooks and python: migrations read files,
run async and seed through the app's own code (a SQLAlchemy session)."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgsandbox import LocalServer

pytestmark = pytest.mark.slow  # every test here starts a server or a process

PROJECTS = Path(__file__).parent / "projects"


def write(root: Path, files: dict[str, str]) -> None:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(content))


@pytest.fixture
def real_database(shared: LocalServer) -> Iterator[str]:
    """The app's "real" database, on a server pgsandbox also builds on: it must stay untouched."""
    name = shared.create_database()
    yield name
    shared.drop_database(name)


def tables_in(server: LocalServer, dbname: str) -> list[str]:
    with server.connect(dbname) as conn:
        rows = conn.execute(
            "select relname from pg_class where relkind = 'r' and relnamespace = 'public'::regnamespace"
        )
        return sorted(row[0] for row in rows.fetchall())


def url_of(server: LocalServer, dbname: str, driver: str = "postgresql+psycopg") -> str:
    assert server.tcp is not None
    return f"{driver}://postgres:{server.reveal_password()}@127.0.0.1:{server.tcp[1]}/{dbname}"


# -- 1 and 2: an env.py that migrates the database the app's settings name ---------------------------------------
def test_an_env_py_that_ignores_pgsandbox_url_is_stopped_and_the_real_database_untouched(
    pytester: pytest.Pytester,
    shared: LocalServer,
    shared_dsn: str,
    real_database: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pytest.importorskip("alembic")
    shutil.copytree(PROJECTS / "alembic_app_settings", pytester.path, dirs_exist_ok=True)
    monkeypatch.setenv("APP_DATABASE_URL", url_of(shared, real_database))
    result = pytester.runpytest(f"--pg-dsn={shared_dsn}")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        [
            f"*alembic:alembic.ini tried to connect to database '{real_database}' on 127.0.0.1:{shared.tcp[1]} as "  # type: ignore[index]
            "postgres through SQLAlchemy (postgresql+psycopg) while pgsandbox was building the template pgsandbox_tpl_*"
            "pgsandbox refused the connection.",
            '*What to do: *in env.py, url = config.attributes.get("pgsandbox_url", <your setting>)*',
        ]
    )
    assert str(shared.reveal_password()) not in result.stdout.str()
    assert "cache miss, built in" not in result.stdout.str()
    assert tables_in(shared, real_database) == []  # not even alembic_version

    # the README's recipe: pgsandbox's URL wins, the app's setting is the fallback
    env = pytester.path / "migrations/env.py"
    env.write_text(
        env.read_text().replace(
            "create_engine(DATABASE_URL,",
            'create_engine(context.config.attributes.get("pgsandbox_url", DATABASE_URL),',
        )
    )
    fixed = pytester.runpytest(f"--pg-dsn={shared_dsn}")
    fixed.assert_outcomes(passed=1)
    fixed.stdout.fnmatch_lines(["*(alembic:alembic.ini): cache miss, built in*"])
    assert tables_in(shared, real_database) == []


def test_an_env_py_that_migrates_where_pgsandbox_cannot_see_is_stopped(
    pytester: pytest.Pytester, shared: LocalServer, shared_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection pgsandbox cannot see (another process here): the build changed nothing in the template, which
    an Alembic upgrade always does (its version table), so the run stops instead of every test failing."""
    pytest.importorskip("alembic")
    shutil.copytree(PROJECTS / "alembic_app_settings", pytester.path, dirs_exist_ok=True)
    scratch = shared.create_database()
    monkeypatch.setenv("APP_DATABASE_URL", url_of(shared, scratch, "postgresql"))
    (pytester.path / "migrations/env.py").write_text(
        textwrap.dedent(
            """
            import subprocess, sys
            from settings_app.settings import DATABASE_URL
            code = "import psycopg, sys; psycopg.connect(sys.argv[1], autocommit=True).execute('create table users ()')"
            subprocess.run([sys.executable, "-c", code, DATABASE_URL], check=True)
            """
        )
    )
    try:
        result = pytester.runpytest(f"--pg-dsn={shared_dsn}")
        result.assert_outcomes(errors=1)
        result.stdout.fnmatch_lines(
            [
                "*alembic:alembic.ini: `alembic upgrade head` finished, but the template pgsandbox_tpl_* is unchanged: "
                "no alembic_version table, nothing created. Its env.py most likely ignored the URL pgsandbox gave it*",
                '*What to do: let pgsandbox\'s URL win in env.py: url = config.attributes.get("pgsandbox_url",*',
            ]
        )
        assert tables_in(shared, scratch) == ["users"]  # where it went: pgsandbox could not prevent this one
    finally:
        shared.drop_database(scratch)


LIBRARIES = ["psycopg", "psycopg async", "psycopg2", "asyncpg", "sqlalchemy", "sqlalchemy asyncpg"]


def connect_with(library: str, url: str) -> None:
    """Connect to ``url`` (a postgresql:// URL) with ``library`` and close again."""
    import asyncio

    if library == "psycopg":
        psycopg.connect(url).close()
    elif library == "psycopg async":

        async def run() -> None:
            await (await psycopg.AsyncConnection.connect(url)).close()

        asyncio.run(run())
    elif library == "psycopg2":
        psycopg2 = pytest.importorskip("psycopg2")
        psycopg2.connect(url).close()
    elif library == "asyncpg":
        asyncpg = pytest.importorskip("asyncpg")

        async def run() -> None:
            await (await asyncpg.connect(url)).close()

        asyncio.run(run())
    elif library == "sqlalchemy":
        sqlalchemy = pytest.importorskip("sqlalchemy")
        engine = sqlalchemy.create_engine(url.replace("postgresql://", "postgresql+psycopg2://"))
        try:
            engine.connect().close()
        finally:
            engine.dispose()
    else:
        from sqlalchemy.ext.asyncio import create_async_engine

        async def run() -> None:
            engine = create_async_engine(url.replace("postgresql://", "postgresql+asyncpg://"))
            try:
                await (await engine.connect()).close()
            finally:
                await engine.dispose()

        asyncio.run(run())


@pytest.mark.parametrize("library", LIBRARIES)
def test_during_a_build_every_library_reaches_only_the_template(
    library: str, shared: LocalServer, real_database: str
) -> None:
    from pgsandbox.template import guard

    template = shared.create_database()
    try:
        with guard.only_template(template, "python:app.db:migrate") as refused:
            connect_with(library, url_of(shared, template, "postgresql"))  # the template: allowed
            with pytest.raises(guard.ForeignConnection) as caught:
                connect_with(library, url_of(shared, real_database, "postgresql"))
        message = str(caught.value)
        assert f"python:app.db:migrate tried to connect to database '{real_database}' on 127.0.0.1:" in message
        assert f"while pgsandbox was building the template {template}" in message
        assert "What to do: make the migration connect where pgsandbox points it" in message
        assert str(shared.reveal_password()) not in message
        assert refused == [caught.value]
        connect_with(library, url_of(shared, real_database, "postgresql"))  # after the build: anything goes
    finally:
        shared.drop_database(template)


IMPORTED_DURING_THE_BUILD = """
import asyncio, sys
from pgsandbox.template import guard

template, other = sys.argv[1:]
assert not {"sqlalchemy", "asyncpg", "psycopg2"} & set(sys.modules)  # the guard imports none of them
with guard.only_template(template.rpartition("/")[2], "hook:pytest_pgsandbox_migrate"):
    import asyncpg, psycopg2, sqlalchemy  # a migration that imports its libraries itself

    connects = {
        "sqlalchemy": lambda url: sqlalchemy.create_engine(url.replace("postgresql", "postgresql+psycopg")).connect(),
        "psycopg2": psycopg2.connect,
        "asyncpg": lambda url: asyncio.run(asyncpg.connect(url)),
    }
    for library, connect in connects.items():
        connect(template)
        try:
            connect(other)
            print(library, "connected")
        except guard.ForeignConnection:
            print(library, "refused")
psycopg2.connect(other).close()
print("after the build: connected")
"""


def test_libraries_imported_during_the_build_are_guarded_too(shared: LocalServer, real_database: str) -> None:
    pytest.importorskip("sqlalchemy")
    pytest.importorskip("asyncpg")
    pytest.importorskip("psycopg2")
    template = shared.create_database()
    try:
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                IMPORTED_DURING_THE_BUILD,
                url_of(shared, template, "postgresql"),
                url_of(shared, real_database, "postgresql"),
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    finally:
        shared.drop_database(template)
    assert out.splitlines() == [
        "sqlalchemy refused",
        "psycopg2 refused",
        "asyncpg refused",
        "after the build: connected",
    ]


def test_a_migration_that_swallows_the_refusal_still_fails(
    tmp_path: Path, shared: LocalServer, shared_dsn: str, real_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pgsandbox import Settings
    from pgsandbox.sandbox import Sandbox
    from pgsandbox.template import MigrationError
    from pgsandbox.template.python import CallableMigrator

    def migrate(conn: psycopg.Connection[Any]) -> None:
        conn.execute(f"create table t (x int) -- {tmp_path.name}")
        with contextlib.suppress(Exception):  # "best effort" code: would go on as if nothing happened
            psycopg.connect(url_of(shared, real_database, "postgresql")).execute("create table leaked ()")

    migrator = CallableMigrator("python:app.db:migrate", migrate, (), tmp_path)
    with pytest.raises(MigrationError, match=f"tried to connect to database '{real_database}'"):
        Sandbox.start(Settings(dsn=shared_dsn), migrations=[migrator], root=tmp_path).stop()
    assert tables_in(shared, real_database) == []


# -- 1: what legitimately changes nothing ---------------------------------------------------------------------
def test_a_migration_with_nothing_to_do_is_no_error(pytester: pytest.Pytester, shared_dsn: str) -> None:
    """An sql: file of comments only (a placeholder) and an Alembic project without revisions build silently; a
    hook that did nothing builds with a warning that says where its work may have gone."""
    write(
        pytester.path,
        {
            "pyproject.toml": '[tool.pytest.ini_options]\npg_migrations = ["sql:migrations"]\n',
            "migrations/1_placeholder.sql": f"-- nothing yet ({pytester.path.name})\n",
            "test_x.py": "def test_x(pg):\n    assert pg.fetchval('select 1') == 1\n",
        },
    )
    result = pytester.runpytest(f"--pg-dsn={shared_dsn}", "-W", "error::pgsandbox.errors.PgSandboxWarning")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*(sql:migrations): cache miss, built in*"])
    # a new Alembic project without revisions: `upgrade head` still creates its version table in the template
    write(
        pytester.path,
        {
            "pyproject.toml": '[tool.pytest.ini_options]\npg_migrations = ["alembic:alembic.ini"]\n',
            "alembic.ini": "[alembic]\nscript_location = %(here)s/alembic\n",
            "alembic/script.py.mako": f"# {pytester.path.name}\n",
            "alembic/versions/.keep": "",
            "alembic/env.py": """
                from alembic import context
                from sqlalchemy import engine_from_config, pool

                section = context.config.get_section(context.config.config_ini_section)
                with engine_from_config(section, prefix="sqlalchemy.", poolclass=pool.NullPool).connect() as connection:
                    context.configure(connection=connection, target_metadata=None)
                    with context.begin_transaction():
                        context.run_migrations()
            """,
        },
    )
    result = pytester.runpytest(f"--pg-dsn={shared_dsn}", "-W", "error::pgsandbox.errors.PgSandboxWarning")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*(alembic:alembic.ini): cache miss, built in*"])
    write(
        pytester.path,
        {
            "pyproject.toml": '[tool.pytest.ini_options]\npg_migrations = ["sql:migrations"]\n',
            "conftest.py": "def pytest_pgsandbox_migrate(conn):\n    pass\n",
        },
    )
    result = pytester.runpytest(f"--pg-dsn={shared_dsn}")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        [
            "*conftest.py:1: PgSandboxWarning: hook:pytest_pgsandbox_migrate changed nothing in the template "
            "pgsandbox_tpl_* (no object, no row). If it connects by itself*",
        ]
    )


# -- 3: hooks and python: migrations -------------------------------------------------------------------------
def test_a_hook_reading_a_file_is_rebuilt_when_the_file_changes(pytester: pytest.Pytester) -> None:
    """The default path (a local server, templates kept in cluster snapshots): the file a hook read is not in
    pg_migrations_inputs, yet changing it rebuilds the template, and the rebuilt one is what the next run reuses."""
    write(
        pytester.path,
        {
            "conftest.py": """
                from pathlib import Path

                def pytest_pgsandbox_migrate(conn):
                    conn.execute((Path(__file__).parent / "schema/schema.sql").read_text())
            """,
            "schema/schema.sql": "create table users (name text);\n",
            "test_users.py": """
                def test_columns(pg):
                    columns = pg.fetch("select column_name from information_schema.columns where table_name = 'users'")
                    print("columns:", ",".join(sorted(c["column_name"] for c in columns)))
            """,
        },
    )
    first = pytester.runpytest("-s")
    first.assert_outcomes(passed=1)
    first.stdout.fnmatch_lines(
        [
            "pgsandbox: isolation transaction; migrations: hook pytest_pgsandbox_migrate (conftest.py)",
            "*(hook:pytest_pgsandbox_migrate): cache miss, built in * s; it read schema/schema.sql, not in "
            "pg_migrations_inputs: watched, a change rebuilds it",
            "*columns: name",
        ]
    )
    second = pytester.runpytest("-s")
    second.stdout.fnmatch_lines(["*: cache hit, from the cached cluster, nothing to migrate", "*columns: name"])

    (pytester.path / "schema/schema.sql").write_text("create table users (name text, email text);\n")
    third = pytester.runpytest("-s")
    third.assert_outcomes(passed=1)
    third.stdout.fnmatch_lines(
        [
            "*(hook:pytest_pgsandbox_migrate): schema/schema.sql changed since the last build, built in * s*",
            "*columns: email,name",
        ]
    )
    fourth = pytester.runpytest("-s")
    fourth.stdout.fnmatch_lines(["*: cache hit, from the cached cluster, nothing to migrate", "*columns: email,name"])


def test_async_migrations_and_hooks(pytester: pytest.Pytester, shared_dsn: str) -> None:
    write(
        pytester.path,
        {
            "pyproject.toml": """
                [tool.pytest.ini_options]
                pg_migrations = ["python:app.schema:create"]
                pg_seed = ["python:app.schema:seed"]
            """,
            "app/__init__.py": "",
            "app/schema.py": f"""
                import asyncio

                async def create(conn):  # psycopg's AsyncConnection, on a loop of its own
                    await asyncio.sleep(0)
                    await conn.execute("create table users (name text) -- {pytester.path.name}")

                async def seed(url):
                    import asyncpg
                    conn = await asyncpg.connect(url.replace("postgresql+psycopg", "postgresql"))
                    await conn.execute("insert into users values ('ada')")
                    await conn.close()
            """,
            "conftest.py": """
                async def pytest_pgsandbox_seed(conn):
                    async with conn.cursor() as cursor:
                        await cursor.execute("insert into users values ('bob')")
            """,
            "test_users.py": """
                def test_users(pg):
                    assert pg.fetchval("select string_agg(name, ',' order by name) from users") == "ada,bob"
            """,
        },
    )
    result = pytester.runpytest(f"--pg-dsn={shared_dsn}")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        [
            "*; migrations: python:app.schema:create; seed: python:app.schema:seed, "
            "hook pytest_pgsandbox_seed (conftest.py)",
            "*seed template * (python:app.schema:seed, hook:pytest_pgsandbox_seed): cache miss*",
        ]
    )


# -- 4: seeding through the app's own code ---------------------------------------------------------------------
SQLALCHEMY_APP = {
    "shop/__init__.py": "",
    "shop/models.py": """
        from sqlalchemy import String
        from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


        class Base(DeclarativeBase):
            pass


        class Product(Base):
            __tablename__ = "products"
            id: Mapped[int] = mapped_column(primary_key=True)
            title: Mapped[str] = mapped_column(String(100), unique=True)
            stock: Mapped[int] = mapped_column(default=0)
    """,
    "shop/catalog.py": """
        from sqlalchemy import select
        from sqlalchemy.ext.asyncio import AsyncSession
        from sqlalchemy.orm import Session

        from shop.models import Product


        def add_product(session: Session, title: str, stock: int = 0) -> Product:
            # the app's service code: takes a session, flushes, never commits
            product = Product(title=title, stock=stock)
            session.add(product)
            session.flush()
            return product


        def seed_demo(session: Session) -> None:
            add_product(session, "Dune", 3)
            add_product(session, "Emma", 1)


        async def seed_more(session: AsyncSession) -> None:
            session.add(Product(title="Ulysses", stock=len((await session.scalars(select(Product))).all())))
    """,
}


def test_seed_through_the_apps_own_session(pytester: pytest.Pytester, shared_dsn: str) -> None:
    pytest.importorskip("sqlalchemy")
    write(
        pytester.path,
        {
            **SQLALCHEMY_APP,
            "pyproject.toml": """
                [tool.pytest.ini_options]
                pg_migrations = ["sqlalchemy:shop.models:Base"]
                pg_seed = ["python:shop.catalog:seed_demo", "python:shop.catalog:seed_more"]
            """,
            "conftest.py": f"""
                from shop.catalog import add_product

                def pytest_pgsandbox_seed(session):  # {pytester.path.name}
                    add_product(session, "Ivanhoe")
            """,
            "test_products.py": """
                def test_seeded(pg):
                    rows = pg.fetch("select title, stock from products order by title")
                    assert [(r["title"], r["stock"]) for r in rows] == [
                        ("Dune", 3), ("Emma", 1), ("Ivanhoe", 0), ("Ulysses", 2)
                    ]
            """,
        },
    )
    result = pytester.runpytest(f"--pg-dsn={shared_dsn}")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        ["*seed template * (python:shop.catalog:seed_demo, python:shop.catalog:seed_more, hook:*): cache miss*"]
    )


def test_errors_of_async_and_session_migrations(
    pytester: pytest.Pytester, shared: LocalServer, shared_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pgsandbox.common.urls import sqlalchemy_url
    from pgsandbox.template import MigrationError, Target
    from pgsandbox.template.python import CallableMigrator

    write(
        pytester.path,
        {
            "pyproject.toml": '[tool.pytest.ini_options]\npg_migrations = ["python:app.schema:create"]\n',
            "app/__init__.py": "",
            "app/schema.py": """
                async def create(conn):
                    await conn.execute("create table users (name text)")
                    await conn.execute("insert into nosuch values (1)")
            """,
            "test_x.py": "def test_x(pg): pass\n",
        },
    )
    result = pytester.runpytest(f"--pg-dsn={shared_dsn}")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        [
            '*python:app.schema:create failed (*app/schema.py, line 4): UndefinedTable: relation "nosuch" does not '
            "exist",
            "*What to do: fix the migration function and run again; the template was not kept.",
        ]
    )

    def seed(session: Any) -> None:
        pass

    name = shared.create_database()
    try:
        target = Target(name, shared.dsn_for(name), sqlalchemy_url({**shared.params, "dbname": name}))
        monkeypatch.setitem(sys.modules, "sqlalchemy.orm", None)  # as if SQLAlchemy were not installed
        with pytest.raises(MigrationError) as caught:
            CallableMigrator("python:app.seed:seed", seed, (), pytester.path).migrate(target)
    finally:
        shared.drop_database(name)
    assert str(caught.value) == (
        "a migration or seed asks for a SQLAlchemy session, but SQLAlchemy is not installed.\n"
        "  What to do: pip install 'pytest-pgsandbox[sqlalchemy]', or take a connection (conn) instead."
    )


def test_a_changed_read_file_of_a_template_in_use_on_a_shared_server(tmp_path: Path, shared_dsn: str) -> None:
    """Another session uses the template: it is not dropped under it; the error says how to get a template per
    version of the file. A file the build wrote and read back (its own output) is not watched."""
    from pgsandbox import Settings
    from pgsandbox.errors import ConfigError
    from pgsandbox.sandbox import Sandbox
    from pgsandbox.template.python import CallableMigrator

    (tmp_path / "schema.sql").write_text(f"create table users (name text); -- {tmp_path.name}")

    def migrate(conn: psycopg.Connection[Any]) -> None:
        (tmp_path / "generated.sql").write_text((tmp_path / "schema.sql").read_text())
        conn.execute((tmp_path / "generated.sql").read_text())

    def start() -> Sandbox:
        migrator = CallableMigrator("python:app.db:migrate", migrate, (), tmp_path)
        return Sandbox.start(Settings(dsn=shared_dsn), migrations=[migrator], root=tmp_path)

    with start() as first:
        assert first.templates[0].watched == ("schema.sql",)
        (tmp_path / "schema.sql").write_text("create table users (name text, email text);")
        with pytest.raises(ConfigError) as caught:
            start()
    assert str(caught.value) == (
        f"cannot rebuild the migrations template {first.templates[0].name}: its build read schema.sql, which changed "
        "since, and 1 other session(s) are using it.\n  What to do: list the file(s) in pg_migrations_inputs: then "
        "each version gets a template of its own (sessions on a shared server may differ); or let the other sessions "
        "finish and run again."
    )
    with start() as rebuilt:
        assert rebuilt.templates[0].stale == ("schema.sql",)
        with rebuilt.database() as db:
            assert db.fetchval("select count(*) from information_schema.columns where table_name = 'users'") == 2
