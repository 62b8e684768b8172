"""The fixtures: ``pg_sandbox`` and ``pg_server`` for the session; per test ``pg``, ``pg_conn`` and one
fixture per client library (adapters in :mod:`pgsandbox.drivers`, imported when their fixture is used)."""

from __future__ import annotations

import contextlib
import importlib
import warnings
from collections.abc import AsyncIterator, Iterator
from types import ModuleType
from typing import TYPE_CHECKING, Any, NoReturn

import pytest

from pgsandbox.errors import PgSandboxError, PgSandboxWarning
from pgsandbox.pytest import state
from pgsandbox.pytest.markers import marker_options

if TYPE_CHECKING:
    import asyncpg
    import psycopg
    import psycopg2.extensions
    from sqlalchemy import Engine
    from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
    from sqlalchemy.orm import Session

    from pgsandbox.sandbox import Database, Sandbox, SessionLogin
    from pgsandbox.sandbox.queries import Queries
    from pgsandbox.server import Server

try:
    import pytest_asyncio
except ImportError:  # the async fixtures then say which extra to install
    pytest_asyncio = None  # type: ignore[assignment]


@pytest.fixture(scope="session")
def pg_sandbox(request: pytest.FixtureRequest) -> Iterator[Sandbox]:
    """The session's server with its templates built: hands out each test's database."""
    sandbox = state.session_sandbox(request.config, request.session)
    try:
        yield sandbox
    finally:
        state.stop_sandbox(request.config, sandbox)


@pytest.fixture(scope="session")
def pg_server(pg_sandbox: Sandbox) -> Server:
    """The session's PostgreSQL server: a local throwaway one, or the configured external one.

    ``pg_server.version``, ``.dsn`` (admin; its password is in the passfile it names; ``.reveal_password()``),
    ``.connect(dbname=None)``, ``.create_database(name=None, template=None)``, ``.drop_database(name)``.
    """
    return pg_sandbox.server


@pytest.fixture(scope="session")
def pg_login(pg_sandbox: Sandbox) -> SessionLogin:
    """The tests' role (not the admin's) for session-scoped fixtures, worker subprocesses and a framework's own
    test database: ``dsn``, ``database_url``, ``url(driver)``, ``env``, ``connect()``. They name a database of
    the session's own (``dbname``), cloned from the template; it is not rolled back between tests."""
    try:
        return pg_sandbox.session_login()
    except PgSandboxError as error:
        fail(error)


@pytest.fixture
def pg(request: pytest.FixtureRequest, pg_sandbox: Sandbox) -> Database:
    """This test's database, migrated and seeded: ``dsn``, ``url()``, ``info``, ``env``, ``connect()``,
    ``execute()``, ``fetch()``. Rolled back (``transaction`` isolation) or dropped (``database``) after the test."""
    return sandbox_database(request, pg_sandbox)


@pytest.fixture
def pg_conn(request: pytest.FixtureRequest, pg_sandbox: Sandbox) -> psycopg.Connection[Any]:
    """A psycopg 3 connection inside the test's isolation (``commit()`` becomes a savepoint in
    ``transaction`` isolation)."""
    return sandbox_database(request, pg_sandbox).connection


@pytest.fixture
def pg_admin(request: pytest.FixtureRequest, pg_sandbox: Sandbox) -> psycopg.Connection[Any]:
    """A psycopg connection to the test's database as the admin (a superuser on a local server), in autocommit:
    for what the tests' own role may not do. It is outside the test's transaction, so what it changes is
    committed: in ``transaction`` isolation a write through it is reported as an escape."""
    return sandbox_database(request, pg_sandbox).connect_admin()


@pytest.fixture
def pg_psycopg2(request: pytest.FixtureRequest, pg_sandbox: Sandbox) -> Iterator[psycopg2.extensions.connection]:
    """A psycopg2 connection inside the test's isolation (extra ``[psycopg2]``): in ``transaction``
    isolation its own transaction on the session database, ``commit()`` moving a savepoint."""
    driver = load_driver("psycopg2", "pg_psycopg2")
    db = sandbox_database(request, pg_sandbox)
    conn = driver.connect(db)
    try:
        yield conn
    finally:
        driver.close(db, conn)


@pytest.fixture
def pg_engine(request: pytest.FixtureRequest, pg_sandbox: Sandbox) -> Iterator[Engine]:
    """A SQLAlchemy engine on the test's database (extra ``[sqlalchemy]``). In ``transaction`` isolation
    its one connection is the test's (``pg_conn``'s) and commits through it move a savepoint."""
    driver = load_driver("sqlalchemy", "pg_engine")
    db = sandbox_database(request, pg_sandbox)
    engine = driver.engine(db)
    try:
        yield engine
    finally:
        driver.dispose(db, engine)


@pytest.fixture
def pg_session(request: pytest.FixtureRequest, pg_sandbox: Sandbox, pg_engine: Engine) -> Iterator[Session]:
    """A SQLAlchemy ``Session`` on ``pg_engine``. In ``transaction`` isolation it is joined to the test's
    transaction (``join_transaction_mode="create_savepoint"``): ``session.commit()`` releases a savepoint."""
    from pgsandbox.drivers import factoryboy

    driver = load_driver("sqlalchemy", "pg_session")
    db = sandbox_database(request, pg_sandbox)
    made_of = session_class(request, pg_sandbox, driver, "session_class")
    with driver.session(db, pg_engine, made_of) as session, factoryboy.using(session):
        yield session


@pytest.fixture
def pg_queries(request: pytest.FixtureRequest, pg_sandbox: Sandbox) -> Queries:
    """Count and list the statements a block runs, on every connection of the test: ``with pg_queries(2):``
    fails, listing them, unless the block ran exactly 2 (``at_most=2``: at most 2); ``with pg_queries() as ran:``
    only records (``ran.count``, ``ran.sql``, ``print(ran)``). Transaction control is not counted.

    For example::

        with pg_queries(2):
            list_orders(session)

    Needs the statement log of the local server (``pg_sql_log``, on by default)."""
    from pgsandbox.sandbox.queries import Queries
    from pgsandbox.server.statement_log import StatementLogError

    db = sandbox_database(request, pg_sandbox)
    if pg_sandbox.server.statement_log is None:
        try:
            pg_sandbox.diagnostics.sql_of(db)
        except StatementLogError as error:
            fail(error)
    return Queries(pg_sandbox, db)


def session_class(request: pytest.FixtureRequest, sandbox: Sandbox, driver: ModuleType, option: str) -> Any:
    """The app's Session class for ``pg_session``/``pg_async_session``: the marker's, else the option's."""
    options = marker_options(request.node)
    if option in options:
        spec, source = options[option], f"@pytest.mark.pg({option}=...)"
    else:
        spec, source = getattr(sandbox.settings, option), sandbox.settings.source_of(option)
    try:
        return driver.session_class(spec, source, asynchronous=option == "async_session_class")
    except PgSandboxError as error:
        fail(error)


def fail(error: PgSandboxError) -> NoReturn:
    """Fail the test with the error's message alone: no traceback, no "during handling" chain."""
    raise pytest.fail.Exception(f"pgsandbox: {error}", pytrace=False) from None


def load_driver(name: str, fixture: str | None = None) -> ModuleType:
    """``pgsandbox.drivers.<name>``; a missing library fails the test with the extra to install (and the
    ``fixture`` that needs it)."""
    from pgsandbox.drivers import missing
    from pgsandbox.errors import MissingExtra

    try:
        return importlib.import_module(f"pgsandbox.drivers.{name}")
    except MissingExtra as error:
        fail(missing(error.module, error.extra, fixture) if fixture else error)
    except PgSandboxError as error:
        fail(error)


def async_driver_name(request: pytest.FixtureRequest, sandbox: Sandbox) -> str:
    from pgsandbox.settings import ASYNC_DRIVERS

    driver = str(marker_options(request.node).get("async_driver", sandbox.settings.async_driver))
    if driver not in ASYNC_DRIVERS:
        pytest.fail(
            f"pgsandbox: @pytest.mark.pg(async_driver={driver!r}) is not one of {', '.join(ASYNC_DRIVERS)}.",
            pytrace=False,
        )
    return driver


@contextlib.asynccontextmanager
async def async_connection(request: pytest.FixtureRequest, db: Database, driver: str) -> AsyncIterator[Any]:
    """The test's async connection of ``driver``, shared by ``pg_asyncpg``/``pg_aconn`` and the async
    SQLAlchemy fixtures; the fixture that opened it ends it (parked for the next test when the event loop
    outlives the test)."""
    conn = db._test.drivers.get(driver)
    if conn is not None:
        yield conn
        return
    module = load_driver("asyncpg" if driver == "asyncpg" else "psycopg_async")
    conn = await module.connect(db)
    db._test.drivers[driver] = conn
    try:
        yield conn
    finally:
        del db._test.drivers[driver]
        await module.close(db, conn, park=loop_outlives_test(request.config))


def loop_outlives_test(config: pytest.Config) -> bool:
    """Whether pytest-asyncio runs our (function-scoped) fixtures in a loop that serves more than one test."""
    try:
        scope = config.getini("asyncio_default_fixture_loop_scope")
    except ValueError:
        return False
    return scope in ("class", "module", "package", "session")


if pytest_asyncio is not None:

    @pytest_asyncio.fixture
    async def pg_aconn(
        request: pytest.FixtureRequest, pg_sandbox: Sandbox
    ) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A psycopg 3 ``AsyncConnection`` inside the test's isolation (needs pytest-asyncio)."""
        db = sandbox_database(request, pg_sandbox)
        async with async_connection(request, db, "psycopg") as conn:
            yield conn

    @pytest_asyncio.fixture
    async def pg_asyncpg(request: pytest.FixtureRequest, pg_sandbox: Sandbox) -> AsyncIterator[asyncpg.Connection]:
        """An asyncpg connection inside the test's isolation (extra ``[asyncpg]``): its ``transaction()``
        blocks are savepoints inside the test's transaction."""
        load_driver("asyncpg", "pg_asyncpg")
        db = sandbox_database(request, pg_sandbox)
        async with async_connection(request, db, "asyncpg") as conn:
            yield conn

    @pytest_asyncio.fixture
    async def pg_async_engine(request: pytest.FixtureRequest, pg_sandbox: Sandbox) -> AsyncIterator[AsyncEngine]:
        """A SQLAlchemy ``AsyncEngine`` on the test's database; its driver is ``pg_async_driver`` (asyncpg
        or psycopg). In ``transaction`` isolation its one connection is the test's ``pg_asyncpg``/``pg_aconn``."""
        driver_name = async_driver_name(request, pg_sandbox)
        driver = load_driver("sqlalchemy", "pg_async_engine")
        try:
            driver.check_async_driver(driver_name)
        except PgSandboxError as error:
            fail(error)
        db = sandbox_database(request, pg_sandbox)
        async with contextlib.AsyncExitStack() as stack:
            conn = None
            if db.isolation == "transaction":
                conn = await stack.enter_async_context(async_connection(request, db, driver_name))
            engine = await driver.async_engine(db, driver_name, conn)
            try:
                yield engine
            finally:
                await driver.async_dispose(db, engine)

    @pytest_asyncio.fixture
    async def pg_async_session(
        request: pytest.FixtureRequest, pg_sandbox: Sandbox, pg_async_engine: AsyncEngine
    ) -> AsyncIterator[AsyncSession]:
        """A SQLAlchemy ``AsyncSession`` on ``pg_async_engine``, joined to the test's transaction like
        ``pg_session``."""
        from pgsandbox.drivers import factoryboy

        driver = load_driver("sqlalchemy", "pg_async_session")
        db = sandbox_database(request, pg_sandbox)
        made_of = session_class(request, pg_sandbox, driver, "async_session_class")
        async with driver.async_session(db, pg_async_engine, made_of) as session:
            with factoryboy.using_async(session):
                yield session

else:

    def _needs_pytest_asyncio(fixture: str, extra: str) -> Any:
        def missing() -> None:
            """Stands in for an async fixture when pytest-asyncio is missing: says which extra to install."""
            pytest.fail(
                f"pgsandbox: {fixture} is an async fixture and needs pytest-asyncio, which is not installed.\n"
                f"  What to do: pip install 'pytest-pgsandbox[{extra}]'.",
                pytrace=False,
            )

        missing.__name__ = fixture
        return pytest.fixture(name=fixture)(missing)

    pg_aconn = _needs_pytest_asyncio("pg_aconn", "asyncio")
    pg_asyncpg = _needs_pytest_asyncio("pg_asyncpg", "asyncpg")
    pg_async_engine = _needs_pytest_asyncio("pg_async_engine", "sqlalchemy,asyncpg")
    pg_async_session = _needs_pytest_asyncio("pg_async_session", "sqlalchemy,asyncpg")


def sandbox_database(request: pytest.FixtureRequest, sandbox: Sandbox, isolation: str | None = None) -> Database:
    """The test's :class:`Database`, shared by every pgsandbox fixture the test uses. The first fixture to
    ask opens it and closes it at its teardown, which comes after the others' (pytest tears down in
    reverse order). Fixtures call this instead of depending on ``pg``: one fixture less per test. ``isolation``:
    what the test needs whatever the marker says (a Django ``transaction=True`` test: ``database``)."""
    node = request.node
    db: Database | None = node.stash.get(state.DATABASE_KEY, None)
    if db is not None:
        return db
    options = marker_options(node)
    guard = guard_policy(options, sandbox)
    try:
        db = sandbox.open(isolation or options.get("isolation"), node.nodeid)
    except PgSandboxError as error:
        fail(error)
    node.stash[state.DATABASE_KEY] = db
    node.stash[state.LOG_KEY] = db
    from pgsandbox.drivers import factoryboy

    factoryboy.enter_test(db)  # where TableFactory inserts

    def close() -> None:
        from pgsandbox.isolation.findings import IsolationError

        del node.stash[state.DATABASE_KEY]
        from pgsandbox.drivers import factoryboy

        factoryboy.leave_test(db)
        try:
            findings: list[str] = sandbox.close(
                db,
                keep=node.stash.get(state.KEEP_KEY, False),
                next_test_id=state.next_transaction_test(node, sandbox),
            )
        except IsolationError as error:  # the database was restored: what to say is the guard policy's
            findings = [str(error)]
        except PgSandboxError as error:
            fail(error)
        if not findings or guard == "off":
            return
        if guard == "error":
            pytest.fail("pgsandbox: " + "\n".join(findings), pytrace=False)
        for finding in findings:
            warnings.warn(PgSandboxWarning(finding), stacklevel=1)

    request.addfinalizer(close)
    return db


def guard_policy(options: dict[str, Any], sandbox: Sandbox) -> str:
    """What a teardown finding becomes: ``error`` (a test error), ``warn`` or ``off``; the marker wins."""
    from pgsandbox.settings import GUARDS

    guard = str(options.get("guard", sandbox.settings.guard))
    if guard not in GUARDS:
        pytest.fail(f"pgsandbox: @pytest.mark.pg(guard={guard!r}) is not one of {', '.join(GUARDS)}.", pytrace=False)
    return guard
