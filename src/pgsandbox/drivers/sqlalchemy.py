"""``pg_engine``/``pg_session`` and ``pg_async_engine``/``pg_async_session`` (extra ``[sqlalchemy]``).

``transaction`` isolation: the engine's pool holds one connection, the test's (``StaticPool``): the sync
engine runs on the connection of ``pg``/``pg_conn`` (so they all see each other's writes), the async engine
on the test's ``pg_aconn`` or ``pg_asyncpg`` connection. Commits through the engine move the test's
savepoint, and sessions follow SQLAlchemy's recipe for joining an external transaction
(``join_transaction_mode="create_savepoint"``): ``session.commit()`` releases a savepoint.
``database`` isolation: an ordinary engine on the test's own database, disposed after the test.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

from pgsandbox.drivers import require
from pgsandbox.errors import ConfigError
from pgsandbox.isolation.connection import AsyncSandboxConnection
from pgsandbox.isolation.guests import state_of
from pgsandbox.isolation.roles import Run, run_psycopg

if TYPE_CHECKING:
    from sqlalchemy import Engine
    from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
    from sqlalchemy.orm import Session

    from pgsandbox.sandbox import Database

require("sqlalchemy", "sqlalchemy", "pgsandbox.drivers.sqlalchemy")

from sqlalchemy import create_engine, event  # noqa: E402
from sqlalchemy.orm import Session as _Session  # noqa: E402
from sqlalchemy.pool import StaticPool  # noqa: E402

ASYNC_DRIVERS = ("asyncpg", "psycopg")

# Where SQLAlchemy's asyncpg adapter keeps its transaction, with the value meaning "none begun": 2.1 has
# ``_transaction`` alone; 2.0 also a ``_started`` flag, which alone decides whether the adapter begins, commits
# or rolls back a transaction (left True with no transaction, commit and rollback fail on None)
_ADAPTER_TRANSACTION_STATE: dict[str, Any] = {"_transaction": None, "_started": False}


def _record_pids(engine: Engine, db: Database, pid: Any, run: Run, asynchronous: bool = False) -> None:
    """Connections the engine opens are the test's own, not leaks to warn about; a pg.as_role block reaches
    them with ``run`` (its library's way of running a statement)."""

    def connected(dbapi_connection: Any, record: Any) -> None:
        db._test.joined(pid(dbapi_connection))
        raw = getattr(dbapi_connection, "driver_connection", dbapi_connection)
        is_closed = (lambda c: bool(c.is_closed())) if hasattr(raw, "is_closed") else (lambda c: bool(c.closed))
        db._test.roles.track(
            raw, run, asynchronous=asynchronous, in_transaction=False, label="SQLAlchemy", is_closed=is_closed
        )

    event.listen(engine, "connect", connected)


def _levels(engine: Engine) -> None:
    """Each pool checkout gets a savepoint of its own on the test's shared connection: closing a SQLAlchemy
    ``Connection`` rolls back, and that must undo only its own work, not the session's or ``pg_conn``'s."""

    def checkout(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        raw = getattr(dbapi_connection, "driver_connection", dbapi_connection)
        own = not state_of(raw).fixture_checkout
        if hasattr(dbapi_connection, "_start_transaction"):
            # SQLAlchemy's asyncpg adapter keeps one asyncpg transaction per connection: put the current one
            # aside, so this checkout begins its own, nested (a savepoint), and rolls back only that
            saved = state_of(raw).adapter_transactions
            names = [name for name in _ADAPTER_TRANSACTION_STATE if hasattr(dbapi_connection, name)]
            saved.append((own, {name: getattr(dbapi_connection, name) for name in names}))
            if own:
                for name in names:
                    setattr(dbapi_connection, name, _ADAPTER_TRANSACTION_STATE[name])
        elif hasattr(dbapi_connection, "run_async"):  # the adapter around an async psycopg connection
            dbapi_connection.run_async(lambda conn: conn.enter_level(own))
        else:
            dbapi_connection.enter_level(own)

    def checkin(dbapi_connection: Any, record: Any) -> None:
        if dbapi_connection is None:
            return
        raw = getattr(dbapi_connection, "driver_connection", dbapi_connection)
        if hasattr(dbapi_connection, "_start_transaction"):
            saved = state_of(raw).adapter_transactions
            if saved:
                own, state = saved.pop()
                if own:
                    for name, value in state.items():
                        setattr(dbapi_connection, name, value)
        elif hasattr(dbapi_connection, "run_async"):
            dbapi_connection.run_async(lambda conn: conn.leave_level())
        else:
            dbapi_connection.leave_level()

    event.listen(engine, "checkout", checkout)
    event.listen(engine, "checkin", checkin)


@contextlib.contextmanager
def _fixture_checkout(conn: Any) -> Iterator[None]:
    """The session fixture's own checkout lasts the whole test and is never committed: no savepoint."""
    raw = conn.driver_connection if hasattr(conn, "driver_connection") else conn
    state = state_of(raw)
    state.fixture_checkout = True
    try:
        yield
    finally:
        state.fixture_checkout = False


def session_class(spec: str | type | None, source: str, asynchronous: bool = False) -> type:
    """The class a session fixture is made of: ``spec`` is a class (from the marker), ``module:Class`` (an
    option) or None for SQLAlchemy's own. ``source`` names where it was set, for the messages."""
    base: type = _Session
    example = "sqlmodel:Session"
    if asynchronous:
        from sqlalchemy.ext.asyncio import AsyncSession

        base, example = AsyncSession, "sqlmodel.ext.asyncio.session:AsyncSession"
    if spec is None:
        return base

    def bad(reason: str, fix: str = "") -> ConfigError:
        return ConfigError(
            f"{source}: bad value {spec!r}: {reason}.",
            fix
            or f"fix {source}; it takes a subclass of SQLAlchemy's {base.__qualname__} as module:Class, "
            f"such as {example}.",
        )

    found: Any = spec
    if isinstance(spec, str):
        module_name, _, attribute = spec.partition(":")
        if not module_name or not attribute:
            raise bad("not of the form module:Class")
        try:
            found = importlib.import_module(module_name)
        except ImportError as error:
            raise bad(
                f"cannot import {module_name} ({error})",
                f"install {module_name.partition('.')[0]} in the tests' environment, or fix {source}.",
            ) from None
        for name in attribute.split("."):
            found = getattr(found, name, None)
            if found is None:
                raise bad(f"{module_name} has no {attribute}")
    if not (isinstance(found, type) and issubclass(found, base)):
        raise bad(f"{found!r} is not a subclass of {base.__module__}.{base.__qualname__}")
    return found


# -- sync ----------------------------------------------------------------------------------------------------
def engine(db: Database) -> Engine:
    """The test's engine. In ``transaction`` isolation one engine per session connection, made once."""
    if db.isolation == "database":
        # password "": libpq reads the URL's passfile even when PGPASSWORD is set (server/passfile.py)
        made = create_engine(db.url("psycopg"), connect_args={"application_name": db.application_name, "password": ""})
        _record_pids(made, db, lambda c: c.info.backend_pid, run_psycopg)
        return made
    conn: Any = db.connection
    # one engine per session connection, kept as long as the session database (made again for a new connection)
    state = db._test.session_state if db._test.session_state is not None else {}
    made_for: tuple[Any, Engine] | None = state.get("engine psycopg")
    if made_for is None or made_for[0] is not conn:
        # no reset on return: closing a SQLAlchemy Connection already rolls its own transaction back
        cached = create_engine(db.url("psycopg"), creator=lambda: conn, poolclass=StaticPool, pool_reset_on_return=None)
        # SQLAlchemy rolls back after reading the server's settings on its first connection: that rollback
        # would undo what the test's fixtures wrote so far
        state_of(conn).quiet_rollback = True
        try:
            with cached.connect():
                pass
        finally:
            state_of(conn).quiet_rollback = False
        _levels(cached)
        made_for = state["engine psycopg"] = (conn, cached)
    return made_for[1]


def sqlalchemy_engine(db: Database) -> Engine:
    """A SQLAlchemy engine on ``db`` made as ``pg_engine``'s is, for a scope handle's fixtures (``pg_module``,
    ``pg_class``, ``pg_package``, ``pg_session_data``): a login, the app's own code run once for a module. In
    ``transaction`` isolation its one connection is the handle's, SQLAlchemy's own rollbacks (after its first
    connect, when a ``Connection`` closes) undo only what it did since, and ``commit()`` moves a savepoint: the
    scope's rows stay. (An engine made with ``creator=lambda: pg_module.connection`` rolls the scope back to its
    start on its first connect.) In ``database`` isolation it connects to the scope's own database; dispose of it
    when the fixture ends."""
    return engine(db)


def dispose(db: Database, made: Engine) -> None:
    if db.isolation == "database":
        made.dispose()


@contextlib.contextmanager
def session(db: Database, made: Engine, cls: type[Session] = _Session) -> Iterator[Session]:
    """``cls``: the app's Session class (a subclass of SQLAlchemy's, such as ``sqlmodel.Session``)."""
    if db.isolation == "database":
        with cls(made) as plain:
            yield plain
        return
    with _fixture_checkout(db.connection):
        connection = made.connect()
    outer = connection.begin()
    joined = cls(bind=connection, join_transaction_mode="create_savepoint")
    try:
        yield joined
    finally:
        try:
            if db.keep:  # keep what the failed test wrote: commit the session's savepoint, then the test's
                with contextlib.suppress(Exception):
                    joined.commit()
                outer.commit()
            joined.close()
            if outer.is_active:
                outer.rollback()
        finally:
            connection.close()


# -- asyncio ---------------------------------------------------------------------------------------------------
def check_async_driver(driver: str) -> None:
    if driver == "asyncpg":
        require("asyncpg", "asyncpg", "pg_async_engine with pg_async_driver = asyncpg")
    require("sqlalchemy.ext.asyncio", "sqlalchemy", "pg_async_engine")
    require("greenlet", "sqlalchemy", "SQLAlchemy's asyncio extension (pg_async_engine)")


async def async_engine(db: Database, driver: str, connection: Any | None) -> AsyncEngine:
    """``connection``: in ``transaction`` isolation, the test's own async connection of that driver."""
    from sqlalchemy.ext.asyncio import create_async_engine

    url = db.url(driver)
    if connection is None:
        if driver == "asyncpg":
            from pgsandbox.drivers import asyncpg as adapter

            made = create_async_engine(
                url,
                connect_args={
                    "server_settings": {"application_name": db.application_name},
                    "password": functools.partial(adapter.read_password, db),
                },
            )
            _record_pids(
                made.sync_engine, db, lambda c: c.driver_connection.get_server_pid(), adapter.ADAPTER.run, True
            )
        else:
            from pgsandbox.drivers import psycopg_async

            made = create_async_engine(url, connect_args={"application_name": db.application_name, "password": ""})
            _record_pids(
                made.sync_engine, db, lambda c: c.driver_connection.info.backend_pid, psycopg_async.ADAPTER.run, True
            )
        return made

    # One engine per session and driver: its dialect reads the server's settings once (about 4 ms), and its
    # pool, emptied after each test, takes the test's connection from ``current``.
    state = db._test.session_state if db._test.session_state is not None else {}
    key = f"async engine {driver}"
    if key in state:
        made, current = state[key]
        current[0] = connection
        return made  # type: ignore[no-any-return]
    current = [connection]

    async def handed() -> Any:
        return current[0]

    made = create_async_engine(url, async_creator=handed, poolclass=StaticPool, pool_reset_on_return=None)
    quiet = isinstance(connection, AsyncSandboxConnection)  # psycopg's: SQLAlchemy's first rollback is real
    if quiet:
        state_of(connection).quiet_rollback = True
    try:
        async with made.connect():
            pass
    finally:
        if quiet:
            state_of(connection).quiet_rollback = False
    _levels(made.sync_engine)
    state_of(made.sync_engine).current = current
    state[key] = (made, current)
    return made


def current_connection(made: AsyncEngine) -> Any:
    """The test's connection an engine of :func:`async_engine` hands out (None in ``database`` isolation)."""
    current = state_of(made.sync_engine).current
    return current[0] if current else None


async def async_dispose(db: Database, made: AsyncEngine) -> None:
    # transaction isolation: the connection is the test's, closed by its owner; only the pool goes, the
    # engine stays for the next test
    await made.dispose(close=db.isolation == "database")


@contextlib.asynccontextmanager
async def async_session(
    db: Database, made: AsyncEngine, cls: type[AsyncSession] | None = None
) -> AsyncIterator[AsyncSession]:
    """``cls``: the app's AsyncSession class (such as SQLModel's), SQLAlchemy's by default."""
    from sqlalchemy.ext.asyncio import AsyncSession

    made_of = cls or AsyncSession
    if db.isolation == "database":
        async with made_of(made) as plain:
            yield plain
        return
    raw = current_connection(made)
    with _fixture_checkout(raw) if raw is not None else contextlib.nullcontext():
        connection = await made.connect()
    outer = await connection.begin()
    joined = made_of(bind=connection, join_transaction_mode="create_savepoint")
    try:
        yield joined
    finally:
        try:
            if db.keep:
                with contextlib.suppress(Exception):
                    await joined.commit()
                await outer.commit()
            await joined.close()
            if outer.is_active:
                await outer.rollback()
        finally:
            await connection.close()
