"""Each form pgsandbox gives (pg.dsn, pg.database_url, pg.url(...), pg.env) with the libraries that take it."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from urllib.parse import urlparse

import pytest

pytestmark = pytest.mark.pg(isolation="database")  # the libraries' connections are the app's own


def urls(pg):
    return [pg.url(), pg.url("psycopg2"), pg.url("asyncpg"), pg.url("postgresql"), pg.database_url]


def test_urlparse_finds_host_and_port_in_every_url(pg):
    for url in urls(pg):
        parsed = urlparse(url)
        assert (parsed.hostname, parsed.port, parsed.path) == ("127.0.0.1", pg.info.port, f"/{pg.name}"), url


def test_alembic_config_keeps_every_url(pg):
    from alembic.config import Config

    for url in urls(pg):
        config = Config()
        config.set_main_option("sqlalchemy.url", url)
        assert config.get_main_option("sqlalchemy.url") == url
        interpolated = Config(config_args={"DB_URL": url})
        interpolated.set_main_option("sqlalchemy.url", "%(DB_URL)s")
        assert interpolated.get_main_option("sqlalchemy.url") == url


def test_sqlalchemy_make_url_and_create_engine(pg):
    import sqlalchemy
    from sqlalchemy.engine import make_url

    for url in (pg.url(), pg.url("psycopg2"), pg.database_url):
        parsed = make_url(url)
        assert (parsed.host, parsed.port, parsed.database) == ("127.0.0.1", pg.info.port, pg.name)
        engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
        with engine.connect() as conn:
            assert conn.execute(sqlalchemy.text("select current_database()")).scalar() == pg.name
        engine.dispose()


def test_sqlalchemy_async_engine_on_asyncpg(pg):
    import sqlalchemy
    from sqlalchemy.ext.asyncio import create_async_engine

    async def run():
        engine = create_async_engine(pg.url("asyncpg"), poolclass=sqlalchemy.pool.NullPool)
        async with engine.connect() as conn:
            value = (await conn.execute(sqlalchemy.text("select current_database()"))).scalar()
        await engine.dispose()
        return value

    assert asyncio.run(run()) == pg.name


def test_asyncpg_connect_takes_the_plain_url(pg):
    import asyncpg

    async def run(url):
        conn = await asyncpg.connect(url)
        try:
            return await conn.fetchval("select current_database()")
        finally:
            await conn.close()

    assert asyncio.run(run(pg.database_url)) == pg.name
    assert asyncio.run(run(pg.url("postgresql"))) == pg.name
    with pytest.raises(ValueError, match="invalid DSN"):  # why the table in the README says database_url
        asyncio.run(run(pg.dsn))


def test_psycopg_and_psycopg2_take_the_dsn_and_the_plain_url(pg):
    import psycopg
    import psycopg2

    for target in (pg.dsn, pg.database_url):
        with psycopg.connect(target) as conn:
            assert conn.execute("select current_database()").fetchone() == (pg.name,)
        conn2 = psycopg2.connect(target)
        try:
            with conn2.cursor() as cursor:
                cursor.execute("select current_database()")
                assert cursor.fetchone() == (pg.name,)
        finally:
            conn2.close()


def psql(pg_server, env):
    """psql from the server's own installation (else PATH), with only ``env``'s libpq variables."""
    bindir = getattr(pg_server, "installation", None) and pg_server.installation.bindir
    program = bindir / "psql" if bindir and (bindir / "psql").exists() else shutil.which("psql")
    if program is None:
        pytest.skip("no psql beside the server nor on PATH")
    clean = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
    query = "select current_user, current_database(), inet_server_port()"
    out = subprocess.run(
        [str(program), "-XAtc", query], env={**clean, **env}, capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


def test_libpq_in_a_subprocess_with_pg_env(pg, pg_server):
    assert psql(pg_server, pg.env) == f"{pg.params['user']}|{pg.name}|{pg.info.port}"


def test_libpq_in_a_subprocess_with_pg_login_env(pg_login, pg_server):
    assert psql(pg_server, pg_login.env) == f"{pg_login.user}|{pg_login.dbname}|{pg_login.params['port']}"
