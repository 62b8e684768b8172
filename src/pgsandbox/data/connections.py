"""Run the data factories' statements on whatever connection a test has, without importing any library that
is not already in use: psycopg 3 (sync and async), psycopg2, asyncpg, SQLAlchemy (sessions and connections,
sync and async). Statements come with ``%s`` placeholders (``%%`` for a literal ``%``)."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any

from pgsandbox.errors import PgSandboxError

Execute = Callable[[str, list[Any]], dict[str, Any]]
AsyncExecute = Callable[[str, list[Any]], Awaitable[dict[str, Any]]]
_PLACEHOLDER = re.compile(r"%(s|%)")


def _library(conn: Any) -> str:
    for cls in type(conn).__mro__:
        root = cls.__module__.split(".")[0]
        if root in ("psycopg", "psycopg2", "asyncpg", "sqlalchemy"):
            return f"{root}.{cls.__name__}"
    return type(conn).__module__ + "." + type(conn).__qualname__


def numbered(query: str, marker: Callable[[int], str]) -> str:
    """``query`` with its ``%s`` placeholders written as ``marker(1)``, ``marker(2)``... and ``%%`` as ``%``."""
    counter = iter(range(1, 1 << 30))
    return _PLACEHOLDER.sub(lambda m: marker(next(counter)) if m[1] == "s" else "%", query)


def executor(conn: Any) -> Execute:
    """How to run one statement and get its row as a dict on the blocking connection ``conn``."""
    library = _library(conn)
    if library.startswith("psycopg."):
        from psycopg.rows import dict_row

        return _on_cursor(lambda: conn.cursor(row_factory=dict_row))
    if library.startswith("psycopg2."):
        from psycopg2.extras import RealDictCursor

        return _on_cursor(lambda: conn.cursor(cursor_factory=RealDictCursor))
    if library.startswith("sqlalchemy.") and not library.split(".")[1].startswith("Async"):
        from sqlalchemy import text

        def run_sqlalchemy(query: str, params: list[Any]) -> dict[str, Any]:
            statement = text(numbered(query, lambda n: f":p{n}"))
            result = conn.execute(statement, {f"p{n}": value for n, value in enumerate(params, 1)})
            return dict(result.mappings().one())

        return run_sqlalchemy
    raise PgSandboxError(
        f"pg.insert cannot use a {library} as its connection.",
        "pass a psycopg or psycopg2 connection, or a SQLAlchemy Session or Connection (await pg.ainsert(...) "
        "for an asyncpg, async psycopg or async SQLAlchemy one).",
    )


def dict_cursor(conn: Any, dict_rows: bool) -> Any:
    """A new cursor of the DB-API connection ``conn`` (psycopg 3 or psycopg2) whose rows are dicts when
    ``dict_rows``, tuples otherwise."""
    if not dict_rows:
        return conn.cursor()
    library = _library(conn)
    if library.startswith("psycopg2."):
        from psycopg2.extras import RealDictCursor

        return conn.cursor(cursor_factory=RealDictCursor)
    from psycopg.rows import dict_row

    return conn.cursor(row_factory=dict_row)


def _on_cursor(cursor: Callable[[], Any]) -> Execute:
    """Run a statement on a new cursor (one that yields dict-like rows) of a DB-API connection."""

    def run(query: str, params: list[Any]) -> dict[str, Any]:
        with cursor() as opened:
            opened.execute(query, params)
            return dict(opened.fetchone())

    return run


def async_executor(conn: Any) -> AsyncExecute:
    """How to run one statement and get its row as a dict on the async connection ``conn``."""
    library = _library(conn)
    if library.startswith("asyncpg."):

        async def run_asyncpg(query: str, params: list[Any]) -> dict[str, Any]:
            return dict(await conn.fetchrow(numbered(query, lambda n: f"${n}"), *params))

        return run_asyncpg
    if library.startswith("psycopg."):
        from psycopg.rows import dict_row

        async def run_psycopg(query: str, params: list[Any]) -> dict[str, Any]:
            async with conn.cursor(row_factory=dict_row) as cursor:
                await cursor.execute(query, params)
                return dict(await cursor.fetchone())

        return run_psycopg
    if library.startswith("sqlalchemy.Async"):
        from sqlalchemy import text

        async def run_sqlalchemy(query: str, params: list[Any]) -> dict[str, Any]:
            statement = text(numbered(query, lambda n: f":p{n}"))
            result = await conn.execute(statement, {f"p{n}": value for n, value in enumerate(params, 1)})
            return dict(result.mappings().one())

        return run_sqlalchemy
    raise PgSandboxError(
        f"await pg.ainsert cannot use a {library} as its connection.",
        "pass an asyncpg or async psycopg connection, or a SQLAlchemy AsyncSession or AsyncConnection "
        "(pg.insert(...) for a blocking one).",
    )
