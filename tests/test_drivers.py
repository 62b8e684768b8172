"""Every client library gets the same guarantees: a write in one test is gone in the next, and commits made
by the code under test stay inside the test's isolation, in both isolation modes."""

from __future__ import annotations

import re
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from conftest import StartLocal
from pgsandbox import LocalServer

pytestmark = pytest.mark.slow  # every test here starts a server or a process

SCHEMA = "create table items (id serial primary key, name text not null);\n"

COUNT = "select count(*) from items"

DRIVER_TESTS = {
    "test_psycopg2.py": """
        def test_1_writes_and_commits(pg_psycopg2):
            cur = pg_psycopg2.cursor()
            cur.execute("insert into items (name) values ('a')")
            pg_psycopg2.commit()
            with pg_psycopg2:
                cur.execute("insert into items (name) values ('b')")
            cur.execute("insert into items (name) values ('c')")
            pg_psycopg2.rollback()
            cur.execute("select count(*) from items")
            assert cur.fetchone()[0] == 2

        def test_2_is_clean(pg_psycopg2):
            cur = pg_psycopg2.cursor()
            cur.execute("select count(*) from items")
            assert cur.fetchone()[0] == 0
    """,
    "test_aconn.py": """
        async def test_1_writes_and_commits(pg_aconn):
            await pg_aconn.execute("insert into items (name) values ('a')")
            await pg_aconn.commit()
            async with pg_aconn.transaction():  # a savepoint: the transaction was open
                await pg_aconn.execute("insert into items (name) values ('b')")
            await pg_aconn.commit()
            await pg_aconn.execute("insert into items (name) values ('c')")
            await pg_aconn.rollback()
            cur = await pg_aconn.execute("select count(*) from items")
            assert (await cur.fetchone())[0] == 2

        async def test_2_is_clean(pg_aconn):
            cur = await pg_aconn.execute("select count(*) from items")
            assert (await cur.fetchone())[0] == 0
    """,
    "test_asyncpg.py": """
        async def test_1_writes_and_commits(pg_asyncpg):
            async with pg_asyncpg.transaction():
                await pg_asyncpg.execute("insert into items (name) values ('a')")
                async with pg_asyncpg.transaction():
                    await pg_asyncpg.execute("insert into items (name) values ('b')")
            try:
                async with pg_asyncpg.transaction():
                    await pg_asyncpg.execute("insert into items (name) values ('c')")
                    raise KeyError
            except KeyError:
                pass
            assert await pg_asyncpg.fetchval("select count(*) from items") == 2
            await pg_asyncpg.close()  # deferred to the end of the test in transaction isolation

        async def test_2_is_clean(pg_asyncpg):
            assert await pg_asyncpg.fetchval("select count(*) from items") == 0
    """,
    "test_engine.py": """
        from sqlalchemy import text

        def test_1_writes_and_commits(pg_engine, pg):
            with pg_engine.begin() as conn:
                conn.execute(text("insert into items (name) values ('a')"))
            with pg_engine.connect() as conn:
                conn.execute(text("insert into items (name) values ('b')"))
                conn.commit()
            with pg_engine.connect() as conn:
                conn.execute(text("insert into items (name) values ('c')"))  # never committed
            with pg_engine.connect() as conn:
                assert conn.execute(text("select count(*) from items")).scalar() == 2
            assert pg.fetchval("select count(*) from items") == 2

        def test_2_is_clean(pg_engine):
            with pg_engine.connect() as conn:
                assert conn.execute(text("select count(*) from items")).scalar() == 0
    """,
    "test_session.py": """
        from sqlalchemy import func, select
        from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

        class Base(DeclarativeBase):
            pass

        class Item(Base):
            __tablename__ = "items"
            id: Mapped[int] = mapped_column(primary_key=True)
            name: Mapped[str]

        def place(session, name):  # code under test: it commits
            session.add(Item(name=name))
            session.commit()

        def test_1_writes_and_commits(pg_session, pg):
            place(pg_session, "a")
            place(pg_session, "b")
            pg_session.add(Item(name="c"))
            pg_session.flush()
            pg_session.rollback()
            assert pg_session.scalar(select(func.count()).select_from(Item)) == 2
            assert pg.fetchval("select count(*) from items") == 2  # the same connection

        def test_2_is_clean(pg_session):
            assert pg_session.scalar(select(func.count()).select_from(Item)) == 0
    """,
}

ASYNC_SQLALCHEMY = """
    import pytest
    from sqlalchemy import func, select, text
    from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

    pytestmark = pytest.mark.pg(async_driver="{driver}")

    class Base(DeclarativeBase):
        pass

    class Item(Base):
        __tablename__ = "items"
        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str]

    async def place(session, name):  # code under test: it commits
        session.add(Item(name=name))
        await session.commit()

    async def test_1_session_writes_and_commits(pg_async_session):
        await place(pg_async_session, "a")
        await place(pg_async_session, "b")
        pg_async_session.add(Item(name="c"))
        await pg_async_session.flush()
        await pg_async_session.rollback()
        assert await pg_async_session.scalar(select(func.count()).select_from(Item)) == 2

    async def test_2_is_clean(pg_async_session):
        assert await pg_async_session.scalar(select(func.count()).select_from(Item)) == 0

    async def test_3_engine_writes_and_commits(pg_async_engine):
        async with pg_async_engine.begin() as conn:
            await conn.execute(text("insert into items (name) values ('a')"))
        async with pg_async_engine.connect() as conn:
            await conn.execute(text("insert into items (name) values ('b')"))
            await conn.commit()
        async with pg_async_engine.connect() as conn:
            assert (await conn.execute(text("select count(*) from items"))).scalar() == 2

    async def test_4_is_clean(pg_async_engine):
        async with pg_async_engine.connect() as conn:
            assert (await conn.execute(text("select count(*) from items"))).scalar() == 0
"""


def driver_project(pytester: pytest.Pytester, ini: str = 'asyncio_mode = "auto"\n') -> None:
    if "asyncio_default_fixture_loop_scope" not in ini:
        ini += 'asyncio_default_fixture_loop_scope = "function"\n'
    pytester.makefile(".toml", pyproject='[tool.pytest.ini_options]\npg_migrations = ["sql:migrations"]\n' + ini)
    (pytester.path / "migrations").mkdir(exist_ok=True)
    (pytester.path / "migrations/1.sql").write_text(SCHEMA)
    for name, source in DRIVER_TESTS.items():
        (pytester.path / name).write_text(textwrap.dedent(source))
    for driver in ("asyncpg", "psycopg"):
        (pytester.path / f"test_async_sqlalchemy_{driver}.py").write_text(
            textwrap.dedent(ASYNC_SQLALCHEMY).replace("{driver}", driver)
        )


@pytest.mark.parametrize("isolation", ["transaction", "database"])
def test_every_fixture_isolates_and_keeps_commits_inside(
    pytester: pytest.Pytester, shared_dsn: str, isolation: str
) -> None:
    driver_project(pytester)
    result = pytester.runpytest(
        f"--pg-dsn={shared_dsn}",
        f"--pg-isolation={isolation}",
        "-p",
        "no:randomly",
        "-W",
        "error::pgsandbox.errors.PgSandboxWarning",
    )
    result.assert_outcomes(passed=18)


ESCAPES = """
    import pytest

    def test_1_psycopg2_commits_for_real(pg_psycopg2):
        cur = pg_psycopg2.cursor()
        cur.execute("insert into items (name) values ('escaped'); COMMIT")

    def test_2_is_clean(pg):
        assert pg.fetchval("select count(*) from items") == 0

    async def test_3_asyncpg_commits_for_real(pg_asyncpg):
        await pg_asyncpg.execute("insert into items (name) values ('escaped'); COMMIT")

    def test_4_is_clean(pg):
        assert pg.fetchval("select count(*) from items") == 0

    async def test_5_aconn_commits_for_real(pg_aconn):
        await pg_aconn.execute("insert into items (name) values ('escaped')")
        await pg_aconn.execute("COMMIT")

    def test_6_is_clean(pg):
        assert pg.fetchval("select count(*) from items") == 0

    def test_7_autocommit_is_refused(pg_psycopg2):
        with pytest.raises(Exception, match="cannot switch to autocommit"):
            pg_psycopg2.autocommit = True
        with pytest.raises(Exception, match="cannot switch to autocommit"):
            pg_psycopg2.set_session(autocommit=True)

    async def test_8_async_autocommit_is_refused(pg_aconn):
        with pytest.raises(Exception, match="cannot switch to autocommit"):
            await pg_aconn.set_autocommit(True)
"""


def test_a_raw_commit_on_a_driver_connection_is_reported_and_the_next_test_starts_clean(
    pytester: pytest.Pytester, shared_dsn: str
) -> None:
    driver_project(pytester)
    (pytester.path / "test_escapes.py").write_text(textwrap.dedent(ESCAPES))
    result = pytester.runpytest(f"--pg-dsn={shared_dsn}", "-p", "no:randomly", "test_escapes.py")
    result.assert_outcomes(passed=8, errors=3)
    for label in ("psycopg2", "asyncpg", "async psycopg"):
        result.stdout.fnmatch_lines(
            [
                f"*committed outside its transaction*the transaction of its {label} connection was ended by a "
                "COMMIT (or END) statement*",
            ]
        )
    result.stdout.fnmatch_lines(["*Changed: public.items (+1 row, 1 row written)*"])


MISSING = {
    # case: (library hidden, fixture, the test, package named, extra named)
    "psycopg2": ("psycopg2", "pg_psycopg2", "def test_it(pg_psycopg2):\n    pass\n", "psycopg2-binary", "psycopg2"),
    "asyncpg": ("asyncpg", "pg_asyncpg", "async def test_it(pg_asyncpg):\n    pass\n", "asyncpg", "asyncpg"),
    # pg_session's message names pg_engine, which it uses and which pytest sets up first
    "sqlalchemy": ("sqlalchemy", "pg_engine", "def test_it(pg_session):\n    pass\n", "sqlalchemy", "sqlalchemy"),
    "async-engine": (
        "asyncpg",
        "pg_async_engine with pg_async_driver = asyncpg",
        "async def test_it(pg_async_session):\n    pass\n",
        "asyncpg",
        "asyncpg",
    ),
}


@pytest.mark.parametrize("case", sorted(MISSING))
def test_a_fixture_without_its_library_names_the_extra(
    pytester: pytest.Pytester, shared_dsn: str, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    library, fixture, source, package, extra = MISSING[case]
    driver_project(pytester)
    monkeypatch.setitem(sys.modules, library, None)
    monkeypatch.delitem(sys.modules, f"pgsandbox.drivers.{library}", raising=False)
    (pytester.path / "test_missing.py").write_text(source)
    result = pytester.runpytest(f"--pg-dsn={shared_dsn}", "test_missing.py")
    result.assert_outcomes(errors=1)
    output = result.stdout.str()
    assert f"pgsandbox: {fixture} needs {package}, which is not installed." in output
    assert f"What to do: pip install 'pytest-pgsandbox[{extra}]'" in output


ANYIO_ONLY = """\
import pytest

@pytest.fixture
def anyio_backend():
    return "asyncio"

@pytest.mark.anyio
async def test_on_anyio(pg_aconn, pg_asyncpg):
    await pg_asyncpg.execute("insert into items (name) values ('a')")
    assert await pg_asyncpg.fetchval("select count(*) from items") == 1
"""


def test_async_fixtures_without_pytest_asyncio_name_the_extra(
    pytester: pytest.Pytester, shared_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    driver_project(pytester, ini="")
    (pytester.path / "test_missing.py").write_text("def test_it(pg_aconn):\n    pass\n")
    # a project on anyio has no need of pytest-asyncio: the async fixtures run under anyio's plugin
    (pytester.path / "test_anyio_only.py").write_text(ANYIO_ONLY)
    # a fresh interpreter where pytest-asyncio cannot be imported, and only pgsandbox (and anyio's plugin) loaded
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    blocked = "import sys; sys.modules['pytest_asyncio'] = None; import pytest; sys.exit(pytest.main(sys.argv[1:]))"
    result = pytester.run(
        sys.executable,
        "-c",
        blocked,
        "-p",
        "pgsandbox.pytest.plugin",
        "-p",
        "anyio",
        f"--pg-dsn={shared_dsn}",
        "test_missing.py",
        "test_anyio_only.py",
    )
    result.assert_outcomes(passed=1, errors=1)
    output = result.stdout.str()
    assert "pgsandbox: pg_aconn is an async fixture and needs pytest-asyncio, which is not installed." in output
    assert "What to do: pip install 'pytest-pgsandbox[asyncio]'." in output


LOOPS = """
    import asyncio
    import pytest

    {mark}
    async def test_1_write(pg_asyncpg, pg_aconn, pg_async_session):
        await pg_asyncpg.execute("insert into items (name) values ('a')")
        await pg_aconn.execute("insert into items (name) values ('b')")
        LOOPS.append(asyncio.get_running_loop())
        PIDS.append((pg_asyncpg.get_server_pid(), pg_aconn.info.backend_pid))

    {mark}
    async def test_2_clean(pg_asyncpg, pg_aconn):
        assert await pg_asyncpg.fetchval("select count(*) from items") == 0
        LOOPS.append(asyncio.get_running_loop())
        PIDS.append((pg_asyncpg.get_server_pid(), pg_aconn.info.backend_pid))

    {mark}
    async def test_3_fails(pg_asyncpg):
        await pg_asyncpg.execute("insert into items (name) values ('a')")
        assert False, "on purpose"

    {mark}
    async def test_4_cancelled(pg_asyncpg):
        asyncio.current_task().cancel()
        await pg_asyncpg.execute("select pg_sleep(5)")

    {mark}
    async def test_5_nothing_left_behind(pg):
        shared_loop = "{scope}" == "session"
        assert (LOOPS[0] is LOOPS[1]) is shared_loop
        # a session loop keeps the connections for the next test; a loop per test cannot
        assert (PIDS[0] == PIDS[1]) is shared_loop
        query = (
            "select count(*) as left, count(*) filter (where state <> 'idle') as busy from pg_stat_activity "
            "where datname = current_database() and pid <> pg_backend_pid() and backend_type = 'client backend'"
        )
        for _ in range(1000):  # a closed connection's server process exits a moment later
            row = pg.fetchone(query)
            left, busy = row["left"], row["busy"]
            if left <= (2 if shared_loop else 0):
                break
            await asyncio.sleep(0.005)
        assert left <= (2 if shared_loop else 0) and busy == 0
        assert pg.fetchval("select count(*) from items") == 0

    LOOPS = []
    PIDS = []
"""


@pytest.mark.parametrize(
    ("mode", "scope"), [("strict", "function"), ("strict", "session"), ("auto", "function"), ("auto", "session")]
)
def test_async_fixtures_in_strict_and_auto_mode_with_function_and_session_loops(
    pytester: pytest.Pytester, shared_dsn: str, mode: str, scope: str
) -> None:
    driver_project(
        pytester,
        ini=f'asyncio_mode = "{mode}"\nasyncio_default_test_loop_scope = "{scope}"\n'
        f'asyncio_default_fixture_loop_scope = "{scope}"\n',
    )
    mark = "@pytest.mark.asyncio" if mode == "strict" else ""
    source = textwrap.dedent(LOOPS).replace("{mark}", mark).replace("{scope}", scope)
    (pytester.path / "test_loops.py").write_text(source)
    result = pytester.runpytest(
        f"--pg-dsn={shared_dsn}", "-p", "no:randomly", "-W", "error::pgsandbox.errors.PgSandboxWarning", "test_loops.py"
    )
    result.assert_outcomes(passed=3, failed=2)
    result.stdout.fnmatch_lines(["*test_3_fails*on purpose*"])


KEEP = """
    from sqlalchemy import text

    async def test_1_fails(pg_asyncpg, pg_psycopg2, pg_session):
        await pg_asyncpg.execute("insert into items (name) values ('asyncpg')")
        pg_psycopg2.cursor().execute("insert into items (name) values ('psycopg2')")
        pg_session.execute(text("insert into items (name) values ('session')"))
        pg_session.commit()
        assert False, "on purpose"

    def test_2_is_clean(pg):
        assert pg.fetchval("select count(*) from items") == 0
"""


@pytest.mark.usefixtures("machine_wide_servers")  # its kept run: `pgsandbox clean` elsewhere would take it
def test_keep_failed_keeps_what_every_driver_wrote(
    pytester: pytest.Pytester, shared: LocalServer, shared_dsn: str
) -> None:
    driver_project(pytester)
    (pytester.path / "test_keep.py").write_text(textwrap.dedent(KEEP))
    result = pytester.runpytest(f"--pg-dsn={shared_dsn}", "--pg-keep-failed", "-p", "no:randomly", "test_keep.py")
    kept = re.findall(r"the database of this test is kept as (\S+);", result.stdout.str())
    try:
        result.assert_outcomes(passed=1, failed=1)
        assert len(kept) == 1
        with shared.connect(kept[0], autocommit=True) as conn:
            names = {row[0] for row in conn.execute("select name from items")}
        assert names == {"asyncpg", "psycopg2", "session"}
    finally:
        for name in kept:
            shared.admin.execute(f'drop database if exists "{name}" with (force)')


FACTORIES = """
    import factory
    import pytest
    from pytest_factoryboy import register
    from sqlalchemy import ForeignKey, func, select
    from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

    from pgsandbox.errors import PgSandboxError
    from pgsandbox.drivers.factoryboy import create, create_batch, session

    class Base(DeclarativeBase):
        pass

    class Author(Base):
        __tablename__ = "author"
        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str]

    class Book(Base):
        __tablename__ = "book"
        id: Mapped[int] = mapped_column(primary_key=True)
        title: Mapped[str]
        author_id: Mapped[int] = mapped_column(ForeignKey("author.id"))
        author: Mapped[Author] = relationship()

    class AuthorFactory(factory.alchemy.SQLAlchemyModelFactory):
        class Meta:
            model = Author
            sqlalchemy_session_factory = session
            sqlalchemy_session_persistence = "flush"

        name = factory.Sequence(lambda n: f"author {n}")

    class BookFactory(factory.alchemy.SQLAlchemyModelFactory):
        class Meta:
            model = Book
            sqlalchemy_session_factory = session
            sqlalchemy_session_persistence = "flush"

        title = factory.Sequence(lambda n: f"book {n}")
        author = factory.SubFactory(AuthorFactory)

    register(AuthorFactory)
    register(BookFactory)

    def test_1_factories_write_through_the_session(pg_session, pg):
        BookFactory.create_batch(3)
        assert pg_session.scalar(select(func.count()).select_from(Author)) == 3
        pg_session.commit()
        assert pg.fetchval("select count(*) from book") == 3

    def test_2_is_clean(pg):
        assert pg.fetchval("select count(*) from book") + pg.fetchval("select count(*) from author") == 0

    def test_3_pytest_factoryboy(pg_session, book):
        assert book.id is not None and book.author.id is not None
        assert pg_session.get(Book, book.id) is book

    async def test_4_async(pg_async_session):
        book = await create(BookFactory, title="async")
        await create_batch(AuthorFactory, 2)
        assert book.author.id is not None
        assert await pg_async_session.scalar(select(func.count()).select_from(Author)) == 3
        assert (await pg_async_session.get(Book, book.id)).title == "async"

    def test_5_is_clean(pg):
        assert pg.fetchval("select count(*) from book") + pg.fetchval("select count(*) from author") == 0

    def test_6_without_a_session(pg):
        with pytest.raises(PgSandboxError, match="this test has no pg_session"):
            AuthorFactory()

    async def test_7_sync_call_in_an_async_test(pg_async_session):
        with pytest.raises(PgSandboxError, match="await pgsandbox.drivers.factoryboy.create"):
            AuthorFactory()
"""


@pytest.mark.parametrize("isolation", ["transaction", "database"])
def test_factory_boy_factories_use_the_tests_session(
    pytester: pytest.Pytester, shared_dsn: str, isolation: str
) -> None:
    driver_project(pytester)
    (pytester.path / "migrations/2.sql").write_text(
        "create table author (id serial primary key, name text not null);\n"
        "create table book (id serial primary key, title text not null, author_id int not null references author);\n"
    )
    (pytester.path / "test_factories.py").write_text(textwrap.dedent(FACTORIES))
    result = pytester.runpytest(
        f"--pg-dsn={shared_dsn}",
        f"--pg-isolation={isolation}",
        "-p",
        "no:randomly",
        "-p",
        "pytest-factoryboy",
        "test_factories.py",
    )
    result.assert_outcomes(passed=7)


def test_bad_async_driver_values(pytester: pytest.Pytester, shared_dsn: str) -> None:
    driver_project(pytester)
    (pytester.path / "test_bad.py").write_text(
        "import pytest\n\n@pytest.mark.pg(async_driver='aiopg')\nasync def test_it(pg_async_engine):\n    pass\n"
    )
    result = pytester.runpytest(f"--pg-dsn={shared_dsn}", "test_bad.py")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*@pytest.mark.pg(async_driver='aiopg') is not one of asyncpg, psycopg.*"])
    usage = pytester.runpytest(f"--pg-dsn={shared_dsn}", "--pg-async-driver=aiopg", "test_bad.py")
    usage.stderr.fnmatch_lines(["*--pg-async-driver: bad value 'aiopg': expected one of asyncpg, psycopg*"])


PARKED = """
    import psycopg2.extras

    PIDS = []

    def test_1_sets_up_its_connection(pg_psycopg2):
        PIDS.append(pg_psycopg2.get_backend_pid())
        pg_psycopg2.cursor_factory = psycopg2.extras.DictCursor
        pg_psycopg2.cursor().execute("set search_path to nowhere")

    def test_2_gets_it_back_as_new(pg_psycopg2, pg):
        PIDS.append(pg_psycopg2.get_backend_pid())
        assert PIDS[1] == PIDS[0]  # kept between tests: no new connection
        cur = pg_psycopg2.cursor()
        assert type(cur) is psycopg2.extensions.cursor
        cur.execute("show search_path")
        assert "nowhere" not in cur.fetchone()[0]
        cur.execute("insert into items (name) values ('a')")

    def test_3_commits_for_real(pg_psycopg2):
        pg_psycopg2.cursor().execute("insert into items (name) values ('escaped'); COMMIT")

    def test_4_new_database_new_connection(pg_psycopg2):
        PIDS.append(pg_psycopg2.get_backend_pid())
        assert PIDS[2] != PIDS[0]
        cur = pg_psycopg2.cursor()
        cur.execute("select count(*) from items")
        assert cur.fetchone()[0] == 0
"""


def test_a_psycopg2_connection_is_kept_between_tests_and_reset(pytester: pytest.Pytester, shared_dsn: str) -> None:
    driver_project(pytester)
    (pytester.path / "test_parked.py").write_text(textwrap.dedent(PARKED))
    result = pytester.runpytest(
        f"--pg-dsn={shared_dsn}",
        "-p",
        "no:randomly",
        "-W",
        "error::pgsandbox.errors.PgSandboxWarning",
        "test_parked.py",
    )
    result.assert_outcomes(passed=4, errors=1)
    result.stdout.fnmatch_lines(["*test_3_commits_for_real*the transaction of its psycopg2 connection was ended*"])


def test_urls_of_a_socket_server_work_with_every_client(start_local: StartLocal) -> None:
    import asyncio

    import asyncpg
    import psycopg
    import sqlalchemy
    from sqlalchemy.ext.asyncio import create_async_engine

    from pgsandbox.common.urls import sqlalchemy_url

    server = start_local(listen="none")
    params = {**server.params, "dbname": "postgres"}
    assert str(params["host"]).startswith("/")  # a Unix socket directory
    plain = sqlalchemy_url(params, "postgresql")
    with psycopg.connect(plain) as plain_conn:
        assert plain_conn.execute("select 1").fetchone() == (1,)
    for driver in ("psycopg", "psycopg2"):
        engine = sqlalchemy.create_engine(sqlalchemy_url(params, driver), poolclass=sqlalchemy.pool.NullPool)
        with engine.connect() as conn:
            assert conn.execute(sqlalchemy.text("select 1")).scalar() == 1

    async def with_asyncio() -> None:
        conn = await asyncpg.connect(plain)
        assert await conn.fetchval("select 1") == 1
        await conn.close()
        for driver in ("asyncpg", "psycopg"):
            engine = create_async_engine(sqlalchemy_url(params, driver), poolclass=sqlalchemy.pool.NullPool)
            async with engine.connect() as aconn:
                assert (await aconn.execute(sqlalchemy.text("select 1"))).scalar() == 1
            await engine.dispose()

    asyncio.run(with_asyncio())


HELPERS = """
    import psycopg
    import pytest

    @pytest.mark.pg(isolation="database")
    def test_helpers_commit_like_autocommit(pg):
        def seen_by_the_app():
            with psycopg.connect(pg.dsn) as app:
                return app.execute("select count(*) from items").fetchone()[0]

        assert pg.execute("insert into items (name) values ('a')") == 1
        assert seen_by_the_app() == 1
        assert pg.fetchval("select count(*) from items") == 1
        assert pg.connection.info.transaction_status == psycopg.pq.TransactionStatus.IDLE  # no lock held
        with pg.connection.transaction():  # inside the test's own transaction they do not commit
            pg.execute("insert into items (name) values ('b')")
            assert seen_by_the_app() == 1
        assert seen_by_the_app() == 2
        with pytest.raises(psycopg.errors.UndefinedTable):
            pg.execute("insert into nosuch values (1)")
        assert pg.fetchval("select count(*) from items") == 2  # the failed statement left nothing open

    def test_in_transaction_isolation_they_stay_in_the_test(pg):
        pg.execute("insert into items (name) values ('a')")
        with psycopg.connect(pg.dsn) as other:
            assert other.execute("select count(*) from items").fetchone()[0] == 0
"""


def test_pg_helpers_in_database_isolation_commit(pytester: pytest.Pytester, shared_dsn: str) -> None:
    driver_project(pytester)
    (pytester.path / "test_helpers.py").write_text(textwrap.dedent(HELPERS))
    result = pytester.runpytest(f"--pg-dsn={shared_dsn}", "-p", "no:randomly", "test_helpers.py")
    result.assert_outcomes(passed=2)


SHARED = """
    import pytest
    from sqlalchemy import text

    COUNT = text("select count(*) from items")

    def insert(name):
        return text(f"insert into items (name) values ('{name}')")

    def test_sync(pg_session, pg_engine, pg_conn, pg):
        pg_conn.execute("insert into items (name) values ('pg_conn, not committed')")
        pg_session.execute(insert("session, flushed"))
        with pg_engine.connect() as conn:  # code under test reads through the engine, then closes
            assert conn.execute(COUNT).scalar() == 2
        with pg_engine.connect() as conn:
            conn.execute(insert("engine, never committed"))
        with pg_engine.begin() as conn:
            conn.execute(insert("engine, committed"))
        pg_session.commit()  # its savepoint survived the engine's rollbacks
        assert pg.fetchval("select count(*) from items") == 3
"""

ASYNC_SHARED = """
    import pytest
    from sqlalchemy import text

    pytestmark = pytest.mark.pg(async_driver="{driver}")
    COUNT = text("select count(*) from items")

    def insert(name):
        return text(f"insert into items (name) values ('{name}')")

    async def test_async(pg_async_session, pg_async_engine):
        await pg_async_session.execute(insert("session, flushed"))
        async with pg_async_engine.connect() as conn:
            assert (await conn.execute(COUNT)).scalar() == 1
        async with pg_async_engine.connect() as conn:
            await conn.execute(insert("engine, never committed"))
        async with pg_async_engine.begin() as conn:
            await conn.execute(insert("engine, committed"))
        await pg_async_session.commit()
        assert (await pg_async_session.execute(COUNT)).scalar() == 2

    async def test_clean(pg_async_session):
        assert (await pg_async_session.execute(COUNT)).scalar() == 0
"""


def test_engine_connections_roll_back_only_their_own_work(pytester: pytest.Pytester, shared_dsn: str) -> None:
    driver_project(pytester)
    (pytester.path / "test_shared.py").write_text(textwrap.dedent(SHARED))
    for driver in ("psycopg", "asyncpg"):
        (pytester.path / f"test_shared_{driver}.py").write_text(
            textwrap.dedent(ASYNC_SHARED).replace("{driver}", driver)
        )
    result = pytester.runpytest(
        f"--pg-dsn={shared_dsn}",
        "-p",
        "no:randomly",
        "test_shared.py",
        "test_shared_psycopg.py",
        "test_shared_asyncpg.py",
    )
    result.assert_outcomes(passed=5)


SESSION_LOOP = """
    async def test_1_writes(pg_asyncpg, pg_aconn):
        await pg_asyncpg.execute("insert into items (name) values ('a')")

    async def test_2_commits_for_real(pg_asyncpg, pg_aconn):
        await pg_aconn.execute("insert into items (name) values ('escaped')")
        await pg_aconn.execute("commit")

    async def test_3_fails(pg_asyncpg, pg_aconn):
        await pg_asyncpg.execute("insert into items (name) values ('kept')")
        assert False, "on purpose"

    async def test_4_is_clean(pg_asyncpg, pg):
        assert await pg_asyncpg.fetchval("select count(*) from items") == 0
"""


@pytest.mark.usefixtures("machine_wide_servers")  # its kept run: `pgsandbox clean` elsewhere would take it
def test_kept_async_connections_follow_a_restored_and_a_kept_database(
    pytester: pytest.Pytester, shared: LocalServer, shared_dsn: str
) -> None:
    """With a session loop, async connections are parked between tests; when the session database is
    replaced (an escape) or kept (a failure), they are closed in their loop, and the next test starts clean."""
    driver_project(
        pytester,
        ini='asyncio_mode = "auto"\nasyncio_default_fixture_loop_scope = "session"\n'
        'asyncio_default_test_loop_scope = "session"\n',
    )
    (pytester.path / "test_session_loop.py").write_text(textwrap.dedent(SESSION_LOOP))
    result = pytester.runpytest(
        f"--pg-dsn={shared_dsn}",
        "--pg-keep-failed",
        "-p",
        "no:randomly",
        "-W",
        "error::pgsandbox.errors.PgSandboxWarning",
        "test_session_loop.py",
    )
    kept = re.findall(r"the database of this test is kept as (\S+);", result.stdout.str())
    try:
        result.assert_outcomes(passed=3, failed=1, errors=1)
        result.stdout.fnmatch_lines(["*the transaction of its async psycopg connection was ended by a COMMIT*"])
        with shared.connect(kept[0], autocommit=True) as conn:
            assert [row[0] for row in conn.execute("select name from items")] == ["kept"]
    finally:
        for name in kept:
            shared.admin.execute(f'drop database if exists "{name}" with (force)')


ASYNC_FASTAPI_APP = """
    from collections.abc import AsyncIterator
    from typing import Annotated

    import httpx
    import pytest
    from fastapi import Depends, FastAPI, Request
    from sqlalchemy import func, select
    from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
    from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

    pytestmark = pytest.mark.pg(async_driver="{driver}")

    class Base(DeclarativeBase):
        pass

    class Item(Base):
        __tablename__ = "items"
        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str]

    app = FastAPI()

    def get_engine(request: Request) -> AsyncEngine:
        return request.app.state.engine  # made in the app's lifespan in production

    async def get_session(engine: Annotated[AsyncEngine, Depends(get_engine)]) -> AsyncIterator[AsyncSession]:
        async with AsyncSession(engine, expire_on_commit=False) as session:
            yield session

    Session = Annotated[AsyncSession, Depends(get_session)]

    @app.post("/items/{name}", status_code=201)
    async def add_item(name: str, session: Session) -> dict[str, int]:
        session.add(Item(name=name))
        await session.commit()
        return {"count": await session.scalar(select(func.count()).select_from(Item))}

    @app.post("/drafts/{name}")
    async def draft_item(name: str, session: Session) -> None:
        session.add(Item(name=name))
        await session.flush()  # never committed: closing the session rolls it back

    @pytest.fixture
    async def client(pg_async_engine: AsyncEngine) -> AsyncIterator[httpx.AsyncClient]:
        app.dependency_overrides[get_engine] = lambda: pg_async_engine
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
                yield client
        finally:
            app.dependency_overrides.clear()

    async def test_1_app_sessions_beside_the_tests(client, pg_async_session):
        pg_async_session.add(Item(name="by the test"))
        await pg_async_session.commit()
        assert (await client.post("/items/by the app")).json() == {"count": 2}
        assert (await client.post("/drafts/abandoned")).status_code == 200
        assert (await client.post("/items/again")).json() == {"count": 3}
        names = await pg_async_session.scalars(select(Item.name).order_by(Item.id))
        assert list(names) == ["by the test", "by the app", "again"]

    async def test_2_is_clean(pg_async_session):
        assert await pg_async_session.scalar(select(func.count()).select_from(Item)) == 0
"""


@pytest.mark.parametrize("isolation", ["transaction", "database"])
def test_an_async_fastapi_app_makes_its_sessions_from_the_engine_beside_the_tests_session(
    pytester: pytest.Pytester, shared_dsn: str, isolation: str
) -> None:
    """The README's async FastAPI pattern: the app's dependency makes an ``AsyncSession`` per request from
    ``pg_async_engine`` while the test holds ``pg_async_session``. On SQLAlchemy 2.0 with asyncpg the app's
    commit and rollback failed on a missing transaction (CI runs this on 2.0 and 2.1)."""
    driver_project(pytester)
    for driver in ("asyncpg", "psycopg"):
        (pytester.path / f"test_fastapi_{driver}.py").write_text(
            textwrap.dedent(ASYNC_FASTAPI_APP).replace("{driver}", driver)
        )
    result = pytester.runpytest(
        f"--pg-dsn={shared_dsn}",
        f"--pg-isolation={isolation}",
        "-p",
        "no:randomly",
        "-W",
        "error::pgsandbox.errors.PgSandboxWarning",
        "test_fastapi_asyncpg.py",
        "test_fastapi_psycopg.py",
    )
    result.assert_outcomes(passed=4)


SQLMODEL_APP = {
    "heroes.py": '''
        """A SQLModel app as its tutorial writes one: table models, a FastAPI endpoint, session.exec()."""

        from collections.abc import Iterator
        from typing import Annotated

        from fastapi import Depends, FastAPI
        from sqlmodel import Field, Session, SQLModel, create_engine, select

        class Team(SQLModel, table=True):
            id: int | None = Field(default=None, primary_key=True)
            name: str = Field(unique=True)

        class Hero(SQLModel, table=True):
            id: int | None = Field(default=None, primary_key=True)
            name: str
            team_id: int = Field(foreign_key="team.id")

        def hire(session: Session, name: str, team_name: str) -> Hero:
            team = session.exec(select(Team).where(Team.name == team_name)).first()
            if team is None:
                team = Team(name=team_name)
                session.add(team)
                session.flush()
            hero = Hero(name=name, team_id=team.id)
            session.add(hero)
            session.commit()
            session.refresh(hero)
            return hero

        def roster(session: Session, team_name: str) -> list[str]:
            query = select(Hero.name).join(Team).where(Team.name == team_name).order_by(Hero.name)
            return list(session.exec(query))

        app = FastAPI()

        def get_session() -> Iterator[Session]:
            with Session(create_engine("postgresql+psycopg:///heroes")) as session:
                yield session

        @app.get("/teams/{team_name}")
        def read_roster(team_name: str, session: Annotated[Session, Depends(get_session)]) -> list[str]:
            return roster(session, team_name)
    ''',
    "test_heroes.py": """
        import pytest
        from fastapi.testclient import TestClient
        from sqlmodel import Session, select
        from sqlmodel.ext.asyncio.session import AsyncSession

        from heroes import Hero, Team, app, get_session, hire, roster

        def test_1_the_session_is_the_apps(pg_session):
            assert isinstance(pg_session, Session)
            hire(pg_session, "Deadpond", "Preventers")
            hire(pg_session, "Rusty-Man", "Preventers")
            assert roster(pg_session, "Preventers") == ["Deadpond", "Rusty-Man"]
            assert pg_session.exec(select(Team.name)).all() == ["Preventers"]

        def test_2_is_clean(pg_session):
            assert pg_session.exec(select(Hero)).all() == []

        def test_3_through_the_api(pg_session):
            hire(pg_session, "Spider-Boy", "Z-Force")
            app.dependency_overrides[get_session] = lambda: pg_session
            try:
                assert TestClient(app).get("/teams/Z-Force").json() == ["Spider-Boy"]
            finally:
                app.dependency_overrides.clear()

        @pytest.mark.pg(async_session_class=AsyncSession)
        async def test_4_async(pg_async_session):
            assert isinstance(pg_async_session, AsyncSession)
            pg_async_session.add(Team(name="Avengers"))
            await pg_async_session.commit()
            assert (await pg_async_session.exec(select(Team.name))).all() == ["Avengers"]

        @pytest.mark.pg(async_session_class="sqlmodel.ext.asyncio.session:AsyncSession")
        async def test_5_async_is_clean(pg_async_session):
            assert (await pg_async_session.exec(select(Team))).all() == []
    """,
}


@pytest.mark.parametrize("isolation", ["transaction", "database"])
def test_a_sqlmodel_app_gets_sqlmodel_sessions(pytester: pytest.Pytester, shared_dsn: str, isolation: str) -> None:
    """``pg_session_class = sqlmodel:Session`` (and the marker's ``async_session_class``): the fixtures are
    SQLModel's sessions, with ``exec()``, joined to the test's isolation like SQLAlchemy's."""
    pytest.importorskip("sqlmodel")
    pytester.makefile(
        ".toml",
        pyproject='[tool.pytest.ini_options]\npg_migrations = ["sqlalchemy:heroes:SQLModel"]\n'
        'pg_session_class = "sqlmodel:Session"\npythonpath = ["."]\n'
        'asyncio_mode = "auto"\nasyncio_default_fixture_loop_scope = "function"\n',
    )
    for name, source in SQLMODEL_APP.items():
        (pytester.path / name).write_text(textwrap.dedent(source))
    result = pytester.runpytest(
        f"--pg-dsn={shared_dsn}",
        f"--pg-isolation={isolation}",
        "-p",
        "no:randomly",
        "-W",
        "error::pgsandbox.errors.PgSandboxWarning",
    )
    result.assert_outcomes(passed=5)


BAD_SESSION_CLASSES = """
    import pytest

    @pytest.mark.pg(session_class="sqlmodel:Sesion")
    def test_a_typo(pg_session):
        pass

    @pytest.mark.pg(session_class="sqlmodel.ext.asyncio.session:AsyncSession")
    def test_an_async_class_for_the_sync_session(pg_session):
        pass

    @pytest.mark.pg(async_session_class="shop_app_not_installed.db:AsyncSession")
    async def test_a_module_that_is_not_installed(pg_async_session):
        pass
"""


def test_a_session_class_that_cannot_be_used_says_why_and_what_to_do(
    pytester: pytest.Pytester, shared_dsn: str
) -> None:
    pytest.importorskip("sqlmodel")
    driver_project(pytester)
    (pytester.path / "test_bad.py").write_text(textwrap.dedent(BAD_SESSION_CLASSES))
    result = pytester.runpytest(f"--pg-dsn={shared_dsn}", "-p", "no:randomly", "test_bad.py")
    result.assert_outcomes(errors=3)
    result.stdout.fnmatch_lines(
        [
            "*pgsandbox: @pytest.mark.pg(session_class=...): bad value 'sqlmodel:Sesion': sqlmodel has no Sesion.",
            "*What to do: fix @pytest.mark.pg(session_class=...); it takes a subclass of SQLAlchemy's Session as "
            "module:Class, such as sqlmodel:Session.",
            "*bad value 'sqlmodel.ext.asyncio.session:AsyncSession': "
            "<class 'sqlmodel.ext.asyncio.session.AsyncSession'> is not a subclass of sqlalchemy.orm.session.Session.",
            "*@pytest.mark.pg(async_session_class=...): bad value 'shop_app_not_installed.db:AsyncSession': cannot "
            "import shop_app_not_installed.db (No module named 'shop_app_not_installed')*",
            "*What to do: install shop_app_not_installed in the tests' environment, or fix "
            "@pytest.mark.pg(async_session_class=...).",
        ]
    )

    result = pytester.runpytest(f"--pg-dsn={shared_dsn}", "--pg-session-class=sqlmodel", "test_bad.py")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        [
            "*pgsandbox: --pg-session-class: bad value 'sqlmodel': expected module:Class, such as sqlmodel:Session.",
            "*What to do: fix --pg-session-class; --pg-session-class takes: the Session class pg_session is made of*",
        ]
    )


def test_table_factory_is_an_ordinary_class_of_its_module() -> None:
    """One class, found by its name (pickle, type checkers and IDEs follow it), a factory_boy ``Factory``."""
    import importlib
    import pickle

    from factory.base import Factory

    from pgsandbox.drivers.factoryboy import TableFactory

    # from sys.modules, as pickle finds it (pytester's in-process runs may leave an older module object bound on
    # the package)
    table_factory = importlib.import_module("pgsandbox.drivers.table_factory")

    assert TableFactory is table_factory.TableFactory
    assert (TableFactory.__module__, TableFactory.__qualname__) == ("pgsandbox.drivers.table_factory", "TableFactory")
    assert issubclass(TableFactory, Factory)
    assert pickle.loads(pickle.dumps(TableFactory)) is TableFactory


def _sandbox_with_items(tmp_path: Path, shared_dsn: str) -> Any:
    from pgsandbox import Sandbox, Settings

    (tmp_path / "m").mkdir()
    (tmp_path / "m/1.sql").write_text(SCHEMA + f"-- {tmp_path.name}")
    return Sandbox.start(Settings(dsn=shared_dsn, migrations=("sql:m",)), root=tmp_path)


def test_driver_connections_carry_nothing_of_pgsandbox_and_are_let_go(tmp_path: Path, shared_dsn: str) -> None:
    """The guest protocol keeps its state in a table of its own, not on the libraries' connection objects, and
    that table keeps no connection alive: once the sandbox closed them, nothing holds them."""
    import asyncio
    import gc
    import weakref

    from pgsandbox.drivers import asyncpg as asyncpg_driver
    from pgsandbox.drivers import psycopg2 as psycopg2_driver
    from pgsandbox.drivers import psycopg_async
    from pgsandbox.isolation.guests import is_active

    def ours(conn: object) -> list[str]:
        return [name for name in dir(conn) if "pgsandbox" in name]

    seen: dict[str, list[weakref.ref[Any]]] = {}

    async def two_tests(sandbox: Any) -> None:
        for n in range(2):
            with sandbox.database("transaction", f"test_{n}") as db:
                conn = psycopg2_driver.connect(db)
                assert is_active(conn) and not ours(conn)
                with conn.cursor() as cursor:
                    cursor.execute("insert into items (name) values ('psycopg2')")
                conn.commit()  # a savepoint: the test still rolls it back
                psycopg2_driver.close(db, conn)
                assert not is_active(conn)
                seen.setdefault("psycopg2", []).append(weakref.ref(conn))
                for driver in (asyncpg_driver, psycopg_async):
                    aconn = await driver.connect(db)
                    assert is_active(aconn) and not ours(aconn)
                    await aconn.execute("insert into items (name) values ('async')")
                    await driver.close(db, aconn, park=n == 0)  # parked for the next test, then closed
                    assert not is_active(aconn)
                    seen.setdefault(driver.LABEL, []).append(weakref.ref(aconn))
                assert db.fetchval(COUNT) == 0  # each guest's work was rolled back
                del conn, aconn

    with _sandbox_with_items(tmp_path, shared_dsn) as sandbox:
        asyncio.run(two_tests(sandbox))
    # the second test took the connection the first one parked
    assert all(refs[0]() is refs[1]() for refs in seen.values())
    gc.collect()
    assert [label for label, refs in seen.items() if any(ref() is not None for ref in refs)] == []


def test_the_pg_handle_shows_the_user_only_its_api(tmp_path: Path, shared_dsn: str) -> None:
    """The drivers' and the sandbox's plumbing is not among the handle's public names."""
    with _sandbox_with_items(tmp_path, shared_dsn) as sandbox, sandbox.database("transaction", "test_x") as db:
        public = {name for name in dir(db) if not name.startswith("_")}
    plumbing = {"joined", "guest_begin", "park", "unpark", "session_state", "guest_escaped", "guests", "drivers"}
    assert not public & (plumbing | {"server_objects", "catalog_source"})
    users = {"connect", "connection", "execute", "fetch", "fetchone", "fetchval", "dsn", "url", "env", "params"}
    users |= {"info", "insert", "insert_many", "ainsert", "ainsert_many", "rows", "seed", "connect_admin"}
    assert users | {"name", "test_id", "isolation", "keep", "database_url"} <= public


def test_a_synchronous_adapter_step_runs_without_an_event_loop_and_may_not_wait() -> None:
    """psycopg2's steps are the protocol's coroutines run to their end at once; one that waits is a bug."""
    import asyncio

    from pgsandbox.drivers.guests import run_sync

    async def at_once() -> int:
        return 7

    async def waits() -> None:
        await asyncio.sleep(0)

    assert run_sync(at_once()) == 7
    with pytest.raises(RuntimeError, match="a synchronous adapter's step waited for something"):
        run_sync(waits())
