"""The fixtures: ``pg_sandbox`` and ``pg_server`` for the session; per test ``pg``, ``pg_conn`` and one
fixture per client library (adapters in :mod:`pgsandbox.drivers`, imported when their fixture is used)."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import types
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


def scoped_database(request: pytest.FixtureRequest, sandbox: Sandbox) -> Iterator[Database]:
    """Data made once for the fixture's scope (``request.node``: a module, class, package or the session), in the
    isolation its marker (or the setting) names: each of its tests starts from it, and it goes after the scope."""
    from pgsandbox.isolation.findings import IsolationError

    node = request.node
    scope_id = node.nodeid or "the session"
    options = marker_options(node)
    try:
        db = sandbox.open_scope(
            scope_id, isolation=options.get("isolation"), reset_sequences=options.get("reset_sequences")
        )
    except PgSandboxError as error:
        fail(error)
    try:
        yield db
    finally:
        try:
            found = sandbox.close_scope(db)
        except IsolationError as error:
            if guard_policy(options, sandbox) != "off":
                fail(error)
            found = []
        except PgSandboxError as error:
            fail(error)
        for finding in found:
            warnings.warn(PgSandboxWarning(finding), stacklevel=1)


@pytest.fixture(scope="module")
def pg_module(request: pytest.FixtureRequest, pg_sandbox: Sandbox) -> Iterator[Database]:
    """Data made once for the module (like Django's ``setUpTestData``): a module-scoped fixture writes through
    it (``execute()``, ``insert()``, ``connection``), every test of the module sees those rows and is rolled
    back to them, and they are rolled back after the module. In database isolation the rows go into a database of the
    module's own, and each test gets a clone of it."""
    yield from scoped_database(request, pg_sandbox)


@pytest.fixture(scope="class")
def pg_class(request: pytest.FixtureRequest, pg_sandbox: Sandbox) -> Iterator[Database]:
    """``pg_module`` for a test class: rows made once for the class, each test rolled back to them."""
    yield from scoped_database(request, pg_sandbox)


@pytest.fixture(scope="package")
def pg_package(request: pytest.FixtureRequest, pg_sandbox: Sandbox) -> Iterator[Database]:
    """``pg_module`` for a package: rows made once for its modules, each test rolled back to them."""
    yield from scoped_database(request, pg_sandbox)


@pytest.fixture(scope="session")
def pg_session_data(request: pytest.FixtureRequest, pg_sandbox: Sandbox) -> Iterator[Database]:
    """``pg_module`` for the whole session: rows made once, each test rolled back to them."""
    yield from scoped_database(request, pg_sandbox)


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
    warn_outside_scope(pg_sandbox, db, "pg_psycopg2")
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
    warn_outside_scope(request.getfixturevalue("pg_sandbox"), db, f"the {driver} connection")
    conn = await module.connect(db)
    db._test.drivers[driver] = conn
    try:
        yield conn
    finally:
        del db._test.drivers[driver]
        await module.close(db, conn, park=loop_outlives_test(request))


def loop_outlives_test(request: pytest.FixtureRequest) -> bool:
    """Whether pytest-asyncio runs our (function-scoped) fixtures in a loop that serves more than one test.
    Under anyio's plugin the loop lasts as long as some async fixture holds it, which a test cannot know:
    its connections are not kept."""
    if async_runner(request) != "pytest-asyncio":
        return False
    try:
        scope = request.config.getini("asyncio_default_fixture_loop_scope")
    except ValueError:
        return False
    return scope in ("class", "module", "package", "session")


# The async fixtures run under pytest-asyncio or under anyio's pytest plugin, whichever runs the test, and
# neither is imported unless a test uses them. They are plain async fixtures: anyio runs such a fixture when
# the test uses its `anyio_backend` fixture; for pytest-asyncio (strict mode runs only the fixtures made with
# `pytest_asyncio.fixture`), pytest_fixture_setup below hands it a twin made that way.
ASYNC_FIXTURES: dict[str, Any] = {}  # name -> the async generator function
_FOR_PYTEST_ASYNCIO: dict[str, Any] = {}  # name -> its twin marked by pytest_asyncio.fixture
PLUGIN_MODULES = {"pytest-asyncio": "pytest_asyncio.plugin", "anyio": "anyio.pytest_plugin"}


def async_fixture(function: Any) -> Any:
    ASYNC_FIXTURES[function.__name__] = function
    return pytest.fixture(function)


def plugin_loaded(config: pytest.Config, runner: str) -> bool:
    """Whether ``runner``'s pytest plugin is registered (by entry point, ``-p`` or ``pytest_plugins``)."""
    module = PLUGIN_MODULES[runner]
    return any(getattr(plugin, "__name__", None) == module for plugin in config.pluginmanager.get_plugins())


def async_runner(request: pytest.FixtureRequest) -> str | None:
    """Which plugin runs this test's async fixtures: ``anyio`` (the test uses ``anyio_backend``, as
    ``@pytest.mark.anyio`` makes it do), ``pytest-asyncio``, or None."""
    if "anyio_backend" in request.fixturenames and plugin_loaded(request.config, "anyio"):
        return "anyio"
    if plugin_loaded(request.config, "pytest-asyncio"):
        return "pytest-asyncio"
    return None


def for_pytest_asyncio(name: str) -> Any:
    twin = _FOR_PYTEST_ASYNCIO.get(name)
    if twin is None:
        import pytest_asyncio

        twin = copy_function(ASYNC_FIXTURES[name])
        pytest_asyncio.fixture(twin)  # marks twin itself; the fixture it returns is not registered
        _FOR_PYTEST_ASYNCIO[name] = twin
    return twin


def copy_function(function: Any) -> Any:
    copy = types.FunctionType(
        function.__code__, function.__globals__, function.__name__, function.__defaults__, function.__closure__
    )
    copy.__qualname__, copy.__doc__, copy.__module__ = function.__qualname__, function.__doc__, function.__module__
    return copy


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_fixture_setup(fixturedef: pytest.FixtureDef[Any], request: pytest.FixtureRequest) -> Any:
    """Before anyio's or pytest-asyncio's own hook: give an async fixture of ours to the plugin that runs the
    test, or a stand-in that says what to do when none does. A user's fixture of the same name is left alone."""
    name = fixturedef.argname
    ours = ASYNC_FIXTURES.get(name)
    if ours is None or fixturedef.func not in (ours, _FOR_PYTEST_ASYNCIO.get(name), _STAND_INS.get(name)):
        return (yield)
    runner = async_runner(request)
    if runner == "anyio":
        backend = request.getfixturevalue("anyio_backend")
        backend_name = backend if isinstance(backend, str) else backend[0]
        function = ours if backend_name == "asyncio" else stand_in(name, on_backend=str(backend_name))
    elif runner == "pytest-asyncio":
        function = for_pytest_asyncio(name)
    else:
        function = stand_in(name)
    # Final in pytest's types, but replacing it is how anyio's and pytest-asyncio's own hooks work too. Left in
    # place after the setup: pytest-asyncio checks, when the test runs, that its fixtures were marked for it.
    fixturedef.func = function  # type: ignore[misc]
    return (yield)


_STAND_INS: dict[str, Any] = {}


def stand_in(name: str, on_backend: str | None = None) -> Any:
    """A sync fixture function that fails the test with what to do (kept per name so the hook knows it)."""
    if on_backend is not None:
        message = (
            f"pgsandbox: {name} runs on asyncio (psycopg's AsyncConnection, asyncpg and SQLAlchemy's asyncio "
            f"need it), and anyio runs this test on {on_backend}.\n"
            '  What to do: run it on asyncio: a fixture `anyio_backend` that returns "asyncio" (in conftest.py), '
            'or @pytest.mark.parametrize("anyio_backend", ["asyncio"]).'
        )
    elif importlib.util.find_spec("pytest_asyncio") is None:
        message = (
            f"pgsandbox: {name} is an async fixture and needs pytest-asyncio, which is not installed.\n"
            "  What to do: pip install 'pytest-pgsandbox[asyncio]'. With anyio's pytest plugin instead, mark "
            "the test @pytest.mark.anyio."
        )
    else:
        message = (
            f"pgsandbox: {name} is an async fixture, and no async test plugin runs this test: pytest-asyncio is "
            "installed but not loaded (-p no:asyncio?), and the test does not use anyio's plugin.\n"
            "  What to do: mark the test @pytest.mark.anyio (anyio's plugin runs it), or let pytest-asyncio load."
        )

    def fixture(**_: Any) -> None:
        pytest.fail(message, pytrace=False)

    fixture.__name__ = name
    _STAND_INS[name] = fixture
    return fixture


@async_fixture
async def pg_aconn(request: pytest.FixtureRequest, pg_sandbox: Sandbox) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """A psycopg 3 ``AsyncConnection`` inside the test's isolation (run by pytest-asyncio or anyio's plugin)."""
    db = sandbox_database(request, pg_sandbox)
    async with async_connection(request, db, "psycopg") as conn:
        yield conn


@async_fixture
async def pg_asyncpg(request: pytest.FixtureRequest, pg_sandbox: Sandbox) -> AsyncIterator[asyncpg.Connection]:
    """An asyncpg connection inside the test's isolation (extra ``[asyncpg]``): its ``transaction()``
    blocks are savepoints inside the test's transaction."""
    load_driver("asyncpg", "pg_asyncpg")
    db = sandbox_database(request, pg_sandbox)
    async with async_connection(request, db, "asyncpg") as conn:
        yield conn


@async_fixture
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


@async_fixture
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
        db = sandbox.open(
            isolation or options.get("isolation"), node.nodeid, reset_sequences=options.get("reset_sequences")
        )
    except PgSandboxError as error:
        fail(error)
    node.stash[state.DATABASE_KEY] = db
    node.stash[state.LOG_KEY] = db
    from pgsandbox.drivers import factoryboy

    factoryboy.enter_test(db)  # where TableFactory inserts
    state.fence_env_at_test(request.config, db)

    def close() -> None:
        from pgsandbox.isolation.findings import IsolationError

        del node.stash[state.DATABASE_KEY]
        state.fence_env_at_session(request.config)
        leave_role = node.stash.get(state.ROLE_KEY, None)
        said: list[warnings.WarningMessage] = []  # leaving the marker's role: said once the database is closed
        if leave_role is not None:
            del node.stash[state.ROLE_KEY]
            with warnings.catch_warnings(record=True) as said:
                warnings.simplefilter("always")
                leave_role()
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
        for warning in said:
            warnings.warn(warning.message, stacklevel=1)
        if not findings or guard == "off":
            return
        if guard == "error":
            pytest.fail("pgsandbox: " + "\n".join(findings), pytrace=False)
        for finding in findings:
            warnings.warn(PgSandboxWarning(finding), stacklevel=1)

    request.addfinalizer(close)
    enter_marker_role(node, db, options)
    return db


def enter_marker_role(node: Any, db: Database, options: dict[str, Any]) -> None:
    """``@pytest.mark.pg(role=..., role_settings=...)``: the whole test runs in a ``pg.as_role`` block, entered
    when its database opens and left at its teardown (before the database is rolled back or dropped)."""
    if "role" not in options:
        if "role_settings" in options:
            pytest.fail(
                "pgsandbox: @pytest.mark.pg(role_settings=...) without role=: the settings go with a role.\n"
                "  What to do: add the role the test runs as, such as @pytest.mark.pg(role='app_rw', "
                "role_settings={...}).",
                pytrace=False,
            )
        return
    try:
        block = db.as_role(options["role"], options.get("role_settings"))
        block.__enter__()
    except PgSandboxError as error:
        fail(error)

    def leave() -> None:
        with contextlib.suppress(Exception):  # a broken connection: the rollback or the drop ends it anyway
            block.__exit__(None, None, None)

    node.stash[state.ROLE_KEY] = leave


def warn_outside_scope(sandbox: Sandbox, db: Database, what: str) -> None:
    """Another client library's connection in transaction isolation is a transaction of its own: it does not
    see the rows a scoped fixture made in the test connection's transaction."""
    scope = sandbox.transaction_scope if db.isolation == "transaction" else None
    if scope is not None:
        warnings.warn(
            PgSandboxWarning(
                f"{what} is a transaction of its own on the session database: it does not see the rows that "
                f"{scope} made once (pg_module and the like), which live in the transaction of the test's psycopg "
                "connection. Read them through pg, pg_conn, pg_engine or pg_session, or give the module "
                "@pytest.mark.pg(isolation='database'), where they are committed in a database of its own."
            ),
            stacklevel=2,
        )


def guard_policy(options: dict[str, Any], sandbox: Sandbox) -> str:
    """What a teardown finding becomes: ``error`` (a test error), ``warn`` or ``off``; the marker wins."""
    from pgsandbox.settings import GUARDS

    guard = str(options.get("guard", sandbox.settings.guard))
    if guard not in GUARDS:
        pytest.fail(f"pgsandbox: @pytest.mark.pg(guard={guard!r}) is not one of {', '.join(GUARDS)}.", pytrace=False)
    return guard
