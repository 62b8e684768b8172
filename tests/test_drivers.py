"""Every client library gets the same guarantees: a write in one test is gone in the next, and commits made
by the code under test stay inside the test's isolation, in both isolation modes."""

from __future__ import annotations

import textwrap

import pytest

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
    pytester.makefile(
        ".toml",
        pyproject='[tool.pytest.ini_options]\npg_migrations = ["sql:migrations"]\n'
        'asyncio_default_fixture_loop_scope = "function"\n' + ini,
    )
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
    result = pytester.runpytest(f"--pg-dsn={shared_dsn}", f"--pg-isolation={isolation}", "-p", "no:randomly", "-W", "error::pgsandbox.errors.PgSandboxWarning")
    result.assert_outcomes(passed=18)
